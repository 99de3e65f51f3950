//! Limiters and bans (express-rate-limit and LibreChat's ban logic).

use super::*;

/// express-rate-limit's memory store: a fixed window per key, opened by the key's first hit; every
/// request counts, including the rejected ones.
pub(super) struct FixedWindow {
    pub(super) max: u32,
    window_ms: u64,
    hits: HashMap<String, (u32, u64)>,
}

pub(super) struct LimitResult {
    pub(super) limit: u32,
    remaining: u32,
    reset_ms: u64,
    pub(super) limited: bool,
    pub(super) now_ms: u64,
}

impl FixedWindow {
    pub(super) fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window_ms: window.as_millis() as u64,
            hits: HashMap::new(),
        }
    }

    pub(super) fn hit(&mut self, key: &str) -> LimitResult {
        let now = now_ms();
        let entry = self
            .hits
            .entry(key.to_owned())
            .or_insert((0, now + self.window_ms));
        if now >= entry.1 {
            *entry = (0, now + self.window_ms);
        }
        entry.0 += 1;
        LimitResult {
            limit: self.max,
            remaining: self.max.saturating_sub(entry.0),
            reset_ms: entry.1,
            limited: entry.0 > self.max,
            now_ms: now,
        }
    }
}

impl LimitResult {
    fn apply(&self, resp: &mut Response<Body>) {
        let h = resp.headers_mut();
        set_header(h, "x-ratelimit-limit", &self.limit.to_string());
        set_header(h, "x-ratelimit-remaining", &self.remaining.to_string());
        set_header(
            h,
            "x-ratelimit-reset",
            &self.reset_ms.div_ceil(1000).to_string(),
        );
        if self.limited {
            let retry = self.reset_ms.saturating_sub(self.now_ms).div_ceil(1000);
            set_header(h, "retry-after", &retry.to_string());
        }
    }

    pub(super) fn with(&self, mut resp: Response<Body>) -> Response<Body> {
        self.apply(&mut resp);
        resp
    }
}

pub(super) struct Limiters {
    pub(super) login: FixedWindow,
    pub(super) register: FixedWindow,
    pub(super) reset: FixedWindow,
    pub(super) file_ip: FixedWindow,
    pub(super) file_user: FixedWindow,
}

impl Limiters {
    pub(super) fn new(opts: &FakeLibreChatOptions) -> Self {
        Self {
            login: FixedWindow::new(opts.login_max, opts.login_window),
            register: FixedWindow::new(opts.register_max, opts.register_window),
            reset: FixedWindow::new(opts.reset_password_max, opts.reset_password_window),
            file_ip: FixedWindow::new(FILE_UPLOAD_IP_MAX, FILE_UPLOAD_WINDOW),
            file_user: FixedWindow::new(FILE_UPLOAD_USER_MAX, FILE_UPLOAD_WINDOW),
        }
    }
}

#[derive(Default)]
pub(super) struct Bans {
    /// `ip:<key>` / `user:<id>` → expiry (ms since epoch).
    pub(super) entries: HashMap<String, u64>,
}

impl Bans {
    pub(super) fn is_banned(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|&until| until > now_ms())
    }
}

pub(super) fn minutes(d: Duration) -> u64 {
    d.as_secs() / 60
}

/// `checkBan` for login/register/reset: the client IP and the user named by `req.body.email`.
pub(super) fn banned_by_ip_or_email(shared: &Shared, ctx: &Ctx) -> bool {
    if !shared.opts().ban_violations {
        return false;
    }
    let user_id = ctx
        .body_str("email")
        .and_then(|email| lock(&shared.db).user_by_email(&email).map(|u| u.id.clone()));
    let bans = lock(&shared.bans);
    bans.is_banned(&format!("ip:{}", ctx.ip))
        || user_id.is_some_and(|id| bans.is_banned(&format!("user:{id}")))
}

/// checkBan's answer: non-browsers always get 403 JSON; browsers on `/api/agents/chat*` get
/// `denyRequest` (an SSE-formatted 200, or a 500 when there is no body to read).
pub(super) fn ban_response(ctx: &Ctx) -> Response<Body> {
    if is_browser(ctx.user_agent()) && ctx.path.starts_with("/api/agents/chat") {
        return deny_request(ctx);
    }
    json_reply(StatusCode::FORBIDDEN, &json!({ "message": BAN_MESSAGE }))
}

/// LibreChat's `denyRequest` for a banned browser on the chat routes. Express 5 leaves `req.body`
/// undefined without a body, and v0.8.7 then crashes on destructuring it: 500 text.
fn deny_request(ctx: &Ctx) -> Response<Body> {
    let Some(body) = ctx.body.as_ref() else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, UNKNOWN_ERROR);
    };
    let message_id = body
        .get("messageId")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(uuid4);
    let conversation_id = match body.get("conversationId").and_then(Value::as_str) {
        Some(id) if id != "new" => id.to_owned(),
        _ => uuid4(),
    };
    let parent = body.get("parentMessageId").cloned().unwrap_or(Value::Null);
    let user_message = json!({
        "sender": "User",
        "messageId": message_id,
        "parentMessageId": parent,
        "conversationId": conversation_id,
        "isCreatedByUser": true,
        "text": body.get("text").cloned().unwrap_or(Value::Null),
    });
    let error_message = json!({
        "sender": "AI",
        "messageId": uuid4(),
        "conversationId": conversation_id,
        "parentMessageId": message_id,
        "unfinished": false,
        "error": true,
        "final": true,
        "text": "{\"type\":\"ban\"}",
        "isCreatedByUser": false,
    });
    let body = format!(
        "{}{}",
        sse_frame(
            "message",
            &json!({"message": user_message, "created": true})
        ),
        sse_frame("error", &error_message)
    );
    raw_chunked(StatusCode::OK, body)
}

/// ua-parser-js finds a `browser.name` for real browsers only; this is the same split for the
/// agents tests care about (`okhttp/4.12`, `curl/8`, `python-requests`, empty → non-browser).
pub(super) fn is_browser(ua: &str) -> bool {
    const TOKENS: [&str; 10] = [
        "Mozilla/",
        "Chrome/",
        "Chromium/",
        "Firefox/",
        "Safari/",
        "Edg/",
        "Edge/",
        "OPR/",
        "Opera",
        "Trident/",
    ];
    TOKENS.iter().any(|t| ua.contains(t))
}
