//! The token limiter (`[tokens]` of `sluice.wasm`) in the test host: quotas per
//! tenant and model, 429s in both APIs' shapes, reconciliation with the real
//! usage (JSON and SSE, chunk by chunk), several workers under one bound, and
//! a flood of tenants against a bounded key set.

use std::time::Duration;

use serde_json::Value;
use sluice_host_tests::{
    BodySpec, Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig,
    Request, Response,
};

fn tokens_module() -> FilterModule {
    FilterModule::load("sluice").expect("sluice.wasm (run `cargo xtask build`)")
}

/// A policy with one backend and the given `[tokens]` section.
fn policy(tokens: &str) -> String {
    format!(
        r#"
[[backend]]
name = "llm"
models = ["*"]
  [[backend.zone]]
  name = "local"
  endpoints = ["10.0.0.1:8000"]

{tokens}
"#
    )
}

/// A host with `workers` workers, the token filter with `tokens`, and an
/// upstream that answers with `behavior`.
fn host(workers: usize, tokens: &str, behavior: EndpointBehavior) -> Host {
    let mut host = Host::new(HostOptions {
        workers,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "backend",
        vec![Endpoint::new("10.0.0.1:8000", "zone-a", behavior)],
    ));
    host.add_filter(
        PluginConfig::new(tokens_module())
            .name("sluice")
            .vm_id("sluice")
            .configuration(policy(tokens))
            // As `sluice render envoy` configures it.
            .allow_on_headers_stop_iteration(true),
    )
    .unwrap();
    host
}

/// An OpenAI chat completion JSON answer reporting `prompt` + `completion` tokens.
fn openai_json(prompt: u64, completion: u64) -> EndpointBehavior {
    let body = format!(
        r#"{{"id":"c1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    );
    EndpointBehavior::fixed(200, &body, Duration::from_millis(20))
}

/// A chat request of a 40-character prompt (10 tokens at 4 chars/token).
fn chat(tenant: &str, max_tokens: u64) -> Request {
    let body = format!(
        r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(40)
    );
    Request::post_json("/v1/chat/completions", &body).header("x-tenant-id", tenant)
}

fn json(response: &Response) -> Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.body_text()))
}

fn reached_upstream(response: &Response) -> bool {
    response.upstream_request_headers.is_some()
}

const ACME_1K: &str = r#"
[tokens]
default_max_tokens = 100
  [[tokens.quota]]
  match = { tenants = ["acme"] }
  tokens = "1000/min"
  [[tokens.quota]]
  tokens = "100k/min"
"#;

#[test]
fn a_tenant_over_its_quota_gets_429_before_the_upstream_and_others_do_not() {
    // Each request reserves 10 (prompt) + 90 (cap) = 100 tokens; the upstream
    // reports exactly that, so nothing is refunded.
    let mut host = host(2, ACME_1K, openai_json(10, 90));
    let mut admitted = 0;
    for i in 0..15 {
        let r = host.send_on(i % 2, chat("acme", 90));
        if r.status == 200 {
            admitted += 1;
            assert!(reached_upstream(&r));
        } else {
            assert_eq!(r.status, 429, "{}", r.body_text());
            assert!(
                r.local_reply && !reached_upstream(&r),
                "a rejected request must not reach the upstream"
            );
        }
    }
    assert_eq!(
        admitted, 10,
        "1000 tokens hold exactly ten 100-token requests"
    );
    // globex has its own bucket under the catch-all quota.
    let other = host.send(chat("globex", 90));
    assert_eq!(other.status, 200);
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.rejected"),
        5
    );
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.admitted"),
        10
    );
}

#[test]
fn the_429_speaks_openai_with_rate_limit_headers() {
    let mut host = host(1, ACME_1K, openai_json(10, 90));
    for _ in 0..10 {
        assert_eq!(host.send(chat("acme", 90)).status, 200);
    }
    let r = host.send(chat("acme", 90));
    assert_eq!(r.status, 429);
    let body = json(&r);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-4o")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    // Ten requests of 20 ms each let a few tokens refill (1000/min).
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 100, "{remaining}");
    // retry-after is the time the missing tokens take to refill, rounded up.
    let wait_ms = (100 - remaining) * 60_000 / 1000;
    let expected = wait_ms.div_ceil(1000);
    assert_eq!(r.header("retry-after"), Some(expected.to_string().as_str()));
    assert!(r.header("x-ratelimit-reset-tokens").is_some());
    // After waiting what retry-after said, the request is admitted.
    host.advance(Duration::from_secs(expected));
    assert_eq!(host.send(chat("acme", 90)).status, 200);
}

