//! Replays the exchanges recorded from a real LibreChat v0.8.7 (`tests/fixtures/librechat-transcripts/`)
//! against the in-process fake (`test-support/src/fake_librechat/`) and checks that the fake answers
//! the same way: status, media type, Set-Cookie names and attributes, rate-limit headers, SSE
//! headers, and JSON shapes (key sets two levels deep, `message`/`error` strings and top-level
//! booleans), plain-text bodies verbatim, SSE frames by kind.
//!
//! Placeholder tokens are replaced by the live tokens the fake issued (tracked as `access#N` /
//! `refresh#N` per each exchange's `tokens` map), and server-made ids (user, conversation,
//! message ids) seen in recorded answers are mapped to the fake's ids before they are sent back.
//!
//! Every place where the fake deliberately differs is listed in [`DEVIATIONS`] with its reason,
//! keyed by scenario and step; a listed deviation that is never needed fails the test, so the table
//! cannot go stale. Not compared anywhere, in both directions: ids and timestamps (they cannot
//! match), access-token identity across logins (it depends on whether two logins fall in the same
//! second, for the real server as for the fake), `X-RateLimit-Reset` values (wall clock), and
//! values other than those named above (e.g. the first account on the fresh fake is `ADMIN`, while
//! the recorded server already had users; an uploaded PNG's `bytes` is 73, its upload size, in the
//! fake but 97 in the recording, where the real server stored a re-encoded image).
//!
//! Scenario actions that are not deviations: `register.json` runs with the real server's 1 s
//! duplicate-email delay switched on and checks it; in `password-reset.json` the recorder flipped
//! `ALLOW_PASSWORD_RESET` and restarted the server, replayed as `set_allow_password_reset(true)`
//! plus `reset_limiters()`; in `chat.json` the second turn's stream was open while status, active
//! and abort ran, replayed by holding that stream at `hold_stream_end()` until they are done.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::StreamExt;
use http::HeaderMap;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::fake_librechat::{FakeLibreChat, FakeLibreChatOptions};

const TRANSCRIPTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/librechat-transcripts"
);

// ---------------------------------------------------------------------------------------------
// Allowed deviations
// ---------------------------------------------------------------------------------------------

/// What a deviation lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Allow {
    /// The recorded answer re-used the request's refresh token; the fake's differs.
    NewRefreshToken,
    /// The live SSE stream has an `on_token_usage` frame the recording lacks.
    ExtraTokenUsageFrame,
    /// Top-level arrays of strings may differ in length.
    StringListLengths,
}

struct Deviation {
    scenario: &'static str,
    step: &'static str,
    allow: Allow,
    why: &'static str,
}

const DEVIATIONS: &[Deviation] = &[
    Deviation {
        scenario: "refresh.json",
        step: "refresh ?retry=true with the current token",
        allow: Allow::NewRefreshToken,
        why: "The real server re-signed identical claims ({id, sessionId}, same iat second, same exp) \
              and so handed back the very token it was sent. The fake adds a random jti so every \
              rotation yields a new token, as the brief requires; the old one is dead at once either way.",
    },
    Deviation {
        scenario: "chat.json",
        step: "GET stream of second turn (aborted mid-generation)",
        allow: Allow::ExtraTokenUsageFrame,
        why: "The recording aborted a slow model mid-deltas, so no on_token_usage was ever sent. The \
              replay aborts deterministically through the fake's hold_stream_end() gate, which holds \
              before the LAST frame only, i.e. after on_token_usage has gone out.",
    },
    Deviation {
        scenario: "chat.json",
        step: "GET /api/models",
        allow: Allow::StringListLengths,
        why: "Model lists are deployment data (provider defaults of that server build); the fake lists \
              a few names per provider. The provider keys and FakeAI's [\"fake-model\"] match.",
    },
];

// ---------------------------------------------------------------------------------------------
// Live exchange
// ---------------------------------------------------------------------------------------------

struct Live {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Number of body chunks read from the socket (streaming evidence).
    chunks: usize,
    elapsed: Duration,
}

impl Live {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Replayer
// ---------------------------------------------------------------------------------------------

struct Replayer {
    scenario: &'static str,
    fake: FakeLibreChat,
    http: reqwest::Client,
    exchanges: Vec<Value>,
    /// `access#N` / `refresh#N` → live token.
    tokens: HashMap<String, String>,
    /// Every refresh token the fake issued so far.
    refresh_seen: HashSet<String>,
    /// Recorded server-made id → the fake's id.
    ids: Vec<(String, String)>,
    reset_token: Option<String>,
    login_expires: Option<String>,
    used: HashSet<(&'static str, Allow)>,
    failures: Vec<String>,
}

impl Replayer {
    async fn new(scenario: &'static str, opts: FakeLibreChatOptions) -> Replayer {
        let raw = std::fs::read_to_string(format!("{TRANSCRIPTS}/{scenario}"))
            .unwrap_or_else(|e| panic!("read {scenario}: {e}"));
        let exchanges: Vec<Value> = serde_json::from_str(&raw).expect("transcript is JSON");
        Replayer {
            scenario,
            fake: FakeLibreChat::start(opts).await,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("reqwest client"),
            exchanges,
            tokens: HashMap::new(),
            refresh_seen: HashSet::new(),
            ids: Vec::new(),
            reset_token: None,
            login_expires: None,
            used: HashSet::new(),
            failures: Vec::new(),
        }
    }

