//! Every fault kind, set at start-up or through the control port.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::capacity::wait_stat;
use crate::client::{TIMEOUT, get, parse, post, request};
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
    // Six inference requests; the health check counts in `requests` only.
    assert_eq!(s["inference_requests"], 6);
    assert_eq!(s["requests"], 7);
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

/// Sends a whole chat request (`connection: close`) and leaves the
/// connection open for the answer.
async fn send_chat(addr: SocketAddr) -> TcpStream {
    let body = chat("m", json!({})).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream
}

/// The bytes that arrive on `stream` within `window` (before an end or error).
async fn read_for(stream: &mut TcpStream, window: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(window, stream.read_to_end(&mut got)).await;
    got
}

/// Reads the rest of `stream` (bounded by `TIMEOUT`); a reset ends it too.
async fn read_rest(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no end within {TIMEOUT:?}");
    got
}

#[tokio::test]
async fn blackhole_reads_requests_and_answers_none_until_cleared() {
    let server = start(&["--seed", "3"]).await;
    let addr = server.listen_addr();
    let set = set_faults(&server, json!({"blackhole": true})).await;
    assert_eq!(set["blackhole"], true);
    // Not inference requests: they still answer, so health checks pass.
    assert_eq!(get(addr, "/health").await.status, 200);
    assert_eq!(get(addr, "/v1/models").await.status, 200);

    // A client with a short timeout gets nothing at all: no status, no byte.
    let mut impatient = send_chat(addr).await;
    let got = read_for(&mut impatient, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(stats(&server).await["blackholed"], 1);
    assert_eq!(stats(&server).await["in_flight"], 1);
    // It gives up: the held request ends with its connection, nothing leaks.
    drop(impatient);
    wait_stat(&server, "in_flight", 0).await;

    // A patient client is held too, and served once the fault is cleared.
    let mut patient = send_chat(addr).await;
    wait_stat(&server, "blackholed", 2).await;
    assert!(
        read_for(&mut patient, Duration::from_millis(100))
            .await
            .is_empty()
    );
    set_faults(&server, json!({})).await;
    let resp = parse(&read_rest(&mut patient).await, Duration::ZERO).unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.complete);

    // New requests answer at once; nothing is held any more.
    let started = Instant::now();
    assert_eq!(chat_status(addr).await, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    let s = stats(&server).await;
    assert_eq!(s["blackholed"], 2);
    assert_eq!(s["by_status"]["200"], 4, "{s}");
    assert_eq!(s["in_flight"], 0);
}

#[tokio::test]
async fn blackhole_hold_limit_closes_the_connection_unanswered() {
    let server = start(&["--blackhole", "--blackhole-max-hold-s", "1"]).await;
    let addr = server.listen_addr();
    let started = Instant::now();
    let mut held = send_chat(addr).await;
    let got = read_rest(&mut held).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&elapsed),
        "{elapsed:?}"
    );
    wait_stat(&server, "in_flight", 0).await;
    let s = stats(&server).await;
    assert_eq!(s["blackholed"], 1);
    assert_eq!(s["by_status"], json!({}), "no status was ever sent");
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn retry_after_fault_adds_the_providers_reset_headers() {
    let server = start(&[]).await;
    let addr = server.listen_addr();

    set_faults(&server, json!({"fixed_status": 500, "retry_after_s": 7})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 500);
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.header("x-ratelimit-reset-requests"), Some("7s"));
    assert_eq!(resp.header("anthropic-ratelimit-requests-reset"), None);

    let before = unix_secs();
    let resp = post(addr, "/v1/messages", &message("m", json!({}))).await;
    let after = unix_secs();
    assert_eq!(resp.status, 500);
    assert_eq!(resp.json()["type"], "error");
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.header("x-ratelimit-reset-requests"), None);
    let reset = resp.header("anthropic-ratelimit-requests-reset").unwrap();
    assert!(
        (before..=after).any(|now| llm_sim::api::anthropic::reset_instant(now, 7) == reset),
        "{reset}"
    );

    // The error_rate fault too, with a Go-style duration past a minute.
    set_faults(
        &server,
        json!({"error_rate": 1.0, "error_status": 429, "retry_after_s": 90}),
    )
    .await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("90"));
    assert_eq!(resp.header("x-ratelimit-reset-requests"), Some("1m30s"));

    // Successes carry no hint; without the fault, errors keep the old headers.
    set_faults(&server, json!({"retry_after_s": 5})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("retry-after"), None);
    assert_eq!(resp.header("x-ratelimit-reset-requests"), None);
    set_faults(&server, json!({"fixed_status": 500})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.header("retry-after"), None);
    assert_eq!(resp.header("x-ratelimit-reset-requests"), None);
}

#[tokio::test]
async fn retry_after_fault_flag_applies_at_start_up() {
    let server = start(&["--fixed-status", "503", "--fault-retry-after-s", "4"]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat("m", json!({})),
    )
    .await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("retry-after"), Some("4"));
    assert_eq!(resp.header("x-ratelimit-reset-requests"), Some("4s"));
    let current = get(server.control_addr(), "/_sim/faults").await.json();
    assert_eq!(current["retry_after_s"], 4);
    assert_eq!(current["blackhole"], false);
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
        json!({"retry_after_s": 86_401}),
        json!({"retry_after_s": -1}),
        json!({"blackhole": "yes"}),
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
