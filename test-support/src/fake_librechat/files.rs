//! Files: the list, the file config, and multipart uploads (files and images).

use super::*;

pub(super) async fn files(
    shared: &Arc<Shared>,
    ctx: &mut Ctx,
    user: &User,
    tail: &[&str],
) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => {
            let db = lock(&shared.db);
            // Newest first.
            let list: Vec<Value> = db
                .files
                .iter()
                .rev()
                .filter(|f| f.user_id == user.id)
                .map(|f| Value::Object(f.doc.clone()))
                .collect();
            json_reply(StatusCode::OK, &Value::Array(list))
        }
        // No fileConfig in librechat.yaml → `res.json(undefined)`: JSON type, empty body.
        (Method::GET, ["config"]) => {
            let mut resp = raw_chunked(StatusCode::OK, String::new());
            set_header(resp.headers_mut(), "content-type", JSON_CT);
            resp
        }
        (Method::POST, []) => upload(shared, ctx, user, false).await,
        (Method::POST, ["images"]) => upload(shared, ctx, user, true).await,
        _ => endpoint_not_found(),
    }
}

#[derive(Default)]
pub(super) struct ParsedUpload {
    pub(super) field_names: Vec<String>,
    pub(super) text: HashMap<String, String>,
    pub(super) file_name: Option<String>,
    pub(super) file_content_type: Option<String>,
    pub(super) file_bytes: u64,
    pub(super) sha256: String,
    has_file: bool,
    /// Set when the `file` part arrived before any `endpoint` field.
    order_violation: bool,
    /// multer/busboy errors: a second or unexpected file field, a broken body.
    multer_error: bool,
}

pub(super) async fn upload(
    shared: &Arc<Shared>,
    ctx: &mut Ctx,
    user: &User,
    image: bool,
) -> Response<Body> {
    let path = ctx.path.clone();
    let ip_limit = lock(&shared.limits).file_ip.hit(&ctx.ip);
    if ip_limit.limited {
        return ip_limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too many file upload requests. Try again later"}),
        ));
    }
    let user_limit = lock(&shared.limits).file_user.hit(&user.id);
    if user_limit.limited {
        return user_limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too many file upload requests. Try again later"}),
        ));
    }
    let strict = shared.opts().strict_upload_field_order;
    let parsed = parse_multipart(ctx, strict).await;
    let resp = user_limit.with(process_upload(shared, user, image, &parsed));
    lock(&shared.uploads).push(RecordedUpload {
        path,
        field_names: parsed.field_names,
        file_name: parsed.file_name,
        file_content_type: parsed.file_content_type,
        file_bytes: parsed.file_bytes,
        sha256: parsed.sha256,
        status: resp.status().as_u16(),
    });
    resp
}

/// Streams the multipart body: text parts are kept, the file part is only counted and hashed, so
/// an upload of any size needs constant memory.
async fn parse_multipart(ctx: &mut Ctx, strict_order: bool) -> ParsedUpload {
    let mut out = ParsedUpload {
        sha256: sha256_hex(b""),
        ..ParsedUpload::default()
    };
    let boundary = ctx
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let (Some(boundary), Some(raw)) = (boundary, ctx.raw.take()) else {
        // Not multipart: multer leaves req.file unset and the route fails later.
        return out;
    };
    let mut multipart = multer::Multipart::new(Body::new(raw).into_data_stream(), boundary);
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => {
                out.multer_error = true;
                break;
            }
        };
        let name = field.name().unwrap_or("").to_owned();
        out.field_names.push(name.clone());
        if let Some(file_name) = field.file_name().map(str::to_owned) {
            // upload.single('file'): any other file field, or a second one, is a MulterError.
            let is_the_file = name == "file" && !out.has_file;
            if is_the_file {
                out.has_file = true;
                out.file_name = Some(file_name);
                out.file_content_type = field.content_type().map(|m| m.to_string());
                // fileFilter reads req.body.endpoint while the file streams in.
                if strict_order && !out.text.contains_key("endpoint") {
                    out.order_violation = true;
                }
            } else {
                out.multer_error = true;
            }
            let mut hasher = Sha256::new();
            let mut bytes = 0u64;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        hasher.update(&chunk);
                        bytes += chunk.len() as u64;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.multer_error = true;
                        break;
                    }
                }
            }
            if is_the_file {
                out.file_bytes = bytes;
                out.sha256 = hex(&hasher.finalize());
            }
        } else {
            let mut value = Vec::new();
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = MAX_TEXT_FIELD.saturating_sub(value.len());
                        value.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.multer_error = true;
                        break;
                    }
                }
            }
            out.text
                .insert(name, String::from_utf8_lossy(&value).into_owned());
        }
        if out.multer_error {
            break;
        }
    }
    out
}

