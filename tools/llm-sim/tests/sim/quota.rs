//! The provider quota over the wire: rate-limit headers on every answer in
//! the style of the API called, 429s once the window is spent, a new window
//! after it ends; and bare errors that carry no rate-limit header at all.

use std::time::Duration;

use serde_json::json;

use crate::client::{HttpResponse, post};
use crate::{chat, message, set_faults, start, stats};

const OPENAI_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

const ANTHROPIC_HEADERS: [&str; 6] = [
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];

/// A Go-style reset (`850ms`, `1.5s`, `1m59.9s`) as a duration.
fn go_duration(v: &str) -> Duration {
    if let Some(ms) = v.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap());
    }
    let mut secs = 0.0;
    let mut number = String::new();
    for c in v.chars() {
        match c {
            'h' => secs += 3600.0 * number.parse::<f64>().unwrap(),
            'm' => secs += 60.0 * number.parse::<f64>().unwrap(),
            's' => secs += number.parse::<f64>().unwrap(),
            _ => {
                number.push(c);
                continue;
            }
        }
        number.clear();
    }
    assert!(number.is_empty(), "{v}");
    Duration::from_secs_f64(secs)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn remaining(resp: &HttpResponse) -> Option<u64> {
    resp.header("x-ratelimit-remaining-requests")
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn openai_answers_count_down_then_429_until_the_window_ends() {
    let server = start(&["--quota-requests", "3", "--quota-window-s", "2"]).await;
    let addr = server.listen_addr();
    for left in [2, 1, 0] {
        let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(remaining(&resp), Some(left));
        let reset = go_duration(resp.header("x-ratelimit-reset-requests").unwrap());
        assert!(reset <= Duration::from_secs(2), "{reset:?}");
        // Requests only: no token headers, no Anthropic headers.
        assert_eq!(resp.header("x-ratelimit-limit-tokens"), None);
        assert!(ANTHROPIC_HEADERS.iter().all(|h| resp.header(h).is_none()));
    }
    let refused = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(remaining(&refused), Some(0));
    let reset = go_duration(refused.header("x-ratelimit-reset-requests").unwrap());
    assert!(reset <= Duration::from_secs(2), "{reset:?}");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, reset.as_secs_f64().ceil() as u64, "{reset:?}");
    let body = refused.json();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // Streams are refused alike, before any event.
    let refused = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert_eq!(refused.status, 429);
    let s = stats(&server).await;
    assert_eq!(s["rejected_quota"], 2);
    assert_eq!(s["quota_requests_remaining"], 0);
    assert_eq!(s["quota_tokens_remaining"], json!(null));
    assert_eq!(s["tokens_produced"], 15, "refusals generate nothing");

    // The window ends where the reset said: full again.
    tokio::time::sleep(reset + Duration::from_millis(20)).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 200);
    assert_eq!(remaining(&resp), Some(2));
}

#[tokio::test]
async fn anthropic_answers_carry_anthropics_headers_streams_included() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(
        &server,
        json!({"quota_requests": 2, "quota_tokens": 1000, "quota_window_s": 30}),
    )
    .await;
    let before = unix_secs();
    let resp = post(
        addr,
        "/v1/messages",
        &message("m", json!({"stream": true, "max_tokens": 3})),
    )
    .await;
    let after = unix_secs();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(OPENAI_HEADERS.iter().all(|h| resp.header(h).is_none()));
    assert_eq!(resp.header("anthropic-ratelimit-requests-limit"), Some("2"));
    assert_eq!(
        resp.header("anthropic-ratelimit-requests-remaining"),
        Some("1")
    );
    // "Hello, simulator!" is 5 prompt tokens, plus the 3 generated.
    assert_eq!(
        resp.header("anthropic-ratelimit-tokens-limit"),
        Some("1000")
    );
    assert_eq!(
        resp.header("anthropic-ratelimit-tokens-remaining"),
        Some("992")
    );
    // The window's end, 30 s after the POST, to the second (rounded up).
    let reset = resp.header("anthropic-ratelimit-requests-reset").unwrap();
    assert!(
        (before + 29..=after + 31).any(|t| llm_sim::api::anthropic::reset_instant(t, 0) == reset),
        "{reset}"
    );
    assert_eq!(resp.header("anthropic-ratelimit-tokens-reset"), Some(reset));

    post(addr, "/v1/messages", &message("m", json!({}))).await;
    let refused = post(addr, "/v1/messages", &message("m", json!({}))).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    assert_eq!(
        refused.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((28..=30).contains(&retry_after), "{retry_after}");
}

