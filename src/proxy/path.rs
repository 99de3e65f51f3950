//! Which `/api/chat/*` paths may be forwarded. The raw (still percent-encoded) path is checked,
//! because LibreChat decodes it again: `%2e%2e` or `%2f` must not become a traversal there.
//! Denials compare the decoded, lower-cased path (`%61uth`, `Auth` are `auth`: Express matches
//! routes case-insensitively); the path LibreChat receives is still the raw one.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::error::ApiError;

/// LibreChat v0.8.7 routes no user may reach through the BFF, whatever `deny_prefixes` says,
/// because they would break the mapping between a BFF user and their LibreChat account (see the
/// README's "Proxy policy"). Each entry is a sequence of leading path segments.
pub const BUILT_IN_DENIALS: &[(&[&str], &str)] = &[
    (
        &["auth"],
        "sign-in, sign-out, token refresh, password reset and 2FA enrolment (auth/2fa/*) are the BFF's",
    ),
    (&["user", "delete"], "DELETE /api/user/delete deletes the LibreChat account"),
    (
        &["user", "email"],
        "email change (newer builds): the BFF signs in to LibreChat with the user's email",
    ),
    (
        &["admin"],
        "LibreChat's admin API (config, grants, groups, roles, skills, users, audit-log)",
    ),
    (
        &["api-keys"],
        "LibreChat API keys would authenticate as the user without the BFF",
    ),
];

/// The part after `/api/chat/`, validated; it is forwarded verbatim as `/api/{rest}`.
pub fn checked_rest<'a>(raw_path: &'a str, deny: &[String]) -> Result<&'a str, ApiError> {
    let rest = raw_path
        .strip_prefix("/api/chat/")
        .ok_or(ApiError::NotFound)?;
    checked_api_path(rest, deny)
}

/// A path below LibreChat's `/api/` (`rest` has no leading slash), validated and checked
/// against the built-in and configured denials.
pub fn checked_api_path<'a>(rest: &'a str, deny: &[String]) -> Result<&'a str, ApiError> {
    let decoded = decoded_segments(rest)?;
    let denied_built_in = BUILT_IN_DENIALS.iter().any(|(prefix, _)| {
        prefix.len() <= decoded.len() && prefix.iter().zip(&decoded).all(|(p, d)| p == d)
    });
    if denied_built_in {
        return Err(ApiError::NotFound);
    }
    // Configured prefixes are plain string prefixes of the decoded path (no segment rule, as
    // documented: "agents/tools" also covers "agents/tools2").
    if deny.is_empty() {
        return Ok(rest);
    }
    let path = decoded.join("/");
    if deny.iter().any(|p| {
        let prefix = checked_prefix(p);
        !prefix.is_empty() && path.starts_with(&prefix)
    }) {
        return Err(ApiError::NotFound);
    }
    Ok(rest)
}

/// The decoded, lower-cased segments of a relative path (no leading slash); a trailing slash
/// leaves one empty last segment. Dot segments, `//` and hidden separators are refused.
pub fn decoded_segments(rest: &str) -> Result<Vec<Cow<'_, str>>, ApiError> {
    if rest.is_empty() {
        return Err(ApiError::NotFound);
    }
    let count = rest.split('/').count();
    let mut decoded = Vec::with_capacity(count);
    for (i, segment) in rest.split('/').enumerate() {
        // A trailing slash leaves one empty last segment; any other empty one is `//`.
        let trailing = i + 1 == count && i > 0 && segment.is_empty();
        if trailing {
            decoded.push(Cow::Borrowed(""));
            continue;
        }
        match checked_segment(segment) {
            Some(d) => decoded.push(d),
            None => return Err(ApiError::BadPath),
        }
    }
    Ok(decoded)
}

/// A configured deny prefix, decoded and lower-cased like the paths it is compared with.
fn checked_prefix(prefix: &str) -> String {
    prefix
        .split('/')
        .map(|s| percent_decode(s).unwrap_or_else(|| s.to_owned()))
        .collect::<Vec<_>>()
        .join("/")
        .to_ascii_lowercase()
}

