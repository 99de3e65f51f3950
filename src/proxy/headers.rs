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
/// too) unless `vouched` (a header the BFF itself sends on: a client cannot have it dropped).
/// One pass over the names present, then removals of only those: a request carries a handful of
/// headers, and this runs twice per proxied request.
fn strip(
    headers: &mut HeaderMap,
    doomed: impl Fn(&HeaderName) -> bool,
    vouched: impl Fn(&HeaderName) -> bool,
) {
    // The names to remove; on the stack for the usual few (no allocation per request).
    let mut doomed_names = Names::default();
    let mut connection = false;
    for name in headers.keys() {
        if doomed(name) {
            connection |= name == header::CONNECTION;
            doomed_names.push(name.clone());
        }
    }
    if connection {
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `keep-alive`, what browsers and Node send, is hop-by-hop anyway: no parse.
            .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok());
        for name in named {
            if !doomed(&name) && !vouched(&name) {
                doomed_names.push(name);
            }
        }
    }
    for name in doomed_names.iter() {
        headers.remove(name);
    }
}

/// A few header names on the stack, any more on the heap.
#[derive(Default)]
struct Names {
    few: [Option<HeaderName>; 8],
    len: usize,
    more: Vec<HeaderName>,
}

impl Names {
    fn push(&mut self, name: HeaderName) {
        match self.few.get_mut(self.len) {
            Some(slot) => *slot = Some(name),
            None => self.more.push(name),
        }
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = &HeaderName> {
        self.few.iter().flatten().chain(&self.more)
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Rewrites the client's request headers in place for LibreChat. `csrf_header` is the configured
/// CSRF header (`csrf.header_name`), which is the BFF's business only, like `X-CSRF`.
/// `request_id`: the id to send when the request carries none yet (the edge sets it on every
/// request of the main listener). `Host` is left for the pool, which always sets LibreChat's.
/// `Connection` cannot name away the `User-Agent` and request id the BFF vouches for.
///
/// A header the BFF sets anyway is not removed first (an insert replaces every value of it);
/// one it keeps (the client's single browser `User-Agent`, the edge's request id) is not set
/// again: each costs a hash lookup on every proxied request.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    token: Option<&UpstreamToken>,
    client: &ClientInfo,
    request_id: Option<&HeaderValue>,
    csrf_header: &HeaderName,
) {
    strip(
        headers,
        |name| {
            if is_hop_by_hop(name) || name == csrf_header {
                return true;
            }
            if *name == header::AUTHORIZATION {
                return token.is_none();
            }
            if *name == header::HOST {
                return false;
            }
            if CLIENT_ONLY.contains(name) {
                return true;
            }
            let set_below = *name == X_FORWARDED_FOR
                || *name == X_FORWARDED_PROTO
                || (*name == X_FORWARDED_HOST && client.host.is_some());
            !set_below && name.as_str().starts_with("x-forwarded-")
        },
        |name| *name == header::USER_AGENT || name == X_REQUEST_ID,
    );
    // The headers below, in one allocation.
    headers.reserve(6);
    if let Some(token) = token {
        headers.insert(header::AUTHORIZATION, token.authorization.clone());
    }
    // LibreChat trusts one hop and keys limiters and bans on the right-most entry: send exactly
    // the end user's address.
    headers.insert(X_FORWARDED_FOR.clone(), ip_header(client.ip));
    headers.insert(X_FORWARDED_PROTO.clone(), client.proto.clone());
    if let Some(host) = &client.host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    if client.user_agent_substituted {
        headers.insert(header::USER_AGENT, client.user_agent.clone());
    }
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID.clone(), id.clone());
    }
}

/// Filters LibreChat's response headers in place for the client. (The edge sets `X-Request-Id`
/// on every response, LibreChat's included.)
pub fn filter_response(headers: &mut HeaderMap) {
    strip(
        headers,
        |name| is_hop_by_hop(name) || name == header::SET_COOKIE,
        |_| false,
    );
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

    use axum::http::{HeaderMap, HeaderName, HeaderValue};

    fn client(user_agent_substituted: bool) -> crate::end_user::ClientInfo {
        crate::end_user::ClientInfo {
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            user_agent: HeaderValue::from_static("Mozilla/5.0 (X11) Firefox/1"),
            user_agent_substituted,
            proto: HeaderValue::from_static("https"),
            host: None,
        }
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        left
    }

    #[test]
    fn every_client_only_and_hop_by_hop_header_goes_however_many_there_are() {
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
            "x-hop-2",
            "accept",
            "content-type",
            "x-keep",
        ] {
            headers.append(HeaderName::from_static(name), v.clone());
        }
        headers.append("cookie", v.clone());
        headers.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        headers.insert(
            "connection",
            HeaderValue::from_static("x-hop, Keep-Alive, close,, X-Hop-2"),
        );
        let id = HeaderValue::from_static("req-1");
        rewrite_request(
            &mut headers,
            None,
            &client(true),
            Some(&id),
            &HeaderName::from_static("x-my-csrf"),
        );
        assert_eq!(
            names(&headers),
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
        // Replaced, every value of it: exactly the end user's address.
        let xff: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["127.0.0.1"]);
        assert_eq!(headers["x-request-id"], "req-1");
        assert_eq!(headers["user-agent"], "Mozilla/5.0 (X11) Firefox/1");

        let mut res = HeaderMap::new();
        res.append("set-cookie", v.clone());
        res.append("set-cookie", v.clone());
        res.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-upstream-hop"),
        );
        res.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        res.insert("x-upstream-hop", v.clone());
        res.insert("content-type", v.clone());
        filter_response(&mut res);
        assert_eq!(names(&res), ["content-type"]);
    }

    #[test]
    fn the_callers_credentials_are_replaced_and_what_the_bff_vouches_for_stays() {
        let token = crate::librechat::UpstreamToken {
            authorization: HeaderValue::from_static("Bearer librechat"),
            exp: 0,
            generation: 1,
        };
        let mut headers = HeaderMap::new();
        headers.append("authorization", HeaderValue::from_static("Bearer identity"));
        headers.append("authorization", HeaderValue::from_static("Basic eA=="));
        headers.insert(
            "user-agent",
            HeaderValue::from_static("Mozilla/5.0 (X11) Firefox/1"),
        );
        headers.insert("x-request-id", HeaderValue::from_static("edge-id"));
        headers.insert("host", HeaderValue::from_static("bff.example"));
        // A hostile `Connection` cannot drop what LibreChat must see.
        headers.insert(
            "connection",
            HeaderValue::from_static("user-agent, x-request-id, authorization, x-forwarded-for"),
        );
        rewrite_request(
            &mut headers,
            Some(&token),
            &client(false),
            None,
            &HeaderName::from_static("x-csrf"),
        );
        let auth: Vec<_> = headers.get_all("authorization").iter().collect();
        assert_eq!(auth, ["Bearer librechat"]);
        assert_eq!(headers["user-agent"], "Mozilla/5.0 (X11) Firefox/1");
        assert_eq!(headers["x-request-id"], "edge-id");
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        // Left for the pool, which replaces it with LibreChat's (see `pool`'s tests).
        assert_eq!(headers["host"], "bff.example");
        assert!(headers.get("connection").is_none());

        // Without a token the caller's credentials go, every value.
        let mut headers = HeaderMap::new();
        headers.append("authorization", HeaderValue::from_static("Bearer identity"));
        headers.append("authorization", HeaderValue::from_static("Basic eA=="));
        rewrite_request(
            &mut headers,
            None,
            &client(false),
            None,
            &HeaderName::from_static("x-csrf"),
        );
        assert!(headers.get("authorization").is_none());
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