#[test]
fn the_429_speaks_anthropic_on_the_messages_api() {
    let mut host = host(1, ACME_1K, openai_json(10, 90));
    let body = format!(
        r#"{{"model":"claude-x","max_tokens":990,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "y".repeat(40)
    );
    let request = || Request::post_json("/v1/messages", &body).header("x-tenant-id", "acme");
    assert_eq!(host.send(request()).status, 200);
    let r = host.send(request());
    assert_eq!(r.status, 429);
    let body = json(&r);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // Anthropic's own rate-limit headers, not OpenAI's.
    assert_eq!(r.header("anthropic-ratelimit-tokens-limit"), Some("1000"));
    assert_eq!(
        r.header("anthropic-ratelimit-input-tokens-limit"),
        Some("1000")
    );
    assert!(r.header("retry-after").is_some());
    let reset = r.header("anthropic-ratelimit-tokens-reset").unwrap();
    assert!(
        reset.len() == 20 && reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
        "an RFC 3339 instant: {reset}"
    );
    assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
}

#[test]
fn the_buckets_bill_the_real_usage_and_read_no_compressed_answer() {
    // Reserves 10 + 500 = 510; the upstream reports 10 + 20 = 30.
    let mut host = host(1, ACME_1K, openai_json(10, 20));
    let r = host.send(chat("acme", 500).header("accept-encoding", "gzip, br"));
    assert_eq!(r.status, 200);
    let billed = "sluice_tokens.tenant.acme.model.other.tokens_billed";
    assert_eq!(host.metric(billed), 30);
    // The upstream is asked for no encoding: sluice must read the usage.
    let sent = r.upstream_request_headers.as_ref().unwrap();
    assert_eq!(sent.get("accept-encoding"), None);
    // An upstream that compresses anyway cannot be read: the whole
    // reservation stands (never the 0 a garbled body would suggest).
    let mut gzipping = openai_json(10, 20);
    gzipping
        .headers
        .push(("content-encoding".into(), "gzip".into()));
    let mut host = self::host(1, ACME_1K, gzipping);
    assert_eq!(host.send(chat("acme", 500)).status, 200);
    assert_eq!(host.metric(billed), 510);
    assert_eq!(host.metric("sluice_tokens.compressed_responses"), 1);
}

#[test]
fn remaining_tokens_really_decrease_on_successful_responses() {
    // A daily limit refills nothing noticeable between these requests.
    let daily = ACME_1K.replace("1000/min", "1000/day");
    let mut host = host(1, &daily, openai_json(10, 90));
    let remaining: Vec<u64> = (0..4)
        .map(|_| {
            let r = host.send(chat("acme", 90));
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
            r.header("x-ratelimit-remaining-tokens")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(remaining, [900, 800, 700, 600]);
}

#[test]
fn unused_reservation_is_refunded_after_a_json_response() {
    // Reserves 10 + 500 = 510, the upstream reports 10 + 20 = 30: 480 back.
    let mut host = host(1, ACME_1K, openai_json(10, 20));
    assert_eq!(host.send(chat("acme", 500)).status, 200);
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.tokens_reserved"),
        510
    );
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.tokens_refunded"),
        480
    );
    // The refund is visible to the next request: 1000 − 30 − its own 510.
    let r = host.send(chat("acme", 500));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("460"));
}

