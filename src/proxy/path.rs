//! Which `/api/chat/*` paths may be forwarded. The raw (still percent-encoded) path is checked,
//! because LibreChat decodes it again: `%2e%2e` or `%2f` must not become a traversal there.

use crate::error::ApiError;

/// The part after `/api/chat/`, validated; it is forwarded verbatim as `/api/{rest}`.
pub fn checked_rest<'a>(raw_path: &'a str, deny: &[String]) -> Result<&'a str, ApiError> {
    let rest = raw_path
        .strip_prefix("/api/chat/")
        .ok_or(ApiError::NotFound)?;
    if rest.is_empty() {
        return Err(ApiError::NotFound);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        // A trailing slash leaves one empty last segment; any other empty one is `//`.
        let trailing = i + 1 == segments.len() && i > 0 && segment.is_empty();
        if !trailing && !segment_ok(segment) {
            return Err(ApiError::BadPath);
        }
    }
    let lower = rest.to_ascii_lowercase();
    // The BFF owns authentication: LibreChat's own auth routes are never reachable.
    if lower == "auth" || lower.starts_with("auth/") {
        return Err(ApiError::NotFound);
    }
    if deny
        .iter()
        .any(|p| lower.starts_with(&p.to_ascii_lowercase()))
    {
        return Err(ApiError::NotFound);
    }
    Ok(rest)
}

fn segment_ok(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let decoded = match percent_decode(segment) {
        Some(d) => d,
        None => return false,
    };
    if decoded == "." || decoded == ".." {
        return false;
    }
    !decoded
        .bytes()
        .any(|b| b == b'/' || b == b'\\' || b == 0 || b.is_ascii_control())
}

/// Percent-decodes one segment (repeatedly, so `%252e` cannot smuggle a dot through a second
/// decoder); `None` for malformed escapes.
fn percent_decode(s: &str) -> Option<String> {
    let mut current = s.to_owned();
    for _ in 0..3 {
        if !current.contains('%') {
            return Some(current);
        }
        let bytes = current.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = bytes.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                out.push(v);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        current = String::from_utf8_lossy(&out).into_owned();
    }
    // Still encoded after three rounds: refuse rather than guess.
    (!current.contains('%')).then_some(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_variants_are_refused() {
        for p in [
            "/api/chat/../auth/login",
            "/api/chat/convos/..",
            "/api/chat/%2e%2e/x",
            "/api/chat/%2E%2e/x",
            "/api/chat/convos%2f..%2fauth",
            "/api/chat//convos",
            "/api/chat/convos/%5c..",
            "/api/chat/convos\\..",
            "/api/chat/convos/%00",
            "/api/chat/./convos",
            "/api/chat/%252e%252e/x",
            "/api/chat/bad%zz",
        ] {
            assert!(
                matches!(checked_rest(p, &[]), Err(ApiError::BadPath)),
                "{p} must be refused"
            );
        }
    }

    #[test]
    fn auth_and_denied_prefixes_are_not_found() {
        assert!(matches!(
            checked_rest("/api/chat/auth/logout", &[]),
            Err(ApiError::NotFound)
        ));
        assert!(matches!(
            checked_rest("/api/chat/AUTH/refresh", &[]),
            Err(ApiError::NotFound)
        ));
        let deny = vec!["admin/".to_owned()];
        assert!(matches!(
            checked_rest("/api/chat/admin/x", &deny),
            Err(ApiError::NotFound)
        ));
    }

    #[test]
    fn ordinary_paths_pass_verbatim() {
        assert_eq!(
            checked_rest("/api/chat/agents/chat/stream/abc", &[]).ok(),
            Some("agents/chat/stream/abc")
        );
        assert_eq!(
            checked_rest("/api/chat/files/images", &[]).ok(),
            Some("files/images")
        );
        assert_eq!(
            checked_rest("/api/chat/convos/a%20b", &[]).ok(),
            Some("convos/a%20b")
        );
    }
}
