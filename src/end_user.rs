//! Who the end user is on the network: their address (behind trusted proxies) and a User-Agent
//! LibreChat will accept. LibreChat keys its limiters and bans on the address we forward, and
//! bans user + address for a non-browser User-Agent, so both matter for every upstream call.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::ConnectInfo,
    http::{header, request::Parts, HeaderMap, HeaderValue},
};
use ipnet::IpNet;

use crate::error::ApiError;

/// The end user's address and the User-Agent to send upstream on their behalf.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub user_agent: HeaderValue,
    /// `user_agent` is not the request's own single `User-Agent` (the browser substitute, or a
    /// caller that is not a request): a forwarded request must have it set.
    pub user_agent_substituted: bool,
    /// Scheme and host the client addressed (for `X-Forwarded-Proto/Host`).
    pub proto: HeaderValue,
    pub host: Option<HeaderValue>,
}

/// Resolves the end user behind a request: which peers' forwarding headers are believed, and
/// the browser User-Agent LibreChat gets when the client's is not one.
#[derive(Debug, Clone)]
pub struct EndUsers {
    trusted_proxies: Vec<IpNet>,
    browser_user_agent: HeaderValue,
}

/// The socket peer of a request (axum's `ConnectInfo`, which the server or the warm lane puts
/// on every request reaching the router).
pub fn peer(parts: &Parts) -> Result<IpAddr, ApiError> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .ok_or(ApiError::Internal)
}

impl EndUsers {
    pub fn new(trusted_proxies: Vec<IpNet>, browser_user_agent: HeaderValue) -> Self {
        Self {
            trusted_proxies,
            browser_user_agent,
        }
    }

    /// The [`EndUser`] behind this request, as the identity service sees them.
    pub fn end_user_of(&self, parts: &Parts) -> Result<EndUser, ApiError> {
        Ok(EndUser {
            ip: self.client_ip(peer(parts)?, &parts.headers),
            user_agent: parts.headers.get(header::USER_AGENT).cloned(),
        })
    }

    /// The end user's address: the socket peer, or behind `server.trusted_proxies` the
    /// right-most untrusted `X-Forwarded-For` entry.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if is_trusted(peer, &self.trusted_proxies) {
            end_user_ip(peer, headers, &self.trusted_proxies)
        } else {
            peer.to_canonical()
        }
    }

    pub fn client_info(&self, peer: IpAddr, headers: &HeaderMap) -> ClientInfo {
        let trusted = is_trusted(peer, &self.trusted_proxies);
        let ip = self.client_ip(peer, headers);
        let mut agents = headers.get_all(header::USER_AGENT).iter();
        let clients = agents
            .next()
            .filter(|ua| ua.to_str().is_ok_and(is_browser_user_agent));
        let (user_agent, user_agent_substituted) = match clients {
            Some(ua) if agents.next().is_none() => (ua.clone(), false),
            // A second value is not forwarded either: LibreChat sees exactly one.
            Some(ua) => (ua.clone(), true),
            None => (self.browser_user_agent.clone(), true),
        };
        let proto = trusted
            .then(|| headers.get("x-forwarded-proto").cloned())
            .flatten()
            .unwrap_or(HeaderValue::from_static("http"));
        let host = trusted
            .then(|| headers.get("x-forwarded-host").cloned())
            .flatten()
            .or_else(|| headers.get(header::HOST).cloned());
        ClientInfo {
            ip,
            user_agent,
            user_agent_substituted,
            proto,
            host,
        }
    }
}

/// The end user as the identity service sees them: their address and the User-Agent they sent
/// (verbatim, or none; not the browser substitute LibreChat gets). Forwarded on sign-in and
/// refresh so the identity service can log, limit and alert per real client.
#[derive(Debug, Clone)]
pub struct EndUser {
    pub ip: IpAddr,
    pub user_agent: Option<HeaderValue>,
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
/// right were appended by our own proxies; anything to its left is client-controlled).
fn end_user_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut candidate = peer;
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_ip(entry.trim()) else {
            break;
        };
        candidate = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    candidate.to_canonical()
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = s.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    s.trim_start_matches('[')
        .split(']')
        .next()
        .and_then(|v| v.parse().ok())
}

/// Whether LibreChat's `ua-parser-js` check would see a browser: a `Mozilla/` agent naming a
/// browser engine. `okhttp/…`, `curl/…`, `python-requests/…` and empty agents are not.
pub fn is_browser_user_agent(ua: &str) -> bool {
    const BROWSERS: [&str; 8] = [
        "Chrome/", "Firefox/", "Safari/", "Edg/", "OPR/", "MSIE ", "Trident/", "CriOS/",
    ];
    ua.starts_with("Mozilla/") && BROWSERS.iter().any(|b| ua.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(v).expect("value"));
        h
    }

    #[test]
    fn right_most_untrusted_forwarded_address_wins() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.5".parse().expect("ip");
        let ip = end_user_ip(peer, &xff("6.6.6.6, 203.0.113.7, 10.1.2.3"), &trusted);
        assert_eq!(ip, "203.0.113.7".parse::<IpAddr>().expect("ip"));
        let ip = end_user_ip(peer, &HeaderMap::new(), &trusted);
        assert_eq!(ip, peer);
        let ip = end_user_ip(peer, &xff("[2001:db8::1]:443"), &trusted);
        assert_eq!(ip, "2001:db8::1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn only_a_single_browser_agent_is_the_clients_to_forward() {
        let users = EndUsers::new(vec![], HeaderValue::from_static("Mozilla/5.0 Chrome/1"));
        let peer: IpAddr = "192.0.2.1".parse().expect("ip");
        let firefox = HeaderValue::from_static("Mozilla/5.0 (X11) Firefox/1");
        let mut h = HeaderMap::new();
        let info = users.client_info(peer, &h);
        assert!(info.user_agent_substituted);
        assert_eq!(info.user_agent, "Mozilla/5.0 Chrome/1");
        h.insert(header::USER_AGENT, HeaderValue::from_static("curl/8"));
        let info = users.client_info(peer, &h);
        assert!(info.user_agent_substituted);
        assert_eq!(info.user_agent, "Mozilla/5.0 Chrome/1");
        h.insert(header::USER_AGENT, firefox.clone());
        let info = users.client_info(peer, &h);
        assert!(!info.user_agent_substituted);
        assert_eq!(info.user_agent, firefox);
        // Two values: LibreChat must see one, so it is set (to the first, a browser).
        h.append(header::USER_AGENT, HeaderValue::from_static("curl/8"));
        let info = users.client_info(peer, &h);
        assert!(info.user_agent_substituted);
        assert_eq!(info.user_agent, firefox);
    }

    #[test]
    fn browser_agents_are_told_apart() {
        assert!(is_browser_user_agent(
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15"
        ));
        assert!(!is_browser_user_agent("okhttp/4.12.0"));
        assert!(!is_browser_user_agent("curl/8.5.0"));
        assert!(!is_browser_user_agent(""));
        assert!(!is_browser_user_agent("Mozilla/5.0"));
    }
}