#[tokio::test]
async fn a_token_quota_refuses_a_request_that_does_not_fit() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    // Each request: 5 prompt tokens + 5 generated (the test server's default).
    set_faults(&server, json!({"quota_tokens": 25})).await;
    for left in ["15", "5"] {
        let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-ratelimit-remaining-tokens"), Some(left));
        assert_eq!(resp.header("x-ratelimit-limit-requests"), None);
    }
    let refused = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens")
    );
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("5"));
    // The smallest request (5 prompt tokens, 1 generated) needs 6: refused.
    let small = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"max_tokens": 1})),
    )
    .await;
    assert_eq!(small.status, 429);
}

#[tokio::test]
async fn a_window_may_start_near_exhaustion_and_errors_before_the_quota_are_not_charged() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(
        &server,
        json!({"quota_requests": 100, "quota_requests_used": 98}),
    )
    .await;
    // A model the instance does not serve: refused before the quota, not
    // charged, but the answer still says where the quota stands.
    let resp = post(addr, "/v1/chat/completions", &chat("nope", json!({}))).await;
    assert_eq!(resp.status, 404);
    assert_eq!(remaining(&resp), Some(2));
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(remaining(&resp), Some(1));
    assert_eq!(
        stats(&server).await["quota_requests_remaining"],
        1,
        "the control port sees the same window"
    );
    // A new fault set starts a new window.
    set_faults(
        &server,
        json!({"quota_requests": 100, "quota_requests_used": 98}),
    )
    .await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(remaining(&resp), Some(1));
    // Without a quota, no header.
    set_faults(&server, json!({})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert!(OPENAI_HEADERS.iter().all(|h| resp.header(h).is_none()));
}

#[tokio::test]
async fn fault_errors_carry_the_quota_unless_bare() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    set_faults(&server, json!({"fixed_status": 429, "quota_requests": 10})).await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(
        remaining(&resp),
        Some(9),
        "admitted, then the fault answered"
    );

    // Bare: no retry-after, no reset, no quota header, whatever the API.
    set_faults(
        &server,
        json!({"fixed_status": 429, "quota_requests": 10, "bare_errors": true, "retry_after_s": 5}),
    )
    .await;
    let resp = post(addr, "/v1/chat/completions", &chat("m", json!({}))).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), None);
    assert!(OPENAI_HEADERS.iter().all(|h| resp.header(h).is_none()));
    let resp = post(addr, "/v1/messages", &message("m", json!({}))).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), None);
    assert!(ANTHROPIC_HEADERS.iter().all(|h| resp.header(h).is_none()));
}

#[tokio::test]
async fn quota_flags_apply_at_start_up_and_bad_quotas_are_refused() {
    let server = start(&[
        "--quota-tokens",
        "500",
        "--quota-tokens-used",
        "100",
        "--quota-window-s",
        "120",
        "--bare-errors",
    ])
    .await;
    let current = crate::client::get(server.control_addr(), "/_sim/faults")
        .await
        .json();
    assert_eq!(current["quota_tokens"], 500);
    assert_eq!(current["quota_tokens_used"], 100);
    assert_eq!(current["quota_window_s"], 120);
    assert_eq!(current["quota_requests"], json!(null));
    assert_eq!(current["bare_errors"], true);
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat("m", json!({})),
    )
    .await;
    assert_eq!(resp.header("x-ratelimit-remaining-tokens"), Some("390"));
    let reset = go_duration(resp.header("x-ratelimit-reset-tokens").unwrap());
    assert!(
        (Duration::from_secs(110)..=Duration::from_secs(120)).contains(&reset),
        "{reset:?}"
    );

    for bad in [
        json!({"quota_requests": 0}),
        json!({"quota_window_s": 0}),
        json!({"quota_window_s": 86_401}),
        json!({"quota_requests": 5, "quota_requests_used": 6}),
        json!({"quota_tokens_used": 1}),
    ] {
        let resp = post(server.control_addr(), "/_sim/faults", &bad).await;
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
    }
}
