//! A 50 MB upload streams through the BFF. In its own test binary (process) so the peak-RSS
//! measurement sees no other test's memory; the other tests here take [`ALONE`] so they never
//! run beside it.

use std::time::Duration;

use reqwest::{header, StatusCode};
use support::{
    fake_librechat::FakeLibreChatOptions,
    world::{get_json, http, World},
};

/// Held by each test of this binary: the RSS measurement must see only its own upload.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BOUNDARY: &str = "----bffTestBoundary7MA4YWxkTrZu0gW";

/// A LibreChat file upload (`endpoint`, `endpointType`, `file`, `file_id`, `message_file`)
/// whose file part is `size` bytes, as chunks of `chunk` bytes.
fn multipart(size: usize, chunk: usize) -> impl Iterator<Item = bytes::Bytes> {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"endpoint\"\r\n\r\nFakeAI\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"endpointType\"\r\n\r\ncustom\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    );
    let tail = format!(
        "\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file_id\"\r\n\r\n6f1c2c61-3c7b-4a43-9a57-3b2c1d0e9f10\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"message_file\"\r\n\r\ntrue\r\n--{BOUNDARY}--\r\n"
    );
    let data = bytes::Bytes::from(vec![b'a'; chunk]);
    std::iter::once(bytes::Bytes::from(head))
        .chain(std::iter::repeat_n(data, size / chunk))
        .chain(std::iter::once(bytes::Bytes::from(tail)))
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_50_mb_upload_streams_through_in_field_order() {
    let _alone = ALONE.lock().await;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 9).await;
    let bearer = w.bearer(9);
    // Warm up: the user's LibreChat login happens before measuring.
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );

    const SIZE: usize = 50 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let stream = futures_util::stream::iter(multipart(SIZE, CHUNK).map(Ok::<_, std::io::Error>));

    let before = peak_rss_kib();
    let res = http()
        .post(format!("{}/api/chat/files", bff.base_url))
        .bearer_auth(&bearer)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload");
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{body}");
    let growth_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    // Client, BFF and fake all run in this process: buffering anywhere would add >= 50 MiB.
    assert!(growth_mib < 20, "peak RSS grew by {growth_mib} MiB");

    let upload = w.lc.uploads().pop().expect("the fake saw the upload");
    assert_eq!(upload.file_bytes, SIZE as u64);
    assert_eq!(
        upload.field_names,
        vec![
            "endpoint",
            "endpointType",
            "file",
            "file_id",
            "message_file"
        ]
    );
}

/// The response-header timeout counts from the end of the upload: a slow upload that takes
/// several times `response_header_timeout_secs` goes through whole.
#[tokio::test]
async fn an_upload_slower_than_the_response_header_timeout_goes_through() {
    use futures_util::StreamExt;
    let _alone = ALONE.lock().await;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__LIBRECHAT__RESPONSE_HEADER_TIMEOUT_SECS", "1".into())])
        .await;
    w.user(&bff, 10).await;
    let bearer = w.bearer(10);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );

    // 5 MB in 80 chunks, one every 40 ms: over 3 s on the wire, never idle for long.
    const SIZE: usize = 5 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let throttled = futures_util::stream::iter(multipart(SIZE, CHUNK)).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let started = tokio::time::Instant::now();
    let res = http()
        .post(format!("{}/api/chat/files", bff.base_url))
        .bearer_auth(&bearer)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(reqwest::Body::wrap_stream(throttled))
        .send()
        .await
        .expect("upload");
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the upload took longer than the 1 s header timeout ({:?})",
        started.elapsed()
    );
    let upload = w.lc.uploads().pop().expect("the fake saw the upload");
    assert_eq!(upload.file_bytes, SIZE as u64, "every byte arrived");

    // Once the body is sent, the header timeout still holds: LibreChat answering after 3 s is
    // 504 after about 1 s.
    w.lc.set_latency(Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    let res = http()
        .post(format!("{}/api/chat/files", bff.base_url))
        .bearer_auth(&bearer)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart(4 * CHUNK, CHUNK).flatten().collect::<Vec<u8>>())
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "504 at the 1 s header timeout, not after {took:?}"
    );
}
