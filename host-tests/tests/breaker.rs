//! The breaker (`[breaker]` of `sluice.wasm`) in the test host: each
//! circuit mode against simulated upstreams under virtual time, several
//! workers sharing one circuit, bulkhead isolation and queueing, and the
//! three degradations (fail fast, fallback model with streaming, static
//! answers read back by a real SSE parser).

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use serde_json::Value;
use sluice_host_tests::mesh::{self, Scenario};
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FaultKind, FilterModule, Host, HostOptions, PluginConfig,
    Request, Response, RouteConfig,
};

fn module() -> FilterModule {
    FilterModule::load("sluice").expect("sluice.wasm (build it with `cargo xtask build`)")
}

/// Two backends: `primary` serves `big`, `fallback` serves `small` and
/// never breaks; `breaker` is the `[breaker]` section under test.
fn policy(breaker: &str) -> String {
    format!(
        r#"
name = "breaker-test"

[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region"
  endpoints = ["10.0.0.1:8000"]

[[backend]]
name = "fallback"
models = ["small"]
  [[backend.zone]]
  name = "zone-a"
  region = "region"
  endpoints = ["10.0.1.1:8000"]
  [backend.breaker]
  enabled = false

[breaker]
jitter = "0%"
{breaker}
"#
    )
}

/// Routes as `sluice render envoy` does: by `x-sluice-backend`, else primary.
fn route() -> RouteConfig {
    RouteConfig {
        cluster_header: Some("x-sluice-backend".into()),
        default_cluster: Some("primary".into()),
        ..RouteConfig::default()
    }
}

fn host(workers: usize, breaker: &str, primary: EndpointBehavior) -> Host {
    let fallback = EndpointBehavior::llm(Duration::from_millis(50), Duration::from_millis(10), 5);
    host_with(workers, breaker, primary, fallback)
}

fn host_with(
    workers: usize,
    breaker: &str,
    primary: EndpointBehavior,
    fallback: EndpointBehavior,
) -> Host {
    let mut host = Host::new(HostOptions {
        workers,
        route: route(),
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "primary",
        vec![Endpoint::new("10.0.0.1:8000", "zone-a", primary)],
    ));
    host.add_cluster(Cluster::new(
        "fallback",
        vec![Endpoint::new("10.0.1.1:8000", "zone-a", fallback)],
    ));
    // As `sluice render envoy` configures it.
    host.add_filter(
        PluginConfig::new(module())
            .name("sluice")
            .vm_id("sluice")
            .configuration(policy(breaker))
            .allow_on_headers_stop_iteration(true),
    )
    .unwrap();
    host
}

fn chat(model: &str, stream: bool) -> Request {
    Request::post_json(
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hello"}}]}}"#
        ),
    )
}

