//! The web client's files (`FakeLibreChatOptions::spa_dir`), served as LibreChat serves its built
//! client: a file that exists is sent with a type by its extension, every other path outside
//! `/api` gets `index.html` (the single-page app routes `c/<id>`, `login`, …).

use std::path::{Path, PathBuf};

use super::*;

pub(super) async fn spa_file(dir: &Path, method: &Method, path: &str) -> Response<Body> {
    let file = (method == Method::GET || method == Method::HEAD)
        .then(|| file_under(dir, path))
        .flatten();
    if let Some(file) = file {
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
