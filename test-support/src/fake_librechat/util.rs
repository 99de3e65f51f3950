//! Small helpers: replies, headers, time, ids, hashing.

use super::*;

pub(super) fn json_reply(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(value.to_string()));
    *resp.status_mut() = status;
    set_header(resp.headers_mut(), "content-type", JSON_CT);
    resp
}

pub(super) fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_owned()));
    *resp.status_mut() = status;
    set_header(resp.headers_mut(), "content-type", HTML_CT);
    resp
}

pub(super) fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// A body written with raw `res.write`: no Content-Type, chunked transfer encoding.
pub(super) fn raw_chunked(status: StatusCode, body: String) -> Response<Body> {
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(Bytes::from(body)) });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    resp
}

pub(super) fn redirect_to_login() -> Response<Body> {
    let mut resp = Response::new(Body::from("Found. Redirecting to /login"));
    *resp.status_mut() = StatusCode::FOUND;
    set_header(resp.headers_mut(), "location", "/login");
    set_header(
        resp.headers_mut(),
        "content-type",
        "text/plain; charset=utf-8",
    );
    resp
}

/// v0.8.7 answers unknown `/api/...` routes with its API 404 handler (recorded for
/// `GET /api/auth/refresh`), not with the SPA page.
pub(super) fn endpoint_not_found() -> Response<Body> {
    json_reply(
        StatusCode::NOT_FOUND,
        &json!({"message": "Endpoint not found"}),
    )
}

/// Any non-API path gets the client's index.html.
pub(super) fn sse_frame(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

pub(super) fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

pub(super) fn append_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.append(name, value);
    }
}

pub(super) fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

pub(super) fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
    }
    out
}

/// Express with `trust proxy` 1: the right-most `X-Forwarded-For` entry when the header is there,
/// else the socket peer; port stripped and IPv6 reduced to its /56 like `removePorts`.
pub(super) fn client_ip(headers: &HeaderMap, peer: SocketAddr) -> String {
    let forwarded: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    match forwarded.last() {
        Some(last) => ip_key(last),
        None => ip_key(&peer.ip().to_string()),
    }
}

pub(super) fn ip_key(raw: &str) -> String {
    let raw = raw.trim();
    let ip = raw
        .parse::<IpAddr>()
        .ok()
        .or_else(|| raw.parse::<SocketAddr>().ok().map(|s| s.ip()));
    match ip {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let seg = v6.segments();
                let masked = Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3] & 0xff00, 0, 0, 0, 0);
                format!("{masked}/56")
            }
        },
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => raw.to_owned(),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `Date.toISOString()`: `2026-11-22T10:23:30.237Z`.
pub(super) fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

pub(super) fn uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(super) fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Passwords are only compared; a digest keeps them out of any debug output.
pub(super) fn hash_password(password: &str) -> String {
    sha256_hex(password.as_bytes())
}
