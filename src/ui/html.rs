//! LibreChat writes `<base href>` into its index.html from `DOMAIN_CLIENT`; the UI is served
//! under the mount path instead, so HTML answers get their base pointed there. LibreChat keeps
//! `DOMAIN_CLIENT` at its root, which also keeps its `secureImageLinks` path check working.

use axum::{
    body::Body,
    http::{header, HeaderValue},
    response::Response,
};

use super::REWRITE_CAP;

/// `res` with its `<base href>` set to `base`, when it is an HTML page (else unchanged).
pub async fn rebase(res: Response, base: &str) -> Response {
    let headers = res.headers();
    let is_html = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/html"));
    if !is_html || !res.status().is_success() {
        return res;
    }
    let encoded = super::is_encoded(&res);
    let too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > REWRITE_CAP);
    if encoded || too_large {
        tracing::warn!(encoded, too_large, "LibreChat HTML page left as it is");
        return res;
    }
    let (mut parts, page) = match super::read_rewritable(res).await {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!("LibreChat HTML page unreadable or too large");
            return axum::response::IntoResponse::into_response(e);
        }
    };
    let Ok(text) = std::str::from_utf8(&page) else {
        return Response::from_parts(parts, Body::from(page));
    };
    let rewritten = set_base_href(text, base);
    // The page names its own base: a cached copy must not outlive a change of mount path.
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Response::from_parts(parts, Body::from(rewritten))
}

/// The page with the `href` of its first `<base>` element replaced by `base` (the page as it
/// is when it has none).
pub fn set_base_href(page: &str, base: &str) -> String {
    let lower = page.to_ascii_lowercase();
    let Some(tag_start) = find_base_tag(&lower) else {
        return page.to_owned();
    };
    let Some(tag_len) = lower[tag_start..].find('>') else {
        return page.to_owned();
    };
    let tag = &lower[tag_start..tag_start + tag_len];
    let Some(attr) = tag.find("href=") else {
        return page.to_owned();
    };
    let value_start = tag_start + attr + "href=".len();
    let quote = page.as_bytes().get(value_start).copied();
    let (start, end) = match quote {
        Some(q @ (b'"' | b'\'')) => {
            let Some(len) = page[value_start + 1..tag_start + tag_len].find(q as char) else {
                return page.to_owned();
            };
            (value_start + 1, value_start + 1 + len)
        }
        _ => {
            let len = page[value_start..tag_start + tag_len]
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(tag_start + tag_len - value_start);
            (value_start, value_start + len)
        }
    };
    let escaped = base.replace('"', "&quot;");
    match quote {
        Some(b'"' | b'\'') => format!("{}{escaped}{}", &page[..start], &page[end..]),
        _ => format!("{}\"{escaped}\"{}", &page[..start], &page[end..]),
    }
}

/// Start of the first `<base` element (not `<basefont`) in the lower-cased page.
fn find_base_tag(lower: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = lower[from..].find("<base") {
        let at = from + i;
        let next = lower.as_bytes().get(at + "<base".len()).copied();
        if next.is_some_and(|b| b.is_ascii_whitespace() || b == b'/' || b == b'>') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::set_base_href;

    #[test]
    fn rewrites_the_base_of_librechat_index_html() {
        let page = r#"<html><head><meta charset="utf-8" /><base href="/" /><script src="assets/a.js"></script></head></html>"#;
        assert_eq!(
            set_base_href(page, "/chat/"),
            r#"<html><head><meta charset="utf-8" /><base href="/chat/" /><script src="assets/a.js"></script></head></html>"#
        );
    }

    #[test]
    fn handles_quotes_case_and_sub_paths() {
        assert_eq!(
            set_base_href("<BASE HREF='/old/path/'>", "/chat/"),
            "<BASE HREF='/chat/'>"
        );
        assert_eq!(
            set_base_href("<base href=/ >", "/chat/"),
            "<base href=\"/chat/\" >"
        );
        assert_eq!(
            set_base_href("<basefont x><base href=\"/\">", "/c/"),
            "<basefont x><base href=\"/c/\">"
        );
    }

    #[test]
    fn leaves_pages_without_a_base_alone() {
        for page in ["<html></html>", "<base target=_blank>", "<base href=\"/\""] {
            assert_eq!(set_base_href(page, "/chat/"), page);
        }
    }
}