#[test]
fn streams_are_reconciled_chunk_by_chunk_from_the_usage_event() {
    // 25 output tokens, one SSE chunk each, then the usage chunk (prompt 10,
    // completion 25) and [DONE]; the filter must not hold the stream back.
    let behavior = EndpointBehavior::llm(Duration::from_millis(50), Duration::from_millis(10), 25);
    let mut host = host(1, ACME_1K, behavior);
    let body = format!(
        r#"{{"model":"gpt-4o","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":200,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(40)
    );
    let r =
        host.send(Request::post_json("/v1/chat/completions", &body).header("x-tenant-id", "acme"));
    assert_eq!(r.status, 200);
    assert!(r.chunks.len() >= 27, "the stream arrives chunk by chunk");
    // Chunks reached the client spread over time, not all at the end.
    let first = r.chunks.first().unwrap().0;
    let last = r.chunks.last().unwrap().0;
    assert!(
        last - first >= 200_000_000,
        "chunks were held back: {first}..{last}"
    );
    // Reserved 10 + 200, used 35: 175 refunded.
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.tokens_refunded"),
        175
    );
}

#[test]
fn streaming_openai_requests_get_include_usage_added() {
    let behavior = EndpointBehavior::llm(Duration::from_millis(5), Duration::from_millis(1), 3);
    let mut host = host(1, ACME_1K, behavior);
    let body = r#"{"model":"gpt-4o","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let r =
        host.send(Request::post_json("/v1/chat/completions", body).header("x-tenant-id", "acme"));
    assert_eq!(r.status, 200);
    let sent: Value = serde_json::from_slice(&r.upstream_request_body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["model"], "gpt-4o");
}

#[test]
fn a_stream_cut_without_usage_is_charged_an_estimate() {
    // Four content events and no usage event: the stream is charged its
    // prompt estimate plus the streamed text, not nothing and not the cap.
    let events: Vec<String> = (0..4)
        .map(|i| format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"abcdefgh{i}\"}}}}]}}\n\n"))
        .collect();
    let behavior = EndpointBehavior {
        headers: vec![("content-type".into(), "text/event-stream".into())],
        body: BodySpec::Sse(events),
        ..EndpointBehavior::default()
    };
    let mut host = host(1, ACME_1K, behavior);
    let body = format!(
        r#"{{"model":"gpt-4o","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":300,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(40)
    );
    let r =
        host.send(Request::post_json("/v1/chat/completions", &body).header("x-tenant-id", "acme"));
    assert_eq!(r.status, 200);
    // 36 streamed characters ≈ 9 tokens, prompt 10: 19 used of 310 reserved.
    assert_eq!(
        host.metric("sluice_tokens.tenant.acme.model.other.tokens_refunded"),
        291
    );
    assert_eq!(host.metric("sluice_tokens.estimated_usage"), 1);
}

#[test]
fn four_workers_interleaving_never_admit_more_than_the_limit() {
    // 20 requests start at the same virtual instant across 4 workers; each
    // reserves 100 of 1000: exactly 10 may go, whatever the interleaving.
    let mut host = host(4, ACME_1K, openai_json(10, 90));
    let ids: Vec<_> = (0..20)
        .map(|i| host.start_on(i % 4, chat("acme", 90)))
        .collect();
    host.advance(Duration::from_secs(1));
    let statuses: Vec<u32> = ids.into_iter().map(|id| host.finish(id).status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10);
    // Over a whole minute the bound is one bucket plus one minute of refill.
    let mut charged = 10 * 100;
    for second in 0..60 {
        host.advance(Duration::from_secs(1));
        for w in 0..4 {
            if host.send_on(w, chat("acme", 90)).status == 200 {
                charged += 100;
            }
        }
        assert!(
            charged <= 1000 + 1000 * (second + 2) / 60 + 100,
            "{charged} tokens by second {second}"
        );
    }
}

