//! Every fault kind, set at start-up or through the control port.

use std::io::ErrorKind;
use std::time::Duration;

use serde_json::{Value, json};

use crate::capacity::wait_stat;
use crate::client::{get, post, request};
use crate::{chat, message, set_faults, start, stats};

async fn chat_status(addr: std::net::SocketAddr) -> u16 {
    post(addr, "/v1/chat/completions", &chat("m", json!({})))
        .await
        .status
}

#[tokio::test]
async fn error_rate_is_seeded_and_replayable() {
    let server = start(&["--seed", "42"]).await;
    let addr = server.listen_addr();

    let all = set_faults(&server, json!({"error_rate": 1.0, "error_status": 502})).await;
    assert_eq!(all["error_status"], 502);
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.json()["error"]["type"], "server_error");
    let resp = post(addr, "/v1/messages", &message("m", json!({}))).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.json()["type"], "error");
    assert_eq!(resp.json()["error"]["type"], "api_error");

    let half = json!({"error_rate": 0.5, "error_status": 503});
    set_faults(&server, half.clone()).await;
    let mut first = Vec::new();
    for _ in 0..40 {
        first.push(chat_status(addr).await);
    }
    set_faults(&server, half).await; // reseeds: the same sequence again
    let mut second = Vec::new();
    for _ in 0..40 {
        second.push(chat_status(addr).await);
    }
    assert_eq!(first, second);
    let errors = first.iter().filter(|s| **s == 503).count();
    assert!((8..=32).contains(&errors), "{first:?}");
    assert!(first.iter().all(|s| *s == 503 || *s == 200));

    set_faults(&server, json!({})).await;
    assert_eq!(chat_status(addr).await, 200);
}

#[tokio::test]
async fn fixed_status_answers_every_request() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(&server, json!({"fixed_status": 500})).await;
    for _ in 0..5 {
        assert_eq!(chat_status(addr).await, 500);
    }
    // Health is not an inference request: it stays up (a gray failure).
    assert_eq!(get(addr, "/health").await.status, 200);
    set_faults(&server, json!({"fixed_status": 429})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("1"));
    let s = stats(&server).await;
    assert_eq!(s["by_status"]["500"], 5);
    assert_eq!(s["by_status"]["429"], 1);
}

#[tokio::test]
async fn fault_flags_apply_at_start_up() {
    let server = start(&["--fixed-status", "503"]).await;
    assert_eq!(chat_status(server.listen_addr()).await, 503);
    let current = get(server.control_addr(), "/_sim/faults").await.json();
    assert_eq!(current["fixed_status"], 503);
}

#[tokio::test]
async fn added_latency_and_slow_tokens() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(&server, json!({"added_latency_ms": 150})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.elapsed >= Duration::from_millis(150),
        "{:?}",
        resp.elapsed
    );

    // Added latency also delays fault errors.
    set_faults(
        &server,
        json!({"added_latency_ms": 100, "fixed_status": 503}),
    )
    .await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 503);
    assert!(
        resp.elapsed >= Duration::from_millis(100),
        "{:?}",
        resp.elapsed
    );

    // 5 tokens at 5/s: 4 gaps of 200 ms.
    set_faults(&server, json!({"slow_tokens_per_sec": 5.0})).await;
    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert!(resp.complete);
    assert!(
        resp.elapsed >= Duration::from_millis(200),
        "{:?}",
        resp.elapsed
    );

    set_faults(&server, json!({})).await;
    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert!(
        resp.elapsed < Duration::from_millis(150),
        "{:?}",
        resp.elapsed
    );
}

