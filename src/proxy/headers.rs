//! Header rewriting both ways. Requests lose hop-by-hop headers, the client's credentials
//! (`Cookie`, `Authorization`) and any client-sent forwarding headers; they gain the user's
//! LibreChat token and forwarding headers we vouch for. Responses lose hop-by-hop headers and
//! every `Set-Cookie` (LibreChat's cookies are the BFF's business, never the browser's).

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::{end_user::ClientInfo, librechat::UpstreamToken, telemetry::X_REQUEST_ID};

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

static CLIENT_ONLY: [HeaderName; 9] = [
    header::COOKIE,
    header::AUTHORIZATION,
    header::HOST,
    header::UPGRADE,
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-csrf"),
    header::ORIGIN,
    header::REFERER,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Rewrites the client's request headers in place for LibreChat. `csrf_header` is the configured
/// CSRF header (`csrf.header_name`), which is the BFF's business only, like `X-CSRF`.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    token: Option<&UpstreamToken>,
    client: &ClientInfo,
    request_id: &HeaderValue,
    csrf_header: &HeaderName,
) {
    strip_hop_by_hop(headers);
    for name in CLIENT_ONLY.iter().chain(std::iter::once(csrf_header)) {
        headers.remove(name);
    }
    let forwarded: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-forwarded-"))
        .cloned()
        .collect();
    for name in forwarded {
        headers.remove(name);
    }
    if let Some(token) = token {
        headers.insert(header::AUTHORIZATION, token.authorization.clone());
    }
    // LibreChat trusts one hop and keys limiters and bans on the right-most entry: send exactly
    // the end user's address.
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        ip_header(client.ip),
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        client.proto.clone(),
    );
    if let Some(host) = &client.host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    headers.insert(header::USER_AGENT, client.user_agent.clone());
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// Filters LibreChat's response headers in place for the client.
pub fn filter_response(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.remove(header::SET_COOKIE);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// An address as a header value, formatted on the stack (this runs on every proxied request).
fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    use std::io::Write as _;
    // The longest text of an IPv6 address is 45 bytes.
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let written = write!(cursor, "{ip}").map(|()| cursor.position() as usize);
    written
        .ok()
        .and_then(|n| HeaderValue::from_bytes(&buf[..n]).ok())
        .unwrap_or(HeaderValue::from_static("127.0.0.1"))
}

#[cfg(test)]
mod tests {
    use super::ip_header;

    #[test]
    fn addresses_of_every_length_become_header_values() {
        for ip in [
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "2001:db8:1234:5678:9abc:def0:1234:5678",
        ] {
            let addr: std::net::IpAddr = ip.parse().expect("address");
            assert_eq!(ip_header(addr), addr.to_string().as_str(), "{ip}");
        }
    }
}
