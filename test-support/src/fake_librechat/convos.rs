//! Conversations and messages.

use super::*;

pub(super) fn convos(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    user: &User,
    tail: &[&str],
) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => list_convos(shared, ctx, user),
        (Method::POST, ["update"]) => {
            let body = ctx.body();
            let arg = body.get("arg").cloned().unwrap_or(Value::Null);
            let Some(conversation_id) = arg.get("conversationId").and_then(Value::as_str) else {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "conversationId is required"}),
                );
            };
            let mut db = lock(&shared.db);
            let Some(convo) = db
                .convo_mut(conversation_id)
                .filter(|c| c.user_id == user.id)
            else {
                // UNCONFIRMED: the real saveConvo may upsert; the fake refuses unknown ids.
                return json_reply(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "Conversation not found"}),
                );
            };
            if let Some(fields) = arg.as_object() {
                for (key, value) in fields {
                    if key != "conversationId" && key != "_id" && key != "user" {
                        convo.doc.insert(key.clone(), value.clone());
                    }
                }
            }
            convo.doc.insert("updatedAt".into(), json!(iso(now_ms())));
            json_reply(StatusCode::CREATED, &Value::Object(convo.doc.clone()))
        }
        (Method::DELETE, []) => {
            let body = ctx.body();
            let conversation_id = body
                .get("arg")
                .and_then(|a| a.get("conversationId"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let Some(conversation_id) = conversation_id else {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "no parameters provided"}),
                );
            };
            delete_convos(shared, user, |c| c.id() == conversation_id)
        }
        (Method::DELETE, ["all"]) => delete_convos(shared, user, |_| true),
        (Method::GET, [conversation_id]) => {
            let db = lock(&shared.db);
            match db.convo(conversation_id).filter(|c| c.user_id == user.id) {
                Some(convo) => json_reply(StatusCode::OK, &Value::Object(convo.doc.clone())),
                // `res.status(404).end()`
                None => empty(StatusCode::NOT_FOUND),
            }
        }
        _ => endpoint_not_found(),
    }
}

fn list_convos(shared: &Arc<Shared>, ctx: &Ctx, user: &User) -> Response<Body> {
    let limit = ctx
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(25);
    let archived = ctx.query.get("isArchived").is_some_and(|v| v == "true");
    let sort_by = ctx
        .query
        .get("sortBy")
        .map(String::as_str)
        .filter(|s| matches!(*s, "updatedAt" | "createdAt" | "title"))
        .unwrap_or("updatedAt")
        .to_owned();
    let ascending = ctx.query.get("sortDirection").is_some_and(|d| d == "asc");
    let search = ctx.query.get("search").map(|s| s.to_lowercase());
    // The cursor is opaque to clients; here it is the base64 of the next offset.
    let offset = ctx
        .query
        .get("cursor")
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    let db = lock(&shared.db);
    let mut list: Vec<&Convo> = db
        .convos
        .iter()
        .filter(|c| c.user_id == user.id)
        .filter(|c| {
            c.doc
                .get("isArchived")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                == archived
        })
        .filter(|c| match &search {
            Some(s) => c
                .doc
                .get("title")
                .and_then(Value::as_str)
                .is_some_and(|t| t.to_lowercase().contains(s)),
            None => true,
        })
        .collect();
    list.sort_by(|a, b| {
        let key = |c: &Convo| {
            c.doc
                .get(&sort_by)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let ord = key(a).cmp(&key(b));
        if ascending {
            ord
        } else {
            ord.reverse()
        }
    });
    let page: Vec<Value> = list
        .iter()
        .skip(offset)
        .take(limit)
        .map(|c| c.list_item())
        .collect();
    let next_cursor = if offset + limit < list.len() {
        json!(base64::engine::general_purpose::STANDARD.encode((offset + limit).to_string()))
    } else {
        Value::Null
    };
    json_reply(
        StatusCode::OK,
        &json!({"conversations": page, "nextCursor": next_cursor}),
    )
}

fn delete_convos(
    shared: &Arc<Shared>,
    user: &User,
    which: impl Fn(&Convo) -> bool,
) -> Response<Body> {
    let mut db = lock(&shared.db);
    let doomed: Vec<String> = db
        .convos
        .iter()
        .filter(|c| c.user_id == user.id && which(c))
        .map(|c| c.id().to_owned())
        .collect();
    db.convos
        .retain(|c| !(c.user_id == user.id && doomed.iter().any(|d| d == c.id())));
    let before = db.messages.len();
    db.messages.retain(|m| !doomed.contains(&m.conversation_id));
    let deleted_messages = before - db.messages.len();
    json_reply(
        StatusCode::CREATED,
        &json!({
            "acknowledged": true,
            "deletedCount": doomed.len(),
            "messages": {"acknowledged": true, "deletedCount": deleted_messages},
        }),
    )
}

pub(super) fn messages(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    user: &User,
    tail: &[&str],
) -> Response<Body> {
    if ctx.method != Method::GET || tail.is_empty() || tail.len() > 2 {
        return endpoint_not_found();
    }
    let db = lock(&shared.db);
    // validateMessageReq
    match db.convo(tail[0]) {
        None => {
            return json_reply(
                StatusCode::NOT_FOUND,
                &json!({"error": "Conversation not found"}),
            )
        }
        Some(c) if c.user_id != user.id => {
            return json_reply(
                StatusCode::FORBIDDEN,
                &json!({"error": "User not authorized for this conversation"}),
            )
        }
        Some(_) => {}
    }
    let list: Vec<Value> = db
        .messages
        .iter()
        .filter(|m| m.conversation_id == tail[0])
        .filter(|m| {
            tail.len() == 1 || m.doc.get("messageId").and_then(Value::as_str) == Some(tail[1])
        })
        .map(|m| m.doc.clone())
        .collect();
    json_reply(StatusCode::OK, &Value::Array(list))
}

pub(super) fn endpoints_reply() -> Response<Body> {
    let body = json!({
        "agents": {
            "userProvide": false,
            "capabilities": ["deferred_tools", "execute_code", "file_search", "web_search",
                "artifacts", "subagents", "actions", "context", "skills", "tools", "chain", "ocr"],
            "order": 1,
            "disableBuilder": false,
        },
        FAKE_ENDPOINT: {
            "order": 9999,
            "type": "custom",
            "userProvide": false,
            "userProvideURL": false,
            "modelDisplayLabel": FAKE_ENDPOINT,
        },
    });
    // Recorded: `res.send(JSON string)`, so JSON under a text/html content type.
    let mut resp = Response::new(Body::from(body.to_string()));
    set_header(resp.headers_mut(), "content-type", HTML_CT);
    resp
}

pub(super) fn models_json() -> Value {
    json!({
        "openAI": ["gpt-4o", "gpt-4o-mini"],
        "google": ["gemini-2.5-pro", "gemini-2.5-flash"],
        "anthropic": ["claude-sonnet-4-5", "claude-haiku-4-5"],
        "azureOpenAI": ["gpt-4o", "gpt-4o-mini"],
        "assistants": ["gpt-4o", "gpt-4o-mini"],
        "azureAssistants": ["gpt-4o", "gpt-4o-mini"],
        "bedrock": ["anthropic.claude-sonnet-4-5-20250929-v1:0"],
        FAKE_ENDPOINT: [FAKE_MODEL],
    })
}