#[tokio::test]
async fn abort_cuts_streams_after_k_tokens() {
    let server = start(&["--output-tokens", "10"]).await;
    let addr = server.listen_addr();
    set_faults(&server, json!({"abort_after_tokens": 3})).await;

    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(!resp.complete, "no clean end of the chunked body");
    let events = resp.sse();
    let deltas = events
        .iter()
        .filter(|(_, d)| {
            d["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert_eq!(deltas, 3);
    assert!(events.iter().all(|(_, d)| d != "[DONE]"));

    let resp = post(addr, "/v1/messages", &message("m", json!({"stream": true}))).await;
    assert!(!resp.complete);
    let events = resp.sse();
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count();
    assert_eq!(deltas, 3);
    assert!(events.iter().all(|(n, _)| n != "message_stop"));

    // Non-streamed: headers, then half a body, then the cut.
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert!(!resp.complete);
    assert!(serde_json::from_slice::<Value>(&resp.body).is_err());

    let s = stats(&server).await;
    assert_eq!(s["aborted"], 3);
    assert_eq!(s["tokens_produced"], 9);

    set_faults(&server, json!({})).await;
    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert!(resp.complete);
}

#[tokio::test]
async fn refuse_connections_then_accept_again_on_the_same_port() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(&server, json!({"refuse_connections": true})).await;
    let err = request(addr, "GET", "/health", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(stats(&server).await["listening"], false);
    let current = get(server.control_addr(), "/_sim/faults").await.json();
    assert_eq!(current["refuse_connections"], true);

    set_faults(&server, json!({})).await;
    assert_eq!(chat_status(addr).await, 200);
    assert_eq!(stats(&server).await["listening"], true);
}

#[tokio::test]
async fn die_cuts_open_streams_and_revive_serves_again() {
    // A stream of 5 tokens at 5/s: about a second, long enough to be cut.
    let server = start(&["--tokens-per-sec", "5"]).await;
    let addr = server.listen_addr();
    let stream = tokio::spawn(async move {
        post(
            addr,
            "/v1/chat/completions",
            &chat("m", json!({"stream": true})),
        )
        .await
    });
    wait_stat(&server, "in_flight", 1).await;

    set_faults(&server, json!({"dead": true})).await;
    let cut = stream.await.unwrap();
    assert!(!cut.complete, "the open stream was cut");
    assert!(
        cut.elapsed < Duration::from_millis(900),
        "{:?}",
        cut.elapsed
    );
    let err = request(addr, "GET", "/health", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    wait_stat(&server, "in_flight", 0).await;

    // Revive: same port, serving again.
    let revived = set_faults(&server, json!({"dead": false})).await;
    assert_eq!(revived["dead"], false);
    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"max_tokens": 1})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-llm-sim-instance"), Some("sim-1"));
}

#[tokio::test]
async fn start_dead_then_revive() {
    let server = start(&["--dead"]).await;
    let addr = server.listen_addr();
    assert!(request(addr, "GET", "/health", None).await.is_err());
    set_faults(&server, json!({})).await;
    assert_eq!(get(addr, "/health").await.status, 200);
}

#[tokio::test]
async fn control_rejects_bad_faults_and_keeps_the_old_ones() {
    let server = start(&[]).await;
    let control = server.control_addr();
    set_faults(&server, json!({"added_latency_ms": 5})).await;
    for bad in [
        json!({"error_rate": 1.5}),
        json!({"fixed_status": 200}),
        json!({"slow_tokens_per_sec": 0}),
        json!({"no_such_fault": true}),
        json!("not an object"),
    ] {
        let resp = post(control, "/_sim/faults", &bad).await;
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
        assert!(resp.json()["error"]["message"].is_string());
    }
    let resp = request(control, "POST", "/_sim/faults", Some("{oops"))
        .await
        .unwrap();
    assert_eq!(resp.status, 400);
    let current = get(control, "/_sim/faults").await.json();
    assert_eq!(current["added_latency_ms"], 5);
    assert_eq!(get(control, "/_sim/nothing").await.status, 404);
}

#[tokio::test]
async fn stats_count_requests_statuses_and_tokens() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    post(
        addr,
        "/v1/messages",
        &message("m", json!({"stream": true, "max_tokens": 2})),
    )
    .await;
    post(addr, "/v1/chat/completions", &chat("nope", json!({}))).await;
    let s = stats(&server).await;
    assert_eq!(s["requests"], 3);
    assert_eq!(s["by_status"]["200"], 2);
    assert_eq!(s["by_status"]["404"], 1);
    assert_eq!(s["tokens_produced"], 7);
    assert_eq!(s["in_flight"], 0);
}