    fn exchange(&self, step: &str) -> Value {
        self.exchanges
            .iter()
            .find(|e| e["step"] == step)
            .cloned()
            .unwrap_or_else(|| panic!("{}: no step {step:?}", self.scenario))
    }

    fn steps(&self) -> Vec<String> {
        self.exchanges
            .iter()
            .map(|e| e["step"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Whether the deviation table allows `allow` for this step (and remembers that it was used).
    fn allowed(&mut self, step: &str, allow: Allow) -> bool {
        let hit = DEVIATIONS
            .iter()
            .find(|d| d.scenario == self.scenario && d.step == step && d.allow == allow);
        if let Some(d) = hit {
            self.used.insert((d.step, d.allow));
            true
        } else {
            false
        }
    }

    fn fail(&mut self, step: &str, msg: String) {
        self.failures
            .push(format!("[{} / {step}] {msg}", self.scenario));
    }

    /// Sends one recorded request and compares the answer.
    async fn step(&mut self, step: &str) -> Live {
        let ex = self.exchange(step);
        let live = self.send(&ex).await;
        self.check(&ex, &live);
        live
    }

    /// Replays every exchange in order.
    async fn run_all(&mut self) {
        for step in self.steps() {
            self.step(&step).await;
        }
    }

    /// Fails the test with every mismatch found, and on any unused deviation entry.
    fn finish(self) {
        let mut failures = self.failures;
        for d in DEVIATIONS.iter().filter(|d| d.scenario == self.scenario) {
            if !self.used.contains(&(d.step, d.allow)) {
                failures.push(format!(
                    "[{} / {}] deviation {:?} is listed but was never needed ({})",
                    self.scenario, d.step, d.allow, d.why
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} mismatch(es):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    // ----- request side -----

    fn resolve_token(&self, description: &str) -> String {
        if description.contains("expired access token") {
            let email = self.access_claims()["email"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            return self.fake.mint_access_token(&email, -1000, -100);
        }
        if description.contains("wrong secret") {
            let mut claims = self.access_claims();
            let now = unix_now();
            claims["iat"] = json!(now);
            claims["exp"] = json!(now + 900);
            return jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret"),
            )
            .expect("sign");
        }
        if description.contains("password-reset token") {
            return self
                .reset_token
                .clone()
                .expect("reset token captured before use");
        }
        let id = token_id(description).unwrap_or_else(|| panic!("no token id in {description:?}"));
        self.tokens
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} used before the fake issued it"))
    }

    /// The claims of `access#1` (the scenario's main user).
    fn access_claims(&self) -> Value {
        let token = self.tokens.get("access#1").expect("access#1 known");
        let payload = token.split('.').nth(1).expect("JWT payload");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url payload");
        serde_json::from_slice(&bytes).expect("JSON claims")
    }

    /// Placeholder tokens first, then recorded ids → live ids.
    fn substitute(&self, location: &str, ex: &Value, text: &str) -> String {
        let mut out = text.to_owned();
        if let Some(desc) = ex["tokens"].get(location).and_then(Value::as_str) {
            for placeholder in [
                "<access_token>",
                "<refresh_token>",
                "<expired_access_token>",
                "<wrong_signature_access_token>",
                "<reset_token>",
            ] {
                if out.contains(placeholder) {
                    out = out.replace(placeholder, &self.resolve_token(desc));
                }
            }
        }
        for (recorded, live) in &self.ids {
            out = out.replace(recorded.as_str(), live);
        }
        out
    }

    fn substitute_json(&self, location: &str, ex: &Value, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.substitute(location, ex, s)),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.substitute_json(location, ex, i))
                    .collect(),
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, val)| {
                        let loc = format!("{location}.{k}");
                        (k.clone(), self.substitute_json(&loc, ex, val))
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn build_request(&self, ex: &Value) -> reqwest::RequestBuilder {
        let req = &ex["request"];
        let method: reqwest::Method = req["method"]
            .as_str()
            .unwrap_or("GET")
            .parse()
            .expect("method");
        let path = self.substitute("request.path", ex, req["path"].as_str().unwrap_or("/"));
        let mut builder = self
            .http
            .request(method, format!("{}{path}", self.fake.base_url));
        let headers = req["headers"].as_object().cloned().unwrap_or_default();
        for (name, value) in &headers {
            let value = value.as_str().unwrap_or_default();
            let loc = format!("request.headers.{name}");
            builder = builder.header(name.as_str(), self.substitute(&loc, ex, value));
        }
        match &req["body"] {
            Value::Null => builder,
            Value::String(raw) => builder.body(raw.clone()),
            body if body.get("multipart_parts_in_order").is_some() => {
                let ct = headers["Content-Type"].as_str().unwrap_or_default();
                let boundary = ct.split("boundary=").nth(1).expect("boundary");
                let (bytes, _) = multipart_body(boundary, &body["multipart_parts_in_order"]);
                builder.body(bytes)
            }
            body => builder.body(self.substitute_json("request.body", ex, body).to_string()),
        }
    }

    async fn send(&self, ex: &Value) -> Live {
        let started = Instant::now();
        let resp = self
            .build_request(ex)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: send {:?}: {e}", self.scenario, ex["step"]));
        read_live(resp, started).await
    }

    // ----- response side -----

    fn check(&mut self, ex: &Value, live: &Live) {
        let step = ex["step"].as_str().unwrap_or_default().to_owned();
        let rec = &ex["response"];
        let rec_headers = rec["headers"].as_object().cloned().unwrap_or_default();
        let rec_header = |name: &str| {
            rec_headers
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };

        let rec_status = rec["status"].as_u64().unwrap_or_default() as u16;
        if rec_status != live.status {
            self.fail(
                &step,
                format!(
                    "status {} (recorded {rec_status}); body {:?}",
                    live.status,
                    live.text()
                ),
            );
        }

        let media = |ct: Option<String>| {
            ct.map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
        };
        let (rec_media, live_media) = (
            media(rec_header("Content-Type")),
            media(live.header("content-type")),
        );
        if rec_media != live_media {
            self.fail(
                &step,
                format!("media type {live_media:?} (recorded {rec_media:?})"),
            );
        }

        for name in [
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "Location",
            "Cache-Control",
            "Content-Encoding",
            "X-Accel-Buffering",
        ] {
            let (r, l) = (rec_header(name), live.header(name));
            if r != l {
                self.fail(&step, format!("{name} {l:?} (recorded {r:?})"));
            }
        }
        match (
            rec_header("X-RateLimit-Reset"),
            live.header("X-RateLimit-Reset"),
        ) {
            (None, None) => {}
            (Some(_), Some(l)) if l.parse::<u64>().is_ok_and(|t| t >= unix_now() as u64) => {}
            (r, l) => self.fail(&step, format!("X-RateLimit-Reset {l:?} (recorded {r:?})")),
        }
        match (rec_header("Retry-After"), live.header("Retry-After")) {
            (None, None) => {}
            // The recording shows 300 then 299 as the window ran down; allow for the replay's pace.
            (Some(r), Some(l))
                if l.parse::<i64>()
                    .ok()
                    .zip(r.parse::<i64>().ok())
                    .is_some_and(|(l, r)| (l - r).abs() <= 5) => {}
            (r, l) => self.fail(&step, format!("Retry-After {l:?} (recorded {r:?})")),
        }

        self.check_cookies(&step, ex, live, &rec_headers);
        self.check_body(&step, rec, live, rec_media.as_deref());
        self.capture(&step, ex, live);
    }

    fn check_cookies(
        &mut self,
        step: &str,
        ex: &Value,
        live: &Live,
        rec_headers: &serde_json::Map<String, Value>,
    ) {
        let recorded: Vec<Cookie> = rec_headers
            .get("Set-Cookie")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(Cookie::parse)
                    .collect()
            })
            .unwrap_or_default();
        let live_cookies: Vec<Cookie> = live
            .set_cookies()
            .iter()
            .map(|c| Cookie::parse(c))
            .collect();
        let names = |c: &[Cookie]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        if names(&recorded) != names(&live_cookies) {
            self.fail(
                step,
                format!(
                    "Set-Cookie names {:?} (recorded {:?})",
                    names(&live_cookies),
                    names(&recorded)
                ),
            );
            return;
        }
        for (r, l) in recorded.iter().zip(&live_cookies) {
            let what = [
                ("Path", r.attr("path") == l.attr("path")),
                ("HttpOnly", r.has("httponly") == l.has("httponly")),
                ("SameSite", r.attr("samesite") == l.attr("samesite")),
                ("Expires presence", r.has("expires") == l.has("expires")),
                ("Expires epoch", r.expires_epoch() == l.expires_epoch()),
                ("Secure", r.has("secure") == l.has("secure")),
                ("Domain", r.has("domain") == l.has("domain")),
                // Placeholders stand for some non-empty token; other values are literal.
                (
                    "value",
                    if r.value.starts_with('<') {
                        !l.value.is_empty()
                    } else {
                        r.value == l.value
                    },
                ),
            ];
            for (attr, ok) in what {
                if !ok {
                    self.fail(
                        step,
                        format!(
                            "cookie {} {attr}: live {:?} recorded {:?}",
                            r.name, l.raw, r.raw
                        ),
                    );
                }
            }
        }
        // A session's expiry is fixed at login: every rotation repeats the login's Expires.
        if let Some(c) = live_cookies
            .iter()
            .find(|c| c.name == "refreshToken" && !c.value.is_empty())
        {
            let path = ex["request"]["path"].as_str().unwrap_or_default();
            let expires = c.attr("expires").unwrap_or_default();
            if path.starts_with("/api/auth/login") {
                self.login_expires = Some(expires);
            } else if path.starts_with("/api/auth/refresh")
                && self.login_expires.as_deref() != Some(expires.as_str())
            {
                self.fail(
                    step,
                    format!(
                        "rotated cookie Expires {expires:?} != login's {:?}",
                        self.login_expires
                    ),
                );
            }
        }
    }

    fn check_body(&mut self, step: &str, rec: &Value, live: &Live, rec_media: Option<&str>) {
        let rec_body = &rec["body"];
        if rec_media == Some("text/event-stream") {
            let recorded: Vec<(String, Value)> = rec_body
                .as_array()
                .map(|frames| {
                    frames
                        .iter()
                        .map(|f| {
                            (
                                f["event"].as_str().unwrap_or("").to_owned(),
                                f["data"].clone(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let frames = parse_sse(&live.text());
            self.check_stream(step, &recorded, &frames);
            return;
        }
        if let Some(rec_frames) = rec.get("body_sse_frames").and_then(Value::as_array) {
            let frames = parse_sse(&live.text());
            let rec_events: Vec<&str> = rec_frames
                .iter()
                .map(|f| f["event"].as_str().unwrap_or(""))
                .collect();
            let live_events: Vec<&str> = frames.iter().map(|f| f.0.as_str()).collect();
            if rec_events != live_events {
                self.fail(
                    step,
                    format!("SSE events {live_events:?} (recorded {rec_events:?})"),
                );
                return;
            }
            for (r, (_, l)) in rec_frames.iter().zip(&frames) {
                let mut errors = Vec::new();
                compare_shape(
                    &r["data"],
                    l,
                    "data",
                    0,
                    0,
                    &mut errors,
                    &["message", "error", "text"],
                );
                for e in errors {
                    self.fail(step, e);
                }
            }
            return;
        }
        match rec_body {
            Value::Object(_) | Value::Array(_) => {
                let Some(live_json) = live.json() else {
                    self.fail(step, format!("body is not JSON: {:?}", live.text()));
                    return;
                };
                let max_depth = 1;
                let mut errors = Vec::new();
                compare_shape(
                    rec_body,
                    &live_json,
                    "body",
                    0,
                    max_depth,
                    &mut errors,
                    &["message", "error"],
                );
                if self.allowed_string_lists(step, rec_body, &live_json) {
                    errors.retain(|e| !e.contains("string list length"));
                }
                for e in errors {
                    self.fail(step, e);
                }
            }
            Value::String(text) if *text != live.text() => {
                self.fail(step, format!("body {:?} (recorded {text:?})", live.text()));
            }
            _ => {}
        }
    }

    fn allowed_string_lists(&mut self, step: &str, rec: &Value, live: &Value) -> bool {
        let differs = rec.as_object().is_some_and(|r| {
            r.iter().any(|(k, v)| {
                v.is_array() && v.as_array().map(Vec::len) != live[k].as_array().map(Vec::len)
            })
        });
        differs && self.allowed(step, Allow::StringListLengths)
    }

    fn check_stream(&mut self, step: &str, recorded: &[(String, Value)], live: &[(String, Value)]) {
        if live.iter().any(|(event, _)| event != "message") {
            self.fail(step, "an SSE frame is not `event: message`".into());
        }
        let mut live_kinds = collapse(live);
        let rec_kinds = collapse(recorded);
        if live_kinds != rec_kinds
            && live_kinds.contains(&"on_token_usage".to_owned())
            && !rec_kinds.contains(&"on_token_usage".to_owned())
            && self.allowed(step, Allow::ExtraTokenUsageFrame)
        {
            live_kinds.retain(|k| k != "on_token_usage");
        }
        if live_kinds != rec_kinds {
            self.fail(
                step,
                format!("SSE frame kinds {live_kinds:?} (recorded {rec_kinds:?})"),
            );
        }
        // First frame `created`, last `final`: same top-level keys as recorded.
        for kind in ["created", "final"] {
            let pick = |frames: &[(String, Value)]| {
                frames
                    .iter()
                    .find(|(_, d)| kind_of(d) == kind)
                    .map(|(_, d)| d.clone())
            };
            if let (Some(r), Some(l)) = (pick(recorded), pick(live)) {
                let mut errors = Vec::new();
                compare_shape(&r, &l, kind, 0, 0, &mut errors, &[]);
                for e in errors {
                    self.fail(step, e);
                }
                if kind == "final" {
                    for flag in ["aborted", "final"] {
                        if r.get(flag) != l.get(flag) {
                            self.fail(
                                step,
                                format!(
                                    "final.{flag} {:?} (recorded {:?})",
                                    l.get(flag),
                                    r.get(flag)
                                ),
                            );
                        }
                    }
                    let unfinished = |d: &Value| {
                        d["responseMessage"]["unfinished"]
                            .as_bool()
                            .unwrap_or(false)
                    };
                    if unfinished(&r) != unfinished(&l) {
                        self.fail(step, "final.responseMessage.unfinished differs".into());
                    }
                    // What the deltas spelled out is what the final frame reports.
                    let streamed: String = live
                        .iter()
                        .filter(|(_, d)| kind_of(d) == "on_message_delta")
                        .filter_map(|(_, d)| d["data"]["delta"]["content"][0]["text"].as_str())
                        .collect();
                    if l["responseMessage"]["content"][0]["text"].as_str()
                        != Some(streamed.as_str())
                    {
                        self.fail(
                            step,
                            format!("final content != streamed deltas {streamed:?}"),
                        );
                    }
                }
            }
        }
        // Learn server-made ids from the frames both sides have.
        for kind in ["created", "on_run_step", "final"] {
            let pick = |frames: &[(String, Value)]| {
                frames
                    .iter()
                    .find(|(_, d)| kind_of(d) == kind)
                    .map(|(_, d)| d.clone())
            };
            if let (Some(r), Some(l)) = (pick(recorded), pick(live)) {
                learn_ids(&mut self.ids, &r, &l);
            }
        }
    }

    /// Records the live tokens/ids that later steps refer to.
    fn capture(&mut self, step: &str, ex: &Value, live: &Live) {
        let rec_body = &ex["response"]["body"];
        if let (true, Some(live_json)) = (rec_body.is_object() || rec_body.is_array(), live.json())
        {
            learn_ids(&mut self.ids, rec_body, &live_json);
        }
        let Some(tokens) = ex["tokens"].as_object() else {
            return;
        };
        for (location, desc) in tokens {
            let desc = desc.as_str().unwrap_or_default();
            match location.as_str() {
                "response.body.token" => {
                    let token = live
                        .json()
                        .and_then(|j| j["token"].as_str().map(str::to_owned));
                    match (token, token_id(desc)) {
                        (Some(t), Some(id)) if t.split('.').count() == 3 => {
                            self.tokens.insert(id, t);
                        }
                        (t, _) => self.fail(step, format!("no access token in the answer ({t:?})")),
                    }
                }
                "response.headers.Set-Cookie[0]" => {
                    let Some(token) = live
                        .set_cookies()
                        .iter()
                        .map(|c| Cookie::parse(c))
                        .find(|c| c.name == "refreshToken")
                        .map(|c| c.value)
                    else {
                        self.fail(step, "no refreshToken cookie".into());
                        continue;
                    };
                    let id = token_id(desc).expect("refresh#N");
                    let first_seen_here = desc.contains(&format!("first seen in step '{step}'"));
                    if first_seen_here {
                        if self.refresh_seen.contains(&token) {
                            self.fail(
                                step,
                                format!("{id} should be a new refresh token, got an old one"),
                            );
                        }
                    } else if self.tokens.get(&id) != Some(&token) {
                        // The recording got `id` back again; see DEVIATIONS.
                        if !self.allowed(step, Allow::NewRefreshToken)
                            || self.refresh_seen.contains(&token)
                        {
                            self.fail(step, format!("{id}: expected the same refresh token back"));
                        }
                    }
                    self.refresh_seen.insert(token.clone());
                    self.tokens.insert(id, token);
                }
                "response.body.link" => {
                    let link = live
                        .json()
                        .and_then(|j| j["link"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let prefix = format!("{}/reset-password?token=", self.fake.base_url);
                    let Some(rest) = link.strip_prefix(&prefix) else {
                        self.fail(
                            step,
                            format!("reset link {link:?} does not start with {prefix:?}"),
                        );
                        continue;
                    };
                    let (token, user) = rest.split_once("&userId=").unwrap_or((rest, ""));
                    if token.len() != 64 || !token.chars().all(|c| c.is_ascii_hexdigit()) {
                        self.fail(step, format!("reset token {token:?} is not 64 hex chars"));
                    }
                    self.reset_token = Some(token.to_owned());
                    let rec_link = rec_body["link"].as_str().unwrap_or_default();
                    if let Some((_, rec_user)) = rec_link.split_once("&userId=") {
                        remember_id(&mut self.ids, rec_user, user);
                    }
                }
                _ => {}
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `access#3` / `refresh#1` out of a token description.
fn token_id(desc: &str) -> Option<String> {
    for kind in ["access#", "refresh#"] {
        if let Some(at) = desc.find(kind) {
            let digits: String = desc[at + kind.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !digits.is_empty() {
                return Some(format!("{kind}{digits}"));
            }
        }
    }
    None
}

async fn read_live(resp: reqwest::Response, started: Instant) -> Live {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    let mut chunks = 0;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("body chunk"));
        chunks += 1;
    }
    Live {
        status,
        headers,
        body,
        chunks,
        elapsed: started.elapsed(),
    }
}

fn looks_like_id(s: &str) -> bool {
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    (s.len() == 24 && hex(s))
        || (s.len() == 36
            && s.split('-').map(str::len).eq([8, 4, 4, 4, 12])
            && hex(&s.replace('-', "")))
}

fn remember_id(ids: &mut Vec<(String, String)>, recorded: &str, live: &str) {
    if looks_like_id(recorded)
        && looks_like_id(live)
        && recorded != live
        && !ids.iter().any(|(r, _)| r == recorded)
    {
        ids.push((recorded.to_owned(), live.to_owned()));
    }
}

/// Walks both documents side by side and maps recorded ids to the live ones at the same place.
fn learn_ids(ids: &mut Vec<(String, String)>, recorded: &Value, live: &Value) {
    match (recorded, live) {
        (Value::Object(r), Value::Object(l)) => {
            for (k, rv) in r {
                if let Some(lv) = l.get(k) {
                    learn_ids(ids, rv, lv);
                }
            }
        }
        (Value::Array(r), Value::Array(l)) => {
            for (rv, lv) in r.iter().zip(l) {
                learn_ids(ids, rv, lv);
            }
        }
        (Value::String(r), Value::String(l)) => remember_id(ids, r, l),
        _ => {}
    }
}

/// Key sets of objects down to `max_depth` nested levels (array elements stay at their parent's
/// level); at the top level also the values of `exact` string keys and of booleans.
fn compare_shape(
    rec: &Value,
    live: &Value,
    path: &str,
    depth: usize,
    max_depth: usize,
    errors: &mut Vec<String>,
    exact: &[&str],
) {
    match (rec, live) {
        (Value::Object(r), Value::Object(l)) => {
            let rk: BTreeSet<&String> = r.keys().collect();
            let lk: BTreeSet<&String> = l.keys().collect();
            if rk != lk {
                let missing: Vec<_> = rk.difference(&lk).collect();
                let extra: Vec<_> = lk.difference(&rk).collect();
                errors.push(format!("{path}: keys missing {missing:?}, extra {extra:?}"));
            }
            for (k, rv) in r {
                let Some(lv) = l.get(k) else { continue };
                if depth == 0 {
                    let must_match =
                        (exact.contains(&k.as_str()) && rv.is_string()) || rv.is_boolean();
                    if must_match && rv != lv {
                        errors.push(format!("{path}.{k}: {lv} (recorded {rv})"));
                    }
                }
                if depth < max_depth {
                    compare_shape(
                        rv,
                        lv,
                        &format!("{path}.{k}"),
                        depth + 1,
                        max_depth,
                        errors,
                        exact,
                    );
                }
            }
        }
        (Value::Array(r), Value::Array(l)) => {
            if r.iter().all(Value::is_object) && l.iter().all(Value::is_object) {
                if r.len() != l.len() {
                    errors.push(format!(
                        "{path}: {} elements (recorded {})",
                        l.len(),
                        r.len()
                    ));
                }
                for (i, (rv, lv)) in r.iter().zip(l).enumerate() {
                    compare_shape(
                        rv,
                        lv,
                        &format!("{path}[{i}]"),
                        depth,
                        max_depth,
                        errors,
                        exact,
                    );
                }
            } else if r.len() != l.len() {
                errors.push(format!(
                    "{path}: string list length {} (recorded {})",
                    l.len(),
                    r.len()
                ));
            }
        }
        (r, l)
            if std::mem::discriminant(r) != std::mem::discriminant(l)
                && !r.is_null()
                && !l.is_null() =>
        {
            errors.push(format!(
                "{path}: {l} has another JSON type than recorded {r}"
            ));
        }
        _ => {}
    }
}

fn kind_of(data: &Value) -> String {
    if data["created"] == true {
        "created".into()
    } else if data["final"] == true {
        "final".into()
    } else if data["sync"] == true {
        "sync".into()
    } else {
        data["event"].as_str().unwrap_or("other").to_owned()
    }
}

/// Frame kinds in order, runs of deltas collapsed to one (their number depends on chunking).
fn collapse(frames: &[(String, Value)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, data) in frames {
        let kind = kind_of(data);
        if !(kind == "on_message_delta" && out.last() == Some(&kind)) {
            out.push(kind);
        }
    }
    out
}

fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (
                event,
                serde_json::from_str(&data).unwrap_or(Value::String(data)),
            )
        })
        .collect()
}

struct Cookie {
    raw: String,
    name: String,
    value: String,
    attrs: Vec<(String, String)>,
}

impl Cookie {
    fn parse(raw: &str) -> Cookie {
        let mut parts = raw.split(';');
        let (name, value) = parts
            .next()
            .unwrap_or("")
            .split_once('=')
            .unwrap_or(("", ""));
        let attrs = parts
            .map(|a| {
                let (k, v) = a.trim().split_once('=').unwrap_or((a.trim(), ""));
                (k.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        Cookie {
            raw: raw.to_owned(),
            name: name.trim().to_owned(),
            value: value.to_owned(),
            attrs,
        }
    }

    fn attr(&self, name: &str) -> Option<String> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn has(&self, name: &str) -> bool {
        self.attrs.iter().any(|(k, _)| k == name)
    }

    fn expires_epoch(&self) -> bool {
        self.attr("expires").is_some_and(|e| e.contains("1970"))
    }
}

/// Builds a multipart body with the recorded parts in the recorded order; file parts get
/// deterministic content of the recorded size. Returns the body and each file's bytes.
fn multipart_body(boundary: &str, parts: &Value) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut body = Vec::new();
    let mut files = Vec::new();
    for part in parts.as_array().expect("parts") {
        let name = part["name"].as_str().unwrap_or_default();
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if let Some(filename) = part["filename"].as_str() {
            let ct = part["content_type"]
                .as_str()
                .unwrap_or("application/octet-stream");
            let size = part["size"].as_u64().unwrap_or(0) as usize;
            let content = file_content(ct, size);
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {ct}\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(&content);
            files.push(content);
        } else {
            let value = part["value"].as_str().unwrap_or_default();
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                    .as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, files)
}

fn file_content(content_type: &str, size: usize) -> Vec<u8> {
    let seed: &[u8] = if content_type == "image/png" {
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x02\x00\x00\x00\x02"
    } else {
        b"fixture notes, line of text\n"
    };
    seed.iter().copied().cycle().take(size).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn browser_ua() -> &'static str {
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
}

// ---------------------------------------------------------------------------------------------
// One test per transcript
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_transcript() {
    // The fake skips the real server's 1 s sleep by default; ask for it to check the timing too.
    let opts = FakeLibreChatOptions {
        duplicate_register_delay: Duration::from_secs(1),
        ..Default::default()
    };
    let mut r = Replayer::new("register.json", opts).await;
    for step in r.steps() {
        let live = r.step(&step).await;
        if step == "register same email again" {
            assert!(
                live.elapsed >= Duration::from_secs(1),
                "duplicate answered after {:?}",
                live.elapsed
            );
        }
    }
    // The new user and the 5th-request user; the duplicate and the invalid ones created nothing.
    assert_eq!(r.fake.user_count(), 2);
    assert_eq!(r.fake.register_calls(), r.exchanges.len());
    r.finish();
}

#[tokio::test]
async fn login_transcript() {
    let mut r = Replayer::new("login.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    let email = "login430101559571@example.com";
    assert_eq!(
        r.fake.session_count(email),
        1,
        "only the successful login opened a session"
    );
    // Malformed JSON never reaches the limiter but is still a call.
    assert_eq!(r.fake.login_calls(), 6);
    r.finish();
}

#[tokio::test]
async fn login_limiter_transcript() {
    let mut r = Replayer::new("login-limiter.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    // Five logins succeeded (attempts 1, 3, 6, the other XFF, the XFF chain); each has a session.
    assert_eq!(r.fake.session_count("lim43010410241d@example.com"), 5);
    let distinct: HashSet<&String> = r
        .tokens
        .iter()
        .filter(|(k, _)| k.starts_with("refresh#"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(distinct.len(), 5, "each login issued its own refresh token");
    r.finish();
}

#[tokio::test]
async fn refresh_transcript() {
    let mut r = Replayer::new("refresh.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    assert_eq!(r.fake.refresh_calls(), 7);
    assert_eq!(
        r.fake.session_count("ref43011629beb6@example.com"),
        1,
        "rotation keeps one session"
    );
    r.finish();
}

#[tokio::test]
async fn auth_bearer_transcript() {
    let mut r = Replayer::new("auth-bearer.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    r.finish();
}

#[tokio::test]
async fn logout_transcript() {
    let mut r = Replayer::new("logout.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    assert_eq!(r.fake.session_count("out43013666b4f0@example.com"), 0);
    assert_eq!(r.fake.logout_calls(), 3);
    r.finish();
}

#[tokio::test]
async fn chat_transcript() {
    let mut r = Replayer::new("chat.json", FakeLibreChatOptions::default()).await;
    let mut gate = None;
    for step in r.steps() {
        match step.as_str() {
            "GET /api/agents/chat/stream/<streamId>" => {
                let live = r.step(&step).await;
                // Frames were written one by one, not as one buffered string.
                assert!(
                    live.chunks >= 5,
                    "stream arrived in {} chunk(s)",
                    live.chunks
                );
            }
            "POST second turn (slow prompt) in same conversation" => {
                // The recording aborted a slow model mid-stream; the gate makes that deterministic.
                gate = Some(r.fake.hold_stream_end());
                r.step(&step).await;
            }
            "GET stream of second turn (aborted mid-generation)" => {
                // This stream was open while status/active/abort (the next three steps) ran.
                let ex = r.exchange(&step);
                let request = r.build_request(&ex);
                let reader = tokio::spawn(async move {
                    let started = Instant::now();
                    read_live(request.send().await.expect("open stream"), started).await
                });
                let gate = gate.as_ref().expect("gate set before the second turn");
                gate.reached().await;
                for concurrent in [
                    "GET /api/agents/chat/status/<conversationId> while running",
                    "GET /api/agents/chat/active while running",
                    "POST /api/agents/chat/abort {conversationId}",
                ] {
                    r.step(concurrent).await;
                }
                let live = reader.await.expect("stream reader");
                r.check(&ex, &live);
            }
            "GET /api/agents/chat/status/<conversationId> while running"
            | "GET /api/agents/chat/active while running"
            | "POST /api/agents/chat/abort {conversationId}" => {} // replayed with the stream above
            _ => {
                r.step(&step).await;
            }
        }
    }
    assert_eq!(
        r.fake.conversation_count("chat43036415555d@example.com"),
        0,
        "deleted"
    );
    r.finish();
}

#[tokio::test]
async fn files_transcript() {
    let mut r = Replayer::new("files.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    let uploads = r.fake.uploads();
    let recorded: Vec<Value> = r
        .exchanges
        .iter()
        .filter(|e| {
            e["request"]["body"]
                .get("multipart_parts_in_order")
                .is_some()
        })
        .cloned()
        .collect();
    assert_eq!(uploads.len(), recorded.len());
    for (up, ex) in uploads.iter().zip(&recorded) {
        let parts = &ex["request"]["body"]["multipart_parts_in_order"];
        let names: Vec<&str> = parts
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(up.field_names, names, "field order as sent");
        let (_, files) = multipart_body("b", parts);
        assert_eq!(up.file_bytes, files[0].len() as u64);
        assert_eq!(up.sha256, sha256_hex(&files[0]));
        assert_eq!(
            u64::from(up.status),
            ex["response"]["status"].as_u64().unwrap()
        );
        assert_eq!(up.path, ex["request"]["path"].as_str().unwrap());
    }
    r.finish();
}

#[tokio::test]
async fn password_reset_transcript() {
    let mut r = Replayer::new("password-reset.json", FakeLibreChatOptions::default()).await;
    for step in r.steps() {
        if step == "requestPasswordReset (existing user) after ALLOW_PASSWORD_RESET=true + server restart" {
            // What the recorder did between these steps: flip the env var and restart the server,
            // which empties its in-memory limiters (data stays in Mongo).
            r.fake.set_allow_password_reset(true);
            r.fake.reset_limiters();
        }
        r.step(&step).await;
    }
    // The reset killed the pre-reset session; only the post-reset login's remains.
    assert_eq!(r.fake.session_count("reset43076591a06f@example.com"), 1);
    r.finish();
}

#[tokio::test]
async fn ua_ban_transcript() {
    let mut r = Replayer::new("ua-ban.json", FakeLibreChatOptions::default()).await;
    r.run_all().await;
    assert!(r.fake.is_banned_ip("198.51.100.250"));
    assert!(!r.fake.is_banned_ip("198.51.100.251"));
    assert!(r.fake.is_banned_user("ban1430993696de4@example.com"));
    assert!(!r.fake.is_banned_user("ban24309936907bc@example.com"));
    r.finish();
}

// ---------------------------------------------------------------------------------------------
// Behaviour of the fake that no transcript covers
// ---------------------------------------------------------------------------------------------

async fn login_token(
    fake: &FakeLibreChat,
    http: &reqwest::Client,
    email: &str,
    password: &str,
) -> String {
    let resp = http
        .post(format!("{}/api/auth/login", fake.base_url))
        .header("user-agent", browser_ua())
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A 50 MB file is hashed as it streams in, and a `file` part ahead of `endpoint` is refused.
#[tokio::test]
async fn uploads_stream_and_keep_part_order() {
    let fake = FakeLibreChat::start(FakeLibreChatOptions::default()).await;
    let http = reqwest::Client::new();
    fake.create_user("big@example.com", "Sup3r-Secret-pass!", "Big Upload");
    let token = login_token(&fake, &http, "big@example.com", "Sup3r-Secret-pass!").await;

    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 800; // 50 MiB + change
    let boundary = "----fakeboundary50mb";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"endpoint\"\r\n\r\nFakeAI\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file_id\"\r\n\r\n{}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"message_file\"\r\n\r\ntrue\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: text/plain\r\n\r\n",
        uuid::Uuid::new_v4()
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let mut expected = Sha256::new();
    let block: Vec<u8> = (0..CHUNK).map(|i| b'a' + (i % 26) as u8).collect();
    for _ in 0..CHUNKS {
        expected.update(&block);
    }
    let expected: String = expected
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The body is generated while it is sent: neither side ever holds it whole.
    let pieces = std::iter::once(bytes::Bytes::from(head))
        .chain(std::iter::repeat_n(bytes::Bytes::from(block), CHUNKS))
        .chain(std::iter::once(bytes::Bytes::from(tail)))
        .map(Ok::<_, std::io::Error>);
    let resp = http
        .post(format!("{}/api/files", fake.base_url))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", browser_ua())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let up = fake.uploads().pop().unwrap();
    assert_eq!(up.file_bytes, (CHUNK * CHUNKS) as u64);
    assert_eq!(up.sha256, expected);
    assert_eq!(
        up.field_names,
        ["endpoint", "file_id", "message_file", "file"]
    );

    // Same upload with `file` before `endpoint`: the fileFilter cannot see the endpoint.
    let (body, _) = multipart_body(
        boundary,
        &json!([
            {"name": "file", "filename": "a.txt", "content_type": "text/plain", "size": 10},
            {"name": "endpoint", "value": "FakeAI"},
            {"name": "file_id", "value": uuid::Uuid::new_v4().to_string()},
            {"name": "message_file", "value": "true"},
        ]),
    );
    let resp = http
        .post(format!("{}/api/files", fake.base_url))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", browser_ua())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"message": "Error processing file"})
    );
    assert_eq!(
        fake.uploads().pop().unwrap().field_names,
        ["file", "endpoint", "file_id", "message_file"]
    );
}

/// `go_down` refuses connections, `come_back` answers again on the same port with the same users.
#[tokio::test]
async fn goes_down_and_comes_back() {
    let fake = FakeLibreChat::start(FakeLibreChatOptions::default()).await;
    let http = reqwest::Client::new();
    fake.create_user("up@example.com", "Sup3r-Secret-pass!", "Up Down");
    let health = format!("{}/health", fake.base_url);
    assert_eq!(
        http.get(&health)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "OK"
    );

    fake.go_down().await;
    let err = http.get(&health).send().await.expect_err("down");
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    fake.come_back().await;
    assert_eq!(http.get(&health).send().await.unwrap().status(), 200);
    login_token(&fake, &http, "up@example.com", "Sup3r-Secret-pass!").await;

    fake.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(http.get(&health).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// The gate holds a stream before its final frame; releasing it completes the turn normally.
#[tokio::test]
async fn gate_holds_the_last_frame() {
    let fake = FakeLibreChat::start(FakeLibreChatOptions::default()).await;
    let http = reqwest::Client::new();
    fake.create_user("gate@example.com", "Sup3r-Secret-pass!", "Gate Keeper");
    let token = login_token(&fake, &http, "gate@example.com", "Sup3r-Secret-pass!").await;
    let gate = fake.hold_stream_end();
    let started: Value = http
        .post(format!("{}/api/agents/chat/FakeAI", fake.base_url))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", browser_ua())
        .json(
            &json!({"text": "hold me", "parentMessageId": "00000000-0000-0000-0000-000000000000",
                      "endpoint": "FakeAI", "endpointType": "custom", "model": "fake-model"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stream_id = started["streamId"].as_str().unwrap().to_owned();
    let resp = http
        .get(format!(
            "{}/api/agents/chat/stream/{stream_id}",
            fake.base_url
        ))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", browser_ua())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("on_token_usage") {
        text.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    gate.reached().await;
    // Parked at the gate: the job is still running, so no final frame can have been produced.
    assert_eq!(fake.active_stream_ids(), vec![stream_id.clone()]);
    assert!(!text.contains("\"final\":true"));
    gate.release();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let frames = parse_sse(&text);
    let last = &frames.last().unwrap().1;
    assert_eq!(last["final"], true);
    assert_eq!(
        last["responseMessage"]["content"][0]["text"],
        "echo: hold me"
    );
    assert!(fake.active_stream_ids().is_empty());
    // The finished job is gone for later subscribers.
    let again = http
        .get(format!(
            "{}/api/agents/chat/stream/{stream_id}",
            fake.base_url
        ))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", browser_ua())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}
