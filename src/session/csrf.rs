//! CSRF rule for cookie-authenticated requests: unsafe methods carry the configured header
//! (`X-CSRF: 1` by default; a cross-site form cannot set it), and an `Origin`, when present, is
//! allowlisted or the request's own host. Bearer requests are exempt: no ambient credential.

use std::collections::HashSet;

use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method};

use crate::{config::CsrfConfig, error::ApiError};

#[derive(Debug, Clone)]
pub struct CsrfPolicy {
    header_name: HeaderName,
    header_value: HeaderValue,
    allowed_origins: HashSet<String>,
}

impl CsrfPolicy {
    /// Built once at start-up from validated config.
    pub fn new(cfg: &CsrfConfig) -> Self {
        Self {
            header_name: HeaderName::from_bytes(cfg.header_name.as_bytes())
                .unwrap_or_else(|_| HeaderName::from_static("x-csrf")),
            header_value: HeaderValue::from_str(&cfg.header_value)
                .unwrap_or_else(|_| HeaderValue::from_static("1")),
            allowed_origins: cfg
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn allowed_origins(&self) -> impl Iterator<Item = &String> {
        self.allowed_origins.iter()
    }

    /// The full rule, for requests authenticated by the session cookie.
    pub fn check_cookie_request(&self, parts: &Parts) -> Result<(), ApiError> {
        if is_safe(&parts.method) {
            return Ok(());
        }
        if parts.headers.get(&self.header_name) != Some(&self.header_value) {
            return Err(ApiError::Csrf(
                "This request needs the CSRF header (see csrf.header_name).",
            ));
        }
        self.check_origin(&parts.headers)
    }

    /// For clients that cannot send the header (LibreChat's web UI): an unsafe method needs an
    /// `Origin` that is allowlisted or the request's own host — browsers send one on every
    /// non-GET fetch — and, when the browser says where the request comes from
    /// (`Sec-Fetch-Site`), it must be `same-origin`.
    pub fn check_same_origin(&self, parts: &Parts) -> Result<(), ApiError> {
        if is_safe(&parts.method) {
            return Ok(());
        }
        if let Some(site) = parts.headers.get("sec-fetch-site") {
            if site.as_bytes() != b"same-origin" {
                return Err(ApiError::Csrf("Only same-origin requests may change data."));
            }
        }
        if !parts.headers.contains_key(header::ORIGIN) {
            return Err(ApiError::Csrf("This request needs an Origin header."));
        }
        self.check_origin(&parts.headers)
    }

    /// The origin half alone (login and session exchange: no cookie yet, but a cross-site page
    /// must not be able to plant a session).
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin
            .to_str()
            .map_err(|_| ApiError::Csrf("The Origin header is not valid."))?
            .to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) || same_host(&origin, headers) {
            return Ok(());
        }
        Err(ApiError::Csrf("The request's Origin is not allowed."))
    }
}

/// Only these need neither the header nor an Origin check. TRACE is not among them: the proxy
/// refuses it (405), and no method outside this list may skip the rule.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A same-origin request: the Origin's host[:port] is the Host the client addressed.
fn same_host(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_head_and_options_are_safe() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(is_safe(&m), "{m}");
        }
        let propfind = Method::from_bytes(b"PROPFIND").expect("method");
        for m in [
            Method::TRACE,
            Method::CONNECT,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            propfind,
        ] {
            assert!(!is_safe(&m), "{m}");
        }
    }
}
