//! Flags and headers that make llm-sim stricter or stranger than a plain
//! server: `--require-content-length`, gzip answers (`accept-encoding`,
//! `--gzip-always`).

use std::io::Read;

use flate2::read::GzDecoder;
use serde_json::{Value, json};

use crate::client::{HttpResponse, post_chunked, post_with};
use crate::{chat, start, stats};

const GZIP: &str = "accept-encoding: gzip\r\n";

fn gunzip(resp: &HttpResponse) -> String {
    assert_eq!(
        resp.header("content-encoding"),
        Some("gzip"),
        "{:?}",
        resp.headers
    );
    let mut text = String::new();
    GzDecoder::new(resp.body.as_slice())
        .read_to_string(&mut text)
        .expect("a complete gzip body");
    text
}

#[tokio::test]
async fn require_content_length_refuses_chunked_bodies_with_411() {
    let server = start(&["--require-content-length"]).await;
    let addr = server.listen_addr();
    let body = chat("m", json!({}));
    let refused = post_chunked(addr, "/v1/chat/completions", &body, "").await;
    assert_eq!(refused.status, 411, "{}", refused.text());
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "length_required");
    let served = post_with(addr, "/v1/chat/completions", &body, "").await;
    assert_eq!(served.status, 200, "{}", served.text());
    let counted = stats(&server).await;
    assert_eq!(counted["by_status"]["411"], 1);
    assert_eq!(counted["tokens_produced"], 5);
}

#[tokio::test]
async fn chunked_bodies_are_served_by_default() {
    let server = start(&[]).await;
    let body = chat("m", json!({}));
    let served = post_chunked(server.listen_addr(), "/v1/chat/completions", &body, "").await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(served.json()["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn accept_encoding_gzip_compresses_json_answers() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    let resp = post_with(addr, "/v1/chat/completions", &chat("m", json!({})), GZIP).await;
    assert_eq!(resp.status, 200);
    assert!(resp.header("content-length").is_none());
    let body: Value = serde_json::from_str(&gunzip(&resp)).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 5);
    // Errors too, in their shape.
    let missing = post_with(addr, "/v1/chat/completions", &json!({"model": "m"}), GZIP).await;
    assert_eq!(missing.status, 400);
    let error: Value = serde_json::from_str(&gunzip(&missing)).unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    // Without the header, plain.
    let plain = post_with(addr, "/v1/chat/completions", &chat("m", json!({})), "").await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.json()["usage"]["completion_tokens"], 5);
    assert_eq!(stats(&server).await["gzipped"], 2);
}

#[tokio::test]
async fn gzipped_streams_flush_every_event() {
    let server = start(&[]).await;
    let body = chat(
        "m",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = post_with(server.listen_addr(), "/v1/chat/completions", &body, GZIP).await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    let text = gunzip(&resp);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events = text.matches("data: ").count();
    assert_eq!(events, 1 + 5 + 1 + 1 + 1, "{text}");
    assert!(text.contains(r#""completion_tokens":5"#), "{text}");
    // A sync flush (an empty stored block, 00 00 ff ff) after each frame
    // the stream produced: events are decompressible as they arrive.
    let flushes = resp
        .body
        .windows(4)
        .filter(|w| w == b"\x00\x00\xff\xff")
        .count();
    assert!(flushes >= 5, "{flushes} flushes");
}

#[tokio::test]
async fn gzip_always_compresses_what_was_not_asked_for() {
    let server = start(&["--gzip-always"]).await;
    let addr = server.listen_addr();
    let resp = post_with(addr, "/v1/chat/completions", &chat("m", json!({})), "").await;
    assert_eq!(resp.status, 200);
    let body: Value = serde_json::from_str(&gunzip(&resp)).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 5);
    let refused = post_with(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({})),
        "accept-encoding: identity\r\n",
    )
    .await;
    assert_eq!(refused.header("content-encoding"), Some("gzip"));
}
