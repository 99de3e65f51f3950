//! A 50 MB upload streams through the BFF. Alone in its own test binary (process) so the
//! peak-RSS measurement sees no other test's memory.

mod support;

use reqwest::{header, StatusCode};
use support::{
    fake_librechat::FakeLibreChatOptions,
    world::{get_json, http, World},
};

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
    let boundary = "----bffTestBoundary7MA4YWxkTrZu0gW";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"endpoint\"\r\n\r\nFakeAI\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"endpointType\"\r\n\r\ncustom\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    );
    let tail = format!(
        "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file_id\"\r\n\r\n6f1c2c61-3c7b-4a43-9a57-3b2c1d0e9f10\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"message_file\"\r\n\r\ntrue\r\n--{boundary}--\r\n"
    );
    let chunk = bytes::Bytes::from(vec![b'a'; CHUNK]);
    let parts = std::iter::once(bytes::Bytes::from(head))
        .chain(std::iter::repeat_n(chunk, SIZE / CHUNK))
        .chain(std::iter::once(bytes::Bytes::from(tail)));
    let stream = futures_util::stream::iter(parts.map(Ok::<_, std::io::Error>));

    let before = peak_rss_kib();
    let res = http()
        .post(format!("{}/api/chat/files", bff.base_url))
        .bearer_auth(&bearer)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
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