fn ok(latency_ms: u64) -> EndpointBehavior {
    EndpointBehavior::fixed(200, r#"{"ok":true}"#, Duration::from_millis(latency_ms))
}

fn failing_until(secs: u64, status: u32) -> EndpointBehavior {
    ok(10).with_fault(
        Duration::ZERO,
        Duration::from_secs(secs),
        FaultKind::Status(status),
    )
}

fn degraded(r: &Response) -> (&str, &str) {
    (
        r.header("x-sluice-degraded").unwrap_or("-"),
        r.header("x-sluice-degraded-reason").unwrap_or("-"),
    )
}

fn metric(host: &Host, name: &str) -> i64 {
    host.metric(&format!("sluice_breaker.primary.big.{name}"))
}

fn no_failures(host: &Host) {
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

const CONSECUTIVE: &str = r#"
mode = "consecutive"
consecutive_failures = 3
open_for = "5s"
max_open_for = "20s"
half_open_probes = 2
"#;

#[test]
fn consecutive_failures_open_the_circuit_and_probes_close_it() {
    let mut host = host(2, CONSECUTIVE, failing_until(8, 500));
    for _ in 0..3 {
        let r = host.send(chat("big", false));
        assert_eq!((r.status, r.local_reply), (500, false));
    }
    assert_eq!(metric(&host, "transition.open"), 1);
    assert_eq!(metric(&host, "state"), 1);

    let r = host.send(chat("big", false));
    assert_eq!((r.status, r.local_reply), (503, true));
    assert_eq!(degraded(&r), ("fail-fast", "circuit-open"));
    assert_eq!(r.header("retry-after"), Some("5"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "circuit-open");
    assert!(
        r.upstream_request_headers.is_none(),
        "never reached the router"
    );

    // Half-open at 5 s while the fault lasts: the probe fails, the circuit
    // re-opens for twice as long.
    host.advance(Duration::from_secs(5));
    let r = host.send(chat("big", false));
    assert_eq!(
        (r.status, r.local_reply),
        (500, false),
        "a probe went through"
    );
    assert_eq!(metric(&host, "transition.half_open"), 1);
    assert_eq!(metric(&host, "transition.open"), 2);
    let r = host.send(chat("big", false));
    assert_eq!(r.header("retry-after"), Some("10"));

    // Recovered: two successful probes close it.
    host.advance(Duration::from_secs(10));
    for _ in 0..3 {
        let r = host.send(chat("big", false));
        assert_eq!((r.status, r.local_reply), (200, false));
    }
    assert_eq!(metric(&host, "transition.closed"), 1);
    assert_eq!(metric(&host, "state"), 0);
    assert_eq!(metric(&host, "rejected.circuit-open"), 2);
    no_failures(&host);
}

#[test]
fn a_trip_seen_by_one_worker_opens_the_circuit_for_all() {
    let mut host = host(3, CONSECUTIVE, failing_until(3600, 503));
    for _ in 0..3 {
        assert_eq!(host.send_on(0, chat("big", false)).status, 503);
    }
    for worker in [1, 2, 0] {
        let r = host.send_on(worker, chat("big", false));
        assert!(r.local_reply, "worker {worker} still sent upstream");
        assert_eq!(degraded(&r), ("fail-fast", "circuit-open"));
    }
    no_failures(&host);
}

#[test]
fn resets_and_connect_failures_count_from_envoy_response_flags() {
    let breaker = r#"
mode = "consecutive"
consecutive_failures = 2
open_for = "30s"
max_open_for = "60s"
"#;
    let primary = EndpointBehavior::llm(Duration::from_millis(20), Duration::from_millis(5), 10)
        .with_fault(
            Duration::ZERO,
            Duration::from_secs(1),
            FaultKind::ResetMidStream { after_chunks: 2 },
        )
        .with_fault(
            Duration::from_secs(1),
            Duration::from_secs(2),
            FaultKind::Down,
        );
    let mut host = host(2, breaker, primary);
    let r = host.send(chat("big", true));
    assert!(r.reset && r.status == 200, "a stream reset mid-way");
    assert_eq!(metric(&host, "state"), 0, "one failure is not enough");
    host.advance(Duration::from_secs(1));
    let r = host.send(chat("big", false));
    assert_eq!(r.status, 503, "connection refused");
    assert_eq!(metric(&host, "transition.open"), 1);
    assert!(host.send(chat("big", false)).local_reply);
    no_failures(&host);
}

#[test]
fn rate_mode_trips_on_slow_calls_once_the_window_is_full() {
    let breaker = r#"
mode = "rate"
window = 10
min_calls = 10
failure_rate = "50%"
slow_rate = "50%"
slow_ttft = "1s"
open_for = "10s"
max_open_for = "60s"
"#;
    // Every call takes 3 s to its first byte: slow, not failed.
    let primary = ok(100).with_fault(
        Duration::ZERO,
        Duration::from_secs(3600),
        FaultKind::Slow(30.0),
    );
    let mut host = host(2, breaker, primary);
    for i in 0..10 {
        let r = host.send(chat("big", false));
        assert_eq!((r.status, r.local_reply), (200, false), "call {i}");
        let expected_state = if i < 9 { 0 } else { 1 };
        assert_eq!(metric(&host, "state"), expected_state, "after call {i}");
    }
    let r = host.send(chat("big", false));
    assert_eq!(degraded(&r), ("fail-fast", "circuit-open"));
    assert_eq!(metric(&host, "rejected.circuit-open"), 1);
    no_failures(&host);
}

fn adaptive_scenario(seed: u64) -> Scenario {
    let breaker = r#"
mode = "adaptive"
window = "10s"
k = 2.0
max_reject = "80%"
"#;
    let mut scenario = Scenario::new(seed, 1200);
    scenario.rate_per_second = 30.0;
    scenario.route = route();
    scenario.clusters = vec![
        Cluster::new(
            "primary",
            vec![Endpoint::new(
                "10.0.0.1:8000",
                "zone-a",
                failing_until(15, 503).with_jitter(0.2),
            )],
        ),
        Cluster::fixed("fallback", 200, "{}", Duration::from_millis(10)),
    ];
    scenario.filters = vec![
        PluginConfig::new(module())
            .name("sluice")
            .vm_id("sluice")
            .configuration(policy(breaker))
            .allow_on_headers_stop_iteration(true),
    ];
    scenario.request = Box::new(|_, _| chat("big", false));
    scenario
}

#[test]
fn adaptive_throttling_sheds_load_while_the_backend_fails_and_stops_after() {
    let report = mesh::run(adaptive_scenario(7)).unwrap();
    assert!(report.vm_failures.is_empty(), "{:?}", report.vm_failures);
    let during = |t: &&mesh::TraceLine| t.start_us > 5_000_000 && t.start_us < 15_000_000;
    let shed = report
        .trace
        .iter()
        .filter(during)
        .filter(|t| t.local_reply)
        .count();
    let sent = report
        .trace
        .iter()
        .filter(during)
        .filter(|t| !t.local_reply)
        .count();
    let total = shed + sent;
    // Everything fails: the SRE formula sheds up to max_reject (80%), and
    // always lets some through to notice recovery.
    assert!(
        shed * 100 >= total * 50,
        "shed {shed} of {total} while failing"
    );
    assert!(sent > 0, "some requests still probe the backend");
    // Well after recovery (one window later) nothing is shed.
    let late: Vec<_> = report
        .trace
        .iter()
        .filter(|t| t.start_us > 30_000_000)
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|t| t.status == 200 && !t.local_reply),
        "{:?}",
        late.iter().find(|t| t.status != 200)
    );
    // Seeded: the same seed replays the same trace.
    let again = mesh::run(adaptive_scenario(7)).unwrap();
    assert_eq!(report.trace_hash, again.trace_hash);
}

#[test]
fn bulkhead_isolates_tenants() {
    let breaker = r#"
mode = "consecutive"
  [breaker.bulkhead]
  max_in_flight = 8
  max_in_flight_per_tenant = 2
"#;
    let mut host = host(2, breaker, ok(2_000));
    let as_tenant = |t: &str| chat("big", false).header("x-tenant-id", t);
    let a1 = host.start(as_tenant("a"));
    let a2 = host.start(as_tenant("a"));
    let a3 = host.start(as_tenant("a"));
    let r = host.finish(a3);
    assert_eq!((r.status, r.local_reply), (503, true));
    assert_eq!(degraded(&r), ("fail-fast", "bulkhead-full"));
    assert_eq!(r.duration(), Some(Duration::ZERO), "refused at once");
    // Tenant b is not held up by a's full share.
    let b = host.send(as_tenant("b"));
    assert_eq!((b.status, b.local_reply), (200, false));
    for id in [a1, a2] {
        assert_eq!(host.finish(id).status, 200);
    }
    // Slots came back when a's requests ended.
    assert_eq!(host.send(as_tenant("a")).status, 200);
    assert_eq!(metric(&host, "rejected.bulkhead-full"), 1);
    no_failures(&host);
}

const QUEUE: &str = r#"
mode = "consecutive"
  [breaker.bulkhead]
  max_in_flight = 1
  queue = 4
  max_wait = "1s"
"#;

#[test]
fn a_queued_request_resumes_when_a_slot_frees() {
    let mut host = host(2, QUEUE, ok(300));
    let first = host.start(chat("big", false));
    let second = host.start(chat("big", true));
    let r2 = host.finish(second);
    let r1 = host.response(first).unwrap();
    assert_eq!((r1.status, r2.status), (200, 200));
    assert!(!r2.local_reply);
    let waited = r2.duration().unwrap();
    // It went upstream after the first ended (300 ms) and within one tick
    // (20 ms) of that, then took its own 300 ms.
    assert!(
        waited >= Duration::from_millis(600) && waited <= Duration::from_millis(625),
        "{waited:?}"
    );
    no_failures(&host);
}

#[test]
fn a_queued_request_is_answered_when_its_wait_times_out() {
    let mut host = host(2, QUEUE, ok(3_000));
    let first = host.start(chat("big", false));
    let second = host.start(chat("big", false));
    let r2 = host.finish(second);
    assert_eq!((r2.status, r2.local_reply), (503, true));
    assert_eq!(degraded(&r2), ("fail-fast", "queue-timeout"));
    let waited = r2.duration().unwrap();
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1_025),
        "{waited:?}"
    );
    assert_eq!(host.finish(first).status, 200);
    assert_eq!(metric(&host, "rejected.queue-timeout"), 1);
    no_failures(&host);
}

