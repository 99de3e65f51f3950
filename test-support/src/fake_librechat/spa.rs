//! What LibreChat serves outside `/api`: the built web client (an SPA whose `index.html` names
//! its `<base href>`, hashed `assets/*`, SPA routes answered with `index.html`) and `/images/*`,
//! guarded by `secureImageLinks` when that option is on (contract §10–11). With
//! `FakeLibreChatOptions::spa_dir`, the client is a real directory of files instead.

use std::path::{Path, PathBuf};

use super::*;

/// The SPA shell, as LibreChat's `index.html` starts (`<base href="/" />`, relative assets).
pub(super) const INDEX_HTML: &str = "<!DOCTYPE html><html lang=\"en-US\"><head>\
<meta charset=\"utf-8\"><base href=\"/\" /><title>LibreChat</title>\
<script type=\"module\" crossorigin src=\"assets/index.js\"></script></head>\
<body><div id=\"root\"></div></body></html>";

/// Its validator: `express.static` answers a matching `If-None-Match` with 304.
const INDEX_ETAG: &str = "W/\"spa-index-1\"";

pub(super) fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return text(StatusCode::NOT_FOUND, "Not Found");
    }
    if let Some(rest) = path.strip_prefix("/images/") {
        return image(shared, rest, headers);
    }
    if let Some(name) = path.strip_prefix("/assets/") {
        let mut resp = Response::new(Body::from(format!("/* asset {name} */")));
        set_header(
            resp.headers_mut(),
            "content-type",
            "application/javascript; charset=UTF-8",
        );
        set_header(
            resp.headers_mut(),
            "cache-control",
            "public, max-age=31536000",
        );
        return resp;
    }
    index(headers)
}

/// `index.html`: conditional (ETag) and, like `compression()`, gzip'd for a client that
/// accepts it.
fn index(headers: &HeaderMap) -> Response<Body> {
    let matches_etag = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == INDEX_ETAG.as_bytes());
    if matches_etag {
        let mut resp = empty(StatusCode::NOT_MODIFIED);
        set_header(resp.headers_mut(), "etag", INDEX_ETAG);
        return resp;
    }
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|c| c.trim().starts_with("gzip")));
    let mut resp = if gzip {
        let mut resp = Response::new(Body::from(gzip_stored(INDEX_HTML.as_bytes())));
        set_header(resp.headers_mut(), "content-encoding", "gzip");
        resp
    } else {
        Response::new(Body::from(INDEX_HTML))
    };
    set_header(resp.headers_mut(), "content-type", HTML_CT);
    set_header(resp.headers_mut(), "etag", INDEX_ETAG);
    resp
}

/// `/images/<userId>/<file>`: with `secureImageLinks`, only for the owner's refresh cookie
/// (`validateImageRequest`: 401 without a valid one, 403 "Invalid image path" for another
/// user's path).
fn image(shared: &Arc<Shared>, rest: &str, headers: &HeaderMap) -> Response<Body> {
    if shared.opts().secure_image_links {
        let cookies = super::auth::parse_cookies(headers);
        let claims = cookies.get("refreshToken").and_then(|t| {
            super::auth::verify::<super::auth::RefreshClaims>(t, &shared.refresh_secret).ok()
        });
        let Some(claims) = claims else {
            return text(StatusCode::UNAUTHORIZED, "Unauthorized");
        };
        if !rest.starts_with(&format!("{}/", claims.id)) {
            return text(StatusCode::FORBIDDEN, "Invalid image path");
        }
    }
    let mut resp = Response::new(Body::from(format!("fake-png:{rest}")));
    set_header(resp.headers_mut(), "content-type", "image/png");
    resp
}

/// A valid gzip member holding `data` in stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = data.chunks(0xffff).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The directory of a built client to serve this request from, if `spa_dir` is set and the
/// request is a GET or HEAD outside `/images/`.
pub(super) fn client_dir(shared: &Arc<Shared>, method: &Method, path: &str) -> Option<PathBuf> {
    if !matches!(*method, Method::GET | Method::HEAD) || path.starts_with("/images/") {
        return None;
    }
    shared.opts().spa_dir
}

/// A file of the built client by its path, else its `index.html` (the SPA fallback).
pub(super) async fn from_dir(dir: &Path, path: &str) -> Response<Body> {
    if let Some(file) = file_under(dir, path) {
        if let Ok(bytes) = tokio::fs::read(&file).await {
            return with_type(bytes, content_type(&file));
        }
    }
    match tokio::fs::read(dir.join("index.html")).await {
        Ok(bytes) => with_type(bytes, HTML_CT),
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!(
                "fake LibreChat: no index.html in spa_dir {}: {err}",
                dir.display()
            ),
        ),
    }
}

/// The file `path` names under `dir`, when it is a plain relative path to an existing file.
fn file_under(dir: &Path, path: &str) -> Option<PathBuf> {
    let rel = path.trim_start_matches('/');
    let plain = rel
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains(['\\', '%']));
    let file = dir.join(rel);
    (plain && file.is_file()).then_some(file)
}

fn content_type(file: &Path) -> &'static str {
    match file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
    {
        "html" => HTML_CT,
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => JSON_CT,
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn with_type(bytes: Vec<u8>, content_type: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(bytes));
    set_header(resp.headers_mut(), "content-type", content_type);
    resp
}
