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

/// Removes every header `doomed` picks, plus the headers named in `Connection` (hop-by-hop
/// too). One pass over the names present, then removals of only those: a request carries a
/// handful of headers, and this runs twice per proxied request.
fn strip(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    // The names to remove; on the stack for the usual few (no allocation per request).
    let mut few: [Option<HeaderName>; 8] = Default::default();
    let mut more: Vec<HeaderName> = Vec::new();
    let mut found = 0;
    let mut connection = false;
    for name in headers.keys() {
        if doomed(name) {
            connection |= name == header::CONNECTION;
            match few.get_mut(found) {
                Some(slot) => *slot = Some(name.clone()),
                None => more.push(name.clone()),
            }
            found += 1;
        }
    }
    if connection {
        more.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
        );
    }
    for name in few.iter().flatten().chain(&more) {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
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
    strip(headers, |name| {
        is_hop_by_hop(name)
            || CLIENT_ONLY.contains(name)
            || name == csrf_header
            || name.as_str().starts_with("x-forwarded-")
    });
    // The headers below, in one allocation.
    headers.reserve(6);
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

/// Filters LibreChat's response headers in place for the client. (The edge sets `X-Request-Id`
/// on every response, LibreChat's included.)
pub fn filter_response(headers: &mut HeaderMap) {
    strip(headers, |name| {
        is_hop_by_hop(name) || name == header::SET_COOKIE
    });
}

/// An address as a header value, formatted without `fmt` for IPv4 (this runs on every proxied
/// request), on the stack for IPv6.
fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    use std::io::Write as _;
    let formatted = match ip {
        std::net::IpAddr::V4(v4) => {
            // "255.255.255.255" is 15 bytes.
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let digits = [octet / 100, octet / 10 % 10, octet % 10];
                let skip = if octet >= 100 {
                    0
                } else if octet >= 10 {
                    1
                } else {
                    2
                };
                for d in &digits[skip..] {
                    buf[n] = b'0' + d;
                    n += 1;
                }
            }
            HeaderValue::from_bytes(&buf[..n]).ok()
        }
        std::net::IpAddr::V6(_) => {
            // The longest text of an IPv6 address is 45 bytes.
            let mut buf = [0u8; 64];
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let written = write!(cursor, "{ip}").map(|()| cursor.position() as usize);
            written
                .ok()
                .and_then(|n| HeaderValue::from_bytes(&buf[..n]).ok())
        }
    };
    formatted.unwrap_or(HeaderValue::from_static("127.0.0.1"))
}

#[cfg(test)]
mod tests {
    use super::{filter_response, ip_header, rewrite_request};

    #[test]
    fn every_client_only_and_hop_by_hop_header_goes_however_many_there_are() {
        use axum::http::{HeaderMap, HeaderName, HeaderValue};
        let mut headers = HeaderMap::new();
        let v = HeaderValue::from_static("v");
        // More doomed names than the stack holds, one named by `Connection`, two values of one.
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "cookie",
            "authorization",
            "host",
            "forwarded",
            "x-real-ip",
            "x-csrf",
            "origin",
            "referer",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-my-csrf",
            "x-hop",
            "accept",
            "content-type",
            "x-keep",
        ] {
            headers.append(HeaderName::from_static(name), v.clone());
        }
        headers.append("cookie", v.clone());
        headers.insert("connection", HeaderValue::from_static("x-hop, Keep-Alive"));
        let client = crate::end_user::ClientInfo {
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            user_agent: HeaderValue::from_static("Mozilla/5.0"),
            proto: HeaderValue::from_static("https"),
            host: None,
        };
        let id = HeaderValue::from_static("req-1");
        rewrite_request(
            &mut headers,
            None,
            &client,
            &id,
            &HeaderName::from_static("x-my-csrf"),
        );
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept",
                "content-type",
                "user-agent",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-keep",
                "x-request-id"
            ]
        );
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");

        let mut res = HeaderMap::new();
        res.append("set-cookie", v.clone());
        res.append("set-cookie", v.clone());
        res.insert("connection", HeaderValue::from_static("x-upstream-hop"));
        res.insert("x-upstream-hop", v.clone());
        res.insert("content-type", v.clone());
        filter_response(&mut res);
        let mut left: Vec<&str> = res.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn addresses_of_every_length_become_header_values() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "100.20.3.255",
            "9.80.255.7",
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