/// The decoded, lower-cased segment, unless it is empty, a dot segment, or hides a slash,
/// backslash, NUL or control byte (also percent-encoded). Borrowed when there is nothing to
/// decode or lower (the common case: this runs on every proxied request).
fn checked_segment(segment: &str) -> Option<Cow<'_, str>> {
    if segment.is_empty() {
        return None;
    }
    let plain = !segment.bytes().any(|b| b == b'%' || b.is_ascii_uppercase());
    let decoded = if plain {
        Cow::Borrowed(segment)
    } else {
        Cow::Owned(percent_decode(segment)?.to_ascii_lowercase())
    };
    if decoded == "." || decoded == ".." {
        return None;
    }
    let bad = decoded
        .bytes()
        .any(|b| b == b'/' || b == b'\\' || b == 0 || b.is_ascii_control());
    (!bad).then_some(decoded)
}

/// Percent-decodes one segment (repeatedly, so `%252e` cannot smuggle a dot through a second
/// decoder); `None` for malformed escapes.
fn percent_decode(s: &str) -> Option<String> {
    let mut current = s.to_owned();
    for _ in 0..3 {
        if !current.contains('%') {
            return Some(current);
        }
        // `percent_decode_str` passes a malformed escape through as is; refuse it instead.
        if !well_formed_escapes(&current) {
            return None;
        }
        current = percent_decode_str(&current)
            .decode_utf8_lossy()
            .into_owned();
    }
    // Still encoded after three rounds: refuse rather than guess.
    (!current.contains('%')).then_some(current)
}

/// Whether every `%` starts an escape of two hex digits.
fn well_formed_escapes(s: &str) -> bool {
    s.split('%').skip(1).all(|rest| {
        rest.as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
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
    fn malformed_escapes_are_refused() {
        for p in [
            "/api/chat/x%2",
            "/api/chat/x%",
            "/api/chat/%%41uth",
            "/api/chat/%g1",
            "/api/chat/convos/%25zz",
            "/api/chat/%25252e",
        ] {
            assert!(
                matches!(checked_rest(p, &[]), Err(ApiError::BadPath)),
                "{p} must be refused"
            );
        }
    }

    #[test]
    fn auth_and_denied_prefixes_are_not_found() {
        for p in [
            "/api/chat/auth/logout",
            "/api/chat/auth",
            "/api/chat/auth/",
            "/api/chat/AUTH/refresh",
            "/api/chat/Auth/login",
            "/api/chat/%61uth/logout",
            "/api/chat/%2561uth/logout",
            "/api/chat/auth/2fa/enable",
            "/api/chat/user/delete",
            "/api/chat/User/Delete/",
            "/api/chat/user/%64elete",
            "/api/chat/user/email/change",
            "/api/chat/admin",
            "/api/chat/admin/users",
            "/api/chat/%41dmin/config",
            "/api/chat/api-keys",
            "/api/chat/API-KEYS/abc",
            "/api/chat/api%2Dkeys",
        ] {
            assert!(
                matches!(checked_rest(p, &[]), Err(ApiError::NotFound)),
                "{p} must be refused"
            );
        }
        let deny = vec!["agents/tools".to_owned(), "Share/".to_owned()];
        for p in [
            "/api/chat/agents/tools",
            "/api/chat/agents/Tools/x",
            "/api/chat/%61gents/tools",
            "/api/chat/share/abc",
        ] {
            assert!(
                matches!(checked_rest(p, &deny), Err(ApiError::NotFound)),
                "{p} must be refused"
            );
        }
        assert_eq!(
            checked_rest("/api/chat/agents/chat/x", &deny).ok(),
            Some("agents/chat/x")
        );
    }

    #[test]
    fn neighbours_of_denied_routes_pass() {
        for (p, rest) in [
            ("/api/chat/user", "user"),
            ("/api/chat/user/plugins", "user/plugins"),
            ("/api/chat/authors", "authors"),
            ("/api/chat/keys", "keys"),
            ("/api/chat/convos/auth", "convos/auth"),
            ("/api/chat/adminx", "adminx"),
        ] {
            assert_eq!(checked_rest(p, &[]).ok(), Some(rest), "{p}");
        }
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
        // Forwarded verbatim: the encoding is LibreChat's to undo.
        assert_eq!(
            checked_rest("/api/chat/Convos/%61bc", &[]).ok(),
            Some("Convos/%61bc")
        );
    }
}