const FALLBACK: &str = r#"
mode = "consecutive"
consecutive_failures = 2
open_for = "30s"
max_open_for = "60s"
  [breaker.degrade]
  action = "fallback-model"
  fallback_model = "small"
"#;

#[test]
fn fallback_model_serves_streams_from_the_fallback_backend() {
    let mut host = host(2, FALLBACK, failing_until(3600, 500));
    for _ in 0..2 {
        assert_eq!(host.send(chat("big", true)).status, 500);
    }
    let r = host.send(chat("big", true));
    assert_eq!((r.status, r.local_reply), (200, false));
    assert_eq!(degraded(&r), ("fallback-model", "circuit-open"));
    assert_eq!(r.upstream.as_deref(), Some("10.0.1.1:8000"));
    let sent = r.upstream_request_headers.as_ref().unwrap();
    assert_eq!(sent.get("x-sluice-backend"), Some("fallback"));
    let body: Value = serde_json::from_slice(&r.upstream_request_body).unwrap();
    assert_eq!(body["model"], "small");
    assert_eq!(body["stream"], true);
    assert_eq!(body["messages"][0]["content"], "hello");
    // Streamed through chunk by chunk, not buffered.
    assert!(r.chunks.len() >= 5, "{} chunks", r.chunks.len());
    assert!(r.chunks.windows(2).all(|w| w[0].0 < w[1].0));
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(metric(&host, "degraded.fallback_model"), 1);
    no_failures(&host);
}