#[test]
fn a_flood_of_tenants_neither_resets_anyone_nor_grows_the_key_set() {
    let tokens = r#"
[tokens]
default_max_tokens = 100
max_keys = 50
  [[tokens.quota]]
  match = { tenants = "vip" }
  tokens = "1000/min"

  [[tokens.quota]]
  tokens = "1000/min"
"#;
    let mut host = host(2, tokens, openai_json(10, 90));
    // Two tenants use up their buckets: `acme` (unnamed) and `vip` (named).
    for tenant in ["acme", "vip"] {
        for _ in 0..10 {
            assert_eq!(host.send(chat(tenant, 90)).status, 200);
        }
        assert_eq!(host.send(chat(tenant, 90)).status, 429, "{tenant}");
    }
    // A flood of 500 new identities, within a few virtual seconds.
    let mut admitted = 0;
    for i in 0..500 {
        let r = host.send_on(i % 2, chat(&format!("flood-{i}"), 90));
        match r.status {
            200 => admitted += 1,
            429 => {}
            other => panic!("flood-{i}: {other} {}", r.body_text()),
        }
    }
    // Nobody was reset: both locked tenants are still locked.
    for tenant in ["acme", "vip"] {
        let r = host.send(chat(tenant, 90));
        assert_eq!(r.status, 429, "{tenant} was reset by the flood");
    }
    // The flood got the free slots (each key one bucket of 1000) and then
    // shared its rule's overflow bucket: limited, never unlimited.
    let overflowed = host.metric("sluice_tokens.overflowed");
    assert!(overflowed > 0, "the table never filled");
    assert!(
        admitted <= 50 * 10 + 10 + 10,
        "{admitted} admitted: more than the slots and the overflow hold"
    );
    assert!(admitted >= 40, "{admitted} admitted");
    // Shared data cannot delete: the table, the overflow and the named
    // region are the cap.
    let keys = host.world().shared_data.key_count("sluice");
    assert!(keys <= 50 + 16 + 2, "{keys} shared-data keys");
    // Metrics do not grow with invented tenants either.
    let tenant_metrics = host
        .metrics()
        .all()
        .keys()
        .filter(|k| k.starts_with("sluice_tokens.tenant."))
        .count();
    assert_eq!(
        tenant_metrics, 12,
        "the six counters of `vip` and of `other`"
    );
}

#[test]
fn malformed_requests_get_400_in_the_api_shape_and_never_reach_the_upstream() {
    let mut host = host(1, ACME_1K, openai_json(10, 90));
    let cases = [
        "{not json",
        r#"["an","array"]"#,
        r#"{"model":"gpt-4o","max_tokens":-5,"messages":[]}"#,
        r#"{"model":"gpt-4o","max_tokens":"lots","messages":[]}"#,
    ];
    for body in cases {
        let r = host
            .send(Request::post_json("/v1/chat/completions", body).header("x-tenant-id", "acme"));
        assert_eq!(r.status, 400, "{body}: {}", r.body_text());
        assert_eq!(json(&r)["error"]["type"], "invalid_request_error", "{body}");
        assert!(!reached_upstream(&r));
    }
    assert_eq!(host.metric("sluice_tokens.invalid_requests"), 4);
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

#[test]
fn requests_outside_the_llm_apis_pass_untouched() {
    let mut host = host(1, ACME_1K, openai_json(10, 90));
    for _ in 0..20 {
        let r = host.send(Request::get("/v1/models").header("x-tenant-id", "acme"));
        assert_eq!(r.status, 200);
        assert!(r.header("x-ratelimit-limit-tokens").is_none());
    }
}

#[test]
fn an_upstream_reporting_absurd_usage_is_clamped_not_trusted() {
    let body = r#"{"choices":[],"usage":{"prompt_tokens":-3,"completion_tokens":99999999999,"total_tokens":"many"}}"#;
    let mut host = host(
        1,
        ACME_1K,
        EndpointBehavior::fixed(200, body, Duration::from_millis(5)),
    );
    assert_eq!(host.send(chat("acme", 90)).status, 200);
    assert_eq!(host.metric("sluice_tokens.absurd_usage"), 1);
    assert!(host.vm_failures().is_empty());
}

#[test]
fn an_invalid_policy_is_rejected_at_configuration() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "{}",
        Duration::from_millis(1),
    ));
    let err = host
        .add_filter(
            PluginConfig::new(tokens_module())
                .name("sluice")
                .configuration(policy("[tokens]\ndefault_max_tokens = \"many\"\n")),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("on_configure returned false"), "{err}");
    assert!(
        err.contains("expected a whole number"),
        "the log says why: {err}"
    );
}
