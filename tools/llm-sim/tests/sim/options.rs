//! Flags that make llm-sim stricter or stranger than a plain server:
//! `--require-content-length`.

use serde_json::json;

use crate::client::{post_chunked, post_with};
use crate::{chat, start, stats};

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
