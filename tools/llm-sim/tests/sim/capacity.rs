//! Capacity: 429 with retry-after beyond the limit, or a bounded queue.

use std::time::Duration;

use serde_json::json;

use crate::client::post;
use crate::{chat, message, start, stats};

/// Polls the stats until `field` reaches `want` (at most 200 × 10 ms).
pub async fn wait_stat(server: &llm_sim::RunningServer, field: &str, want: i64) {
    for _ in 0..200 {
        if stats(server).await[field].as_i64() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("stat {field} never reached {want}: {}", stats(server).await);
}

#[tokio::test]
async fn beyond_max_concurrency_is_429_with_retry_after() {
    // One slot; a request takes ~400 ms (5 tokens at 10/s).
    let server = start(&[
        "--max-concurrency",
        "1",
        "--tokens-per-sec",
        "10",
        "--retry-after-s",
        "2",
    ])
    .await;
    let addr = server.listen_addr();
    let slow =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat("m", json!({}))).await },
        );
    wait_stat(&server, "in_flight", 1).await;

    let rejected = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(rejected.status, 429);
    assert_eq!(rejected.header("retry-after"), Some("2"));
    assert!(rejected.json()["error"]["message"].is_string());
    let rejected = post(addr, "/v1/messages", &message("m", json!({}))).await;
    assert_eq!(rejected.status, 429);
    assert_eq!(rejected.json()["error"]["type"], "rate_limit_error");

    assert_eq!(slow.await.unwrap().status, 200);
    let s = stats(&server).await;
    assert_eq!(s["rejected_overloaded"], 2);
    assert_eq!(s["by_status"]["429"], 2);
    // The slot is free again.
    assert_eq!(
        post(addr, "/v1/chat/completions", &chat("m", json!({})))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn bounded_queue_waits_then_rejects() {
    let server = start(&[
        "--max-concurrency",
        "1",
        "--queue-depth",
        "1",
        "--tokens-per-sec",
        "10",
    ])
    .await;
    let addr = server.listen_addr();
    let first =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat("m", json!({}))).await },
        );
    wait_stat(&server, "in_flight", 1).await;
    let queued =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat("m", json!({}))).await },
        );
    wait_stat(&server, "queued", 1).await;

    let rejected = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(rejected.status, 429);

    assert_eq!(first.await.unwrap().status, 200);
    let queued = queued.await.unwrap();
    assert_eq!(queued.status, 200);
    // It waited for the first one (~400 ms) and then ran its own (~400 ms).
    assert!(
        queued.elapsed >= Duration::from_millis(600),
        "{:?}",
        queued.elapsed
    );
}

#[tokio::test]
async fn queue_timeout_turns_into_429() {
    let server = start(&[
        "--max-concurrency",
        "1",
        "--queue-depth",
        "4",
        "--queue-timeout-ms",
        "50",
        "--tokens-per-sec",
        "10",
    ])
    .await;
    let addr = server.listen_addr();
    let first =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat("m", json!({}))).await },
        );
    wait_stat(&server, "in_flight", 1).await;
    let timed_out = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(timed_out.status, 429);
    assert!(timed_out.elapsed >= Duration::from_millis(50));
    assert_eq!(first.await.unwrap().status, 200);
}