#[test]
fn clients_cannot_route_themselves() {
    let mut host = host(2, FALLBACK, ok(10));
    let r = host.send(chat("big", false).header("x-sluice-backend", "fallback"));
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream.as_deref(), Some("10.0.0.1:8000"));
    // Stripped; the default backend needs no pin (Envoy's default route).
    let sent = r.upstream_request_headers.unwrap();
    assert!(sent.get_all("x-sluice-backend").is_empty());
    // Requests for the fallback's model go there by the policy's model list.
    let r = host.send(chat("small", false));
    assert_eq!(r.upstream.as_deref(), Some("10.0.1.1:8000"));
    no_failures(&host);
}

const STATIC_TEXT: &str = "The assistant is busy; please try again shortly.";

fn static_host() -> Host {
    let breaker = format!(
        r#"
mode = "consecutive"
consecutive_failures = 1
open_for = "30s"
max_open_for = "60s"
  [breaker.degrade]
  action = "static"
  static_text = "{STATIC_TEXT}"
"#
    );
    let mut host = host(2, &breaker, failing_until(3600, 500));
    assert_eq!(host.send(chat("big", false)).status, 500);
    host
}

/// Parses an SSE body with eventsource-stream (the WHATWG rules), fed in
/// small pieces so event boundaries inside chunks are exercised too.
fn sse_events(body: &[u8]) -> Vec<Event> {
    let pieces: Vec<Result<Vec<u8>, std::convert::Infallible>> =
        body.chunks(7).map(|c| Ok(c.to_vec())).collect();
    futures::executor::block_on(
        futures::stream::iter(pieces)
            .eventsource()
            .map(|e| e.expect("valid SSE"))
            .collect(),
    )
}

#[test]
fn static_answers_in_json_and_as_a_valid_openai_stream() {
    let mut host = static_host();
    let r = host.send(chat("big", false));
    assert_eq!((r.status, r.local_reply), (200, true));
    assert_eq!(degraded(&r), ("static", "circuit-open"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], STATIC_TEXT);

    let r = host.send(chat("big", true));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = sse_events(&r.body);
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(last.data, "[DONE]");
    let text: String = chunks
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(text, STATIC_TEXT);
    assert_eq!(metric(&host, "degraded.static"), 2);
    no_failures(&host);
}

#[test]
fn static_answers_as_a_valid_anthropic_stream() {
    let mut host = static_host();
    let r = host.send(Request::post_json(
        "/v1/messages",
        r#"{"model":"big","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    ));
    assert_eq!((r.status, r.local_reply), (200, true));
    let events = sse_events(&r.body);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let delta: Value = serde_json::from_str(&events[2].data).unwrap();
    assert_eq!(delta["delta"]["text"], STATIC_TEXT);
    no_failures(&host);
}

#[test]
fn odd_statuses_and_bodies_neither_panic_nor_trip() {
    let mut host = host(
        2,
        CONSECUTIVE,
        EndpointBehavior::fixed(299, "not json at all", Duration::from_millis(5)),
    );
    for body in ["", "{", "[1,2]", r#"{"model":42}"#, "\u{0}\u{1}"] {
        let r = host.send(Request::post_json("/v1/chat/completions", body));
        assert_eq!(r.status, 299, "{body:?}");
    }
    // Not an LLM call: passes untouched.
    assert_eq!(host.send(Request::get("/v1/models")).status, 299);
    assert_eq!(metric(&host, "state"), 0);
    no_failures(&host);
}