fn process_upload(shared: &Shared, user: &User, image: bool, up: &ParsedUpload) -> Response<Body> {
    if up.multer_error {
        // MulterError → ErrorController's generic answer.
        return text(StatusCode::INTERNAL_SERVER_ERROR, UNKNOWN_ERROR);
    }
    let failed = || {
        json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"message": "Error processing file"}),
        )
    };
    let field = |k: &str| up.text.get(k).filter(|v| !v.is_empty());
    // filterFile
    let client_file_id = field("file_id");
    if !up.has_file
        || up.order_violation
        || up.file_bytes == 0
        || client_file_id.is_none_or(|id| uuid::Uuid::parse_str(id).is_err())
        || field("endpoint").is_none()
    {
        return failed();
    }
    let content_type = up
        .file_content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    let (width, height) = (
        field("width").and_then(|w| w.parse::<u64>().ok()),
        field("height").and_then(|h| h.parse::<u64>().ok()),
    );
    if image && (width.is_none() || height.is_none() || !content_type.starts_with("image/")) {
        return failed();
    }
    // processAgentFileUpload: without message_file (any non-empty value is truthy) a file must
    // name an agent, and an agent file must name a tool resource.
    let message_file = field("message_file").is_some();
    if !image && !message_file && (field("agent_id").is_none() || field("tool_resource").is_none())
    {
        return failed();
    }
    let now = iso(now_ms());
    let file_id = uuid4();
    let file_name = up.file_name.clone().unwrap_or_default();
    let dir = if content_type.starts_with("image/") {
        "images"
    } else {
        "uploads"
    };
    let mut doc = Map::new();
    doc.insert("_id".into(), json!(shared.oid.next()));
    doc.insert("file_id".into(), json!(file_id));
    doc.insert("updatedAt".into(), json!(now));
    if image {
        doc.insert("height".into(), json!(height));
        doc.insert("width".into(), json!(width));
    }
    doc.insert("type".into(), json!(content_type));
    doc.insert("source".into(), json!("local"));
    doc.insert("context".into(), json!("message_attachment"));
    doc.insert("filename".into(), json!(file_name));
    doc.insert(
        "filepath".into(),
        json!(format!("/{dir}/{}/{file_id}__{file_name}", user.id)),
    );
    // The real server reports the stored size (re-encoded for images); the fake stores nothing.
    doc.insert("bytes".into(), json!(up.file_bytes));
    doc.insert("temp_file_id".into(), json!(client_file_id));
    doc.insert("user".into(), json!(user.id));
    doc.insert("__v".into(), json!(0));
    doc.insert("createdAt".into(), json!(now));
    doc.insert("object".into(), json!("file"));
    doc.insert("usage".into(), json!(0));
    lock(&shared.db).files.push(StoredFile {
        user_id: user.id.clone(),
        doc: doc.clone(),
    });
    let message = if image {
        "File uploaded and processed successfully"
    } else {
        "Agent file uploaded and processed successfully"
    };
    doc.insert("message".into(), json!(message));
    json_reply(StatusCode::OK, &Value::Object(doc))
}
