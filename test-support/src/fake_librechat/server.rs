//! The HTTP/1.1 server, request context and routing.

use super::*;

pub(super) struct ServerHandle {
    pub(super) stop: oneshot::Sender<()>,
    pub(super) task: JoinHandle<()>,
}

pub(super) fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // `come_back` re-binds the port of connections it just killed (TIME_WAIT).
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

pub(super) fn spawn_server(listener: TcpListener, shared: Arc<Shared>) -> ServerHandle {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        conns.spawn(serve_connection(shared.clone(), stream, peer));
                    }
                    // Transient accept errors (e.g. EMFILE): back off briefly instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        // Connections die with the listener: a "down" server answers nothing at all.
        conns.shutdown().await;
    });
    ServerHandle { stop, task }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req, peer).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    lock(&shared.requests).push(RecordedRequest {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned()),
        headers: req.headers().clone(),
        peer,
    });
    // Counted on arrival, so rejected attempts (malformed JSON, limiter, ban) count too.
    if req.method() == Method::POST {
        let counter = match req.uri().path().trim_end_matches('/') {
            "/api/auth/login" => Some(&shared.login_calls),
            "/api/auth/refresh" => Some(&shared.refresh_calls),
            "/api/auth/register" => Some(&shared.register_calls),
            "/api/auth/logout" => Some(&shared.logout_calls),
            _ => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = req.uri().path().to_owned();
    let canned = lock(&shared.canned).get(&path).cloned();
    if let Some(canned) = canned {
        let mut resp = Response::new(Body::from(canned.body));
        *resp.status_mut() = canned.status;
        set_header(resp.headers_mut(), "content-type", canned.content_type);
        return resp;
    }
    let held = (req.method() == Method::POST)
        .then(|| lock(&shared.auth_gates).remove(&path))
        .flatten();
    let mut resp = dispatch(&shared, req, peer).await;
    if let Some(gate) = held {
        // The work is done (token rotated, session opened); only the answer waits.
        gate.reached.send_replace(true);
        let mut released = gate.released.subscribe();
        let _ = released.wait_for(|released| *released).await;
    }
    // Every recorded response carried these two.
    let headers = resp.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        HeaderName::from_static("x-robots-tag"),
        HeaderValue::from_static("noindex"),
    );
    resp
}

/// What a route sees of a request.
pub(super) struct Ctx {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: HashMap<String, String>,
    pub(super) headers: HeaderMap,
    pub(super) ip: String,
    /// `req.body` as Express 5 leaves it: `None` when no body parser ran (no JSON/urlencoded body).
    pub(super) body: Option<Value>,
    /// The unread body, for multipart uploads.
    pub(super) raw: Option<Incoming>,
}

impl Ctx {
    pub(super) fn body(&self) -> Value {
        self.body.clone().unwrap_or_else(|| json!({}))
    }

    pub(super) fn body_str(&self, key: &str) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| b.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    pub(super) fn user_agent(&self) -> &str {
        self.headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/health" && parts.method == Method::GET {
        return text(StatusCode::OK, "OK");
    }
    let media = media_type(&parts.headers);
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().parse::<u64>().is_ok());
    // express.json/urlencoded run globally, before every limiter: malformed JSON never counts.
    let (parsed, raw) = match media.as_deref() {
        Some(kind @ ("application/json" | "application/x-www-form-urlencoded")) if has_body => {
            let bytes = match http_body_util::Limited::new(body, MAX_JSON_BODY)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                    return text(StatusCode::PAYLOAD_TOO_LARGE, "request entity too large")
                }
                Err(_) => return text(StatusCode::BAD_REQUEST, "Bad Request"),
            };
            let value = if kind == "application/json" {
                match parse_json_body(&bytes) {
                    Some(v) => v,
                    None => {
                        return json_reply(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": "Invalid JSON format",
                                    "message": "The request body contains malformed JSON"}),
                        )
                    }
                }
            } else {
                let mut map = Map::new();
                for (k, v) in url::form_urlencoded::parse(&bytes) {
                    map.insert(k.into_owned(), Value::String(v.into_owned()));
                }
                Value::Object(map)
            };
            (Some(value), None)
        }
        _ => (None, Some(body)),
    };
    if !(path == "/api" || path.starts_with("/api/")) {
        if let Some(dir) = spa::client_dir(shared, &parts.method, &path) {
            return spa::from_dir(&dir, &path).await;
        }
        return spa::serve(shared, &parts.method, &path, &parts.headers);
    }
    let mut ctx = Ctx {
        method: parts.method,
        query: parse_query(parts.uri.query()),
        ip: client_ip(&parts.headers, peer),
        headers: parts.headers,
        path,
        body: parsed,
        raw,
    };
    route(shared, &mut ctx).await
}

/// `express.json` in strict mode: an empty body is `{}`, only objects and arrays are accepted.
fn parse_json_body(bytes: &[u8]) -> Option<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(json!({}));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => Some(v),
        _ => None,
    }
}

pub(super) async fn route(shared: &Arc<Shared>, ctx: &mut Ctx) -> Response<Body> {
    let rest = ctx.path.strip_prefix("/api").unwrap_or_default().to_owned();
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = ctx.method.clone();
    match segs.as_slice() {
        ["auth", "register"] if method == Method::POST => register(shared, ctx).await,
        ["auth", "login"] if method == Method::POST => login(shared, ctx),
        ["auth", "refresh"] if method == Method::POST => refresh(shared, ctx),
        ["auth", "logout"] if method == Method::POST => logout(shared, ctx),
        ["auth", "requestPasswordReset"] if method == Method::POST => {
            request_password_reset(shared, ctx)
        }
        ["auth", "resetPassword"] if method == Method::POST => reset_password(shared, ctx),
        ["config"] if method == Method::GET => config(shared, ctx),
        ["user", ..] => {
            let user = match authenticate(shared, ctx) {
                Ok(u) => u,
                Err(resp) => return *resp,
            };
            if segs.len() == 1 && method == Method::GET {
                json_reply(StatusCode::OK, &user.to_json(UserView::Profile))
            } else {
                endpoint_not_found()
            }
        }
        ["convos", tail @ ..] => match authenticate(shared, ctx) {
            Ok(user) => convos(shared, ctx, &user, tail),
            Err(resp) => *resp,
        },
        ["messages", tail @ ..] => match authenticate(shared, ctx) {
            Ok(user) => messages(shared, ctx, &user, tail),
            Err(resp) => *resp,
        },
        ["endpoints"] | ["models"] if method == Method::GET => {
            if let Err(resp) = authenticate(shared, ctx) {
                return *resp;
            }
            if segs[0] == "endpoints" {
                endpoints_reply()
            } else {
                json_reply(StatusCode::OK, &models_json())
            }
        }
        [first @ ("agents" | "files" | "assistants"), tail @ ..] => {
            let user = match guard(shared, ctx) {
                Ok(u) => u,
                Err(resp) => return *resp,
            };
            match *first {
                "agents" => agents(shared, ctx, &user, tail).await,
                "files" => files(shared, ctx, &user, tail).await,
                _ => endpoint_not_found(),
            }
        }
        _ => endpoint_not_found(),
    }
}
