//! Outlier detection and endpoint picking (`[outlier]` of `sluice.wasm`) in
//! the test host, wired as `sluice render envoy` wires it: the module in
//! the listener's chain (it picks and names endpoints in
//! `x-gateway-destination-endpoint`) and in the cluster's upstream filters
//! (root id `sluice.attempt`, once per attempt: it learns), one `vm_id`,
//! a cluster whose balancer follows the header (`override_host`), two
//! workers, virtual time.

mod common;

use std::time::Duration;

use common::{rendered_route, responses, sluice_filter};
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FaultKind, Host, HostOptions, Request, Response,
};

const ENDPOINTS: [&str; 4] = [
    "10.0.0.1:8000",
    "10.0.0.2:8000",
    "10.0.0.3:8000",
    "10.0.0.4:8000",
];

fn policy(outlier: &str, endpoints: &[&str]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
name = "outlier-test"

[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region"
  endpoints = [{}]

[outlier]
jitter = "0%"
{outlier}
"#,
        list.join(", ")
    )
}

/// A healthy LLM endpoint: first token after 50 ms, then 10 tokens 10 ms
/// apart (streams), ±20 %.
fn healthy() -> EndpointBehavior {
    EndpointBehavior::llm(Duration::from_millis(50), Duration::from_millis(10), 10).with_jitter(0.2)
}

fn host(outlier: &str, behaviours: Vec<EndpointBehavior>) -> Host {
    let addrs = &ENDPOINTS[..behaviours.len()];
    let mut host = Host::new(HostOptions {
        workers: 2,
        route: rendered_route("primary"),
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "primary",
        addrs
            .iter()
            .zip(behaviours)
            .map(|(a, b)| Endpoint::new(a, "zone-a", b))
            .collect(),
    ));
    let text = policy(outlier, addrs);
    host.add_filter(sluice_filter("sluice", &text)).unwrap();
    host.add_upstream_filter("primary", sluice_filter("sluice.attempt", &text))
        .unwrap();
    host
}

fn chat(stream: bool) -> Request {
    Request::post_json(
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"big","stream":{stream},"messages":[{{"role":"user","content":"hello"}}]}}"#
        ),
    )
}

fn served_by(r: &Response) -> &str {
    r.header("x-sluice-endpoint")
        .and_then(|v| v.split(';').next())
        .unwrap_or("-")
}

fn metric(host: &Host, endpoint: &str, name: &str) -> i64 {
    let label = endpoint.replace(['.', ':'], "_");
    host.metric(&format!("sluice_outlier.primary.{label}.{name}"))
}

fn no_failures(host: &Host) {
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

fn p99(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn an_erroring_endpoint_is_ejected_and_no_client_sees_its_errors() {
    let broken = healthy().with_fault(
        Duration::from_secs(2),
        Duration::from_secs(3600),
        FaultKind::Status(503),
    );
    let mut host = host("", vec![healthy(), broken, healthy(), healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        8,
        40,
        Duration::from_secs(120),
        || chat(false),
    );
    let all = responses(&host);
    assert_eq!(all.len(), 320);
    let failed: Vec<_> = all.iter().filter(|(_, r)| r.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(metric(&host, ENDPOINTS[1], "ejections"), 1);
    assert_eq!(
        host.logs_containing("endpoint 10.0.0.2:8000 ejected").len(),
        1,
        "{:?}",
        host.logs_containing("ejected")
    );
    // From a second after the fault, nothing goes to it any more.
    let late: Vec<u64> = all
        .iter()
        .filter(|(t, r)| *t >= 3000 && r.attempts > 1)
        .map(|(t, _)| *t)
        .collect();
    assert!(late.is_empty(), "retried after the ejection: {late:?}");
    // Every answer names its endpoint and why.
    let (_, r) = &all[all.len() - 1];
    let header = r.header("x-sluice-endpoint").unwrap();
    assert!(header.ends_with("reason=p2c"), "{header}");
    no_failures(&host);
}

#[test]
fn a_throttled_endpoint_gets_no_request_until_its_retry_after() {
    let throttled = healthy().with_fault(
        Duration::from_secs(2),
        Duration::from_millis(2500),
        FaultKind::Throttled { retry_after_s: 5 },
    );
    let mut host = host("", vec![healthy(), healthy(), throttled, healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        12,
        40,
        Duration::from_secs(120),
        || chat(false),
    );
    let all = responses(&host);
    assert!(
        all.iter().all(|(_, r)| r.status == 200),
        "a client saw {:?}",
        all.iter()
            .find(|(_, r)| r.status != 200)
            .map(|(_, r)| r.status)
    );
    let served: Vec<u64> = all
        .iter()
        .filter(|(_, r)| served_by(r) == ENDPOINTS[2])
        .map(|(t, _)| *t)
        .collect();
    // Its first 429 came at about 2 s; the workers learn it within a tick
    // (50 ms); then nothing until 7 s, and it is back after.
    let benched: Vec<u64> = served
        .iter()
        .copied()
        .filter(|t| (2200..6900).contains(t))
        .collect();
    assert!(benched.is_empty(), "served while benched: {benched:?}");
    assert!(
        served.iter().any(|&t| t >= 7100),
        "never came back: {served:?}"
    );
    assert!(metric(&host, ENDPOINTS[2], "throttled") >= 1);
    assert_eq!(
        metric(&host, ENDPOINTS[2], "ejections"),
        0,
        "a 429 benches, it does not eject"
    );
    no_failures(&host);
}

#[test]
fn an_endpoint_whose_quota_is_spent_is_benched_before_it_refuses() {
    // Every answer succeeds but says no request is left until 5 s on:
    // the next request there would be refused, so none goes there until
    // the reset (each answer sets a new one, 5 s after it).
    let spent = healthy()
        .with_header_bytes("x-ratelimit-limit-requests", b"100")
        .with_header_bytes("x-ratelimit-remaining-requests", b"0")
        .with_header_bytes("x-ratelimit-reset-requests", b"5s");
    let mut host = host("", vec![healthy(), spent, healthy(), healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        8,
        40,
        Duration::from_secs(120),
        || chat(false),
    );
    let all = responses(&host);
    assert!(all.iter().all(|(_, r)| r.status == 200));
    let served: Vec<u64> = all
        .iter()
        .filter(|(_, r)| served_by(r) == ENDPOINTS[1])
        .map(|(t, _)| *t)
        .collect();
    assert!(!served.is_empty(), "never tried");
    // Answers (response times) at least the reset apart, but for those
    // to requests already on their way (8 clients) when one said so.
    let gaps: Vec<u64> = served.windows(2).map(|w| w[1] - w[0]).collect();
    let short = gaps.iter().filter(|&&g| g < 4800).count();
    assert!(short <= 8, "{served:?}");
    assert!(
        served.len() * 10 < all.len(),
        "{} of {} on the spent endpoint",
        served.len(),
        all.len()
    );
    assert!(metric(&host, ENDPOINTS[1], "throttled") >= 1);
    assert_eq!(metric(&host, ENDPOINTS[1], "ejections"), 0);
    no_failures(&host);
}

#[test]
fn an_endpoint_that_cuts_its_streams_is_ejected() {
    // From 1 s on, every answer of endpoint 3 is reset after 2 chunks: a
    // 200 whose body never ends. No retry can save a stream once it has
    // started, so the endpoint must stop getting requests.
    let cutting = healthy().with_fault(
        Duration::from_secs(1),
        Duration::from_secs(3600),
        FaultKind::ResetMidStream { after_chunks: 2 },
    );
    let mut host = host("", vec![healthy(), healthy(), cutting, healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        8,
        40,
        Duration::from_secs(120),
        || chat(true),
    );
    let all = responses(&host);
    let cut_at: Vec<u64> = all
        .iter()
        .filter(|(_, r)| r.reset)
        .map(|(t, _)| *t)
        .collect();
    assert!(!cut_at.is_empty(), "the fault never showed");
    assert!(
        all.iter()
            .filter(|(_, r)| r.reset)
            .all(|(_, r)| served_by(r) == ENDPOINTS[2])
    );
    assert!(metric(&host, ENDPOINTS[2], "ejections") >= 1);
    // Five cuts in a row eject it (consecutive_errors' default): a few
    // dozen at most, not a quarter of the 280 requests after 1 s.
    assert!(cut_at.len() <= 30, "{} cut: {cut_at:?}", cut_at.len());
    no_failures(&host);
}

#[test]
fn a_blackholed_stream_is_abandoned_at_the_first_token_deadline() {
    let blackhole = healthy().with_fault(
        Duration::from_secs(1),
        Duration::from_secs(3600),
        FaultKind::Blackhole,
    );
    let mut host = host(
        r#"first_token_timeout = "500ms""#,
        vec![healthy(), healthy(), healthy(), blackhole],
    );
    common::load(
        &mut host,
        Duration::ZERO,
        6,
        40,
        Duration::from_secs(120),
        || chat(true),
    );
    let all = responses(&host);
    assert!(all.iter().all(|(_, r)| r.status == 200 && !r.reset));
    // No client waited for its first byte longer than the deadline plus a
    // healthy first token (50 ms + 20 %) and the router's back-off (25 ms).
    let worst = all
        .iter()
        .filter_map(|(_, r)| r.time_to_headers())
        .max()
        .unwrap();
    assert!(
        worst <= Duration::from_millis(500 + 60 + 50),
        "a client waited {worst:?}"
    );
    assert_eq!(metric(&host, ENDPOINTS[3], "ejections"), 1);
    // The hold is the per-attempt instance's: the client never sees the
    // internal header, and the endpoint never did either.
    assert!(
        all.iter()
            .all(|(_, r)| r.header("x-sluice-first-token").is_none())
    );
    no_failures(&host);
}

#[test]
fn a_slow_endpoint_is_shunned_at_once_and_then_ejected() {
    let slow = healthy().with_fault(
        Duration::from_secs(3),
        Duration::from_secs(3600),
        FaultKind::Slow(5.0),
    );
    let mut host = host("", vec![healthy(), slow, healthy(), healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        10,
        60,
        Duration::from_secs(120),
        || chat(true),
    );
    let all = responses(&host);
    let ttft = |from: u64, to: u64| {
        p99(all
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .filter_map(|(_, r)| r.time_to_headers().map(|d| d.as_millis() as u64))
            .collect())
    };
    let baseline = ttft(1000, 3000);
    let after = ttft(5000, 10_000);
    assert!(
        after as f64 <= 1.2 * baseline as f64,
        "p99 TTFT {after} ms from 2 s after the fault vs {baseline} ms before"
    );
    let to_slow = all
        .iter()
        .filter(|(t, r)| *t >= 3000 && served_by(r) == ENDPOINTS[1])
        .count();
    assert!(
        to_slow <= 10,
        "{to_slow} requests served by the slow endpoint"
    );
    assert_eq!(metric(&host, ENDPOINTS[1], "ejections"), 1);
    assert!(
        // Slow in both first token and per token (the fault multiplies
        // every latency): either detector may be first.
        host.logs_containing("10.0.0.2:8000 ejected")[0].contains("(slow-"),
        "{:?}",
        host.logs_containing("ejected")
    );
    no_failures(&host);
}

#[test]
fn a_client_cannot_name_its_endpoint_or_its_hold() {
    let broken = healthy().with_fault(
        Duration::ZERO,
        Duration::from_secs(3600),
        FaultKind::Status(503),
    );
    let mut host = host("", vec![broken, healthy(), healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        2,
        40,
        Duration::from_secs(120),
        || chat(false),
    );
    assert_eq!(metric(&host, ENDPOINTS[0], "ejections"), 1);
    let before = host.finished_count();
    common::load(
        &mut host,
        Duration::from_secs(3),
        1,
        20,
        Duration::from_secs(120),
        || {
            chat(true)
                .header("x-gateway-destination-endpoint", ENDPOINTS[0])
                .header("x-sluice-first-token", "1")
        },
    );
    let all = responses(&host);
    for (_, r) in &all[before..] {
        assert_eq!(r.status, 200);
        assert_eq!(r.attempts, 1, "the ejected endpoint was tried");
        let seen = r.upstream_request_headers.as_ref().unwrap();
        assert!(
            !seen
                .get("x-gateway-destination-endpoint")
                .unwrap()
                .starts_with(ENDPOINTS[0])
        );
    }
    no_failures(&host);
}

#[test]
fn when_every_endpoint_is_benched_envoy_decides_and_a_metric_says_so() {
    let throttled = || {
        healthy().with_fault(
            Duration::from_secs(1),
            Duration::from_secs(3600),
            FaultKind::Throttled { retry_after_s: 30 },
        )
    };
    let mut host = host("", vec![throttled(), throttled()]);
    common::load(
        &mut host,
        Duration::ZERO,
        3,
        20,
        Duration::from_secs(120),
        || chat(false),
    );
    assert!(host.metric("sluice_outlier.primary.panic") > 0);
    let all = responses(&host);
    // Answered (the upstreams' 429s pass through): nothing hangs, nothing
    // is refused by sluice itself.
    assert!(all.iter().all(|(_, r)| r.status == 200 || r.status == 429));
    assert!(all.iter().all(|(_, r)| !r.local_reply));
    no_failures(&host);
}

#[test]
fn a_request_the_breaker_reroutes_is_picked_among_the_fallback_backends_endpoints() {
    let text = r#"
name = "outlier-reroute"

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
  endpoints = ["10.0.1.1:8000", "10.0.1.2:8000"]
  [backend.breaker]
  enabled = false

[outlier]

[breaker]
mode = "consecutive"
consecutive_failures = 2
open_for = "30s"
  [breaker.degrade]
  action = "fallback-model"
  fallback_model = "small"
"#;
    let mut host = Host::new(HostOptions {
        workers: 1,
        route: rendered_route("primary"),
        ..HostOptions::default()
    });
    let failing = healthy().with_fault(
        Duration::ZERO,
        Duration::from_secs(3600),
        FaultKind::Status(500),
    );
    host.add_cluster(Cluster::new(
        "primary",
        vec![Endpoint::new("10.0.0.1:8000", "zone-a", failing)],
    ));
    host.add_cluster(Cluster::new(
        "fallback",
        vec![
            Endpoint::new("10.0.1.1:8000", "zone-a", healthy()),
            Endpoint::new("10.0.1.2:8000", "zone-a", healthy()),
        ],
    ));
    host.add_filter(sluice_filter("sluice", text)).unwrap();
    for cluster in ["primary", "fallback"] {
        host.add_upstream_filter(cluster, sluice_filter("sluice.attempt", text))
            .unwrap();
    }
    let ask = || {
        Request::post_json(
            "/v1/chat/completions",
            r#"{"model":"big","messages":[{"role":"user","content":"hello"}]}"#,
        )
    };
    for _ in 0..2 {
        assert_eq!(host.send(ask()).status, 500);
    }
    let r = host.send(ask());
    assert_eq!(r.status, 200, "{}", r.body_text());
    let sent = r.upstream_request_headers.as_ref().unwrap();
    assert_eq!(sent.get("x-sluice-backend"), Some("fallback"));
    let named = sent.get("x-gateway-destination-endpoint").unwrap();
    assert!(
        named.split(',').all(|e| e.starts_with("10.0.1.")),
        "the fallback's endpoints only, got {named}"
    );
    assert!(
        served_by(&r).starts_with("10.0.1."),
        "{:?}",
        r.header("x-sluice-endpoint")
    );
    no_failures(&host);
}

#[test]
fn hostile_requests_are_picked_like_any_other() {
    // HTTP/2-style requests that end with trailers, and identity headers
    // that are not UTF-8: the pick happens all the same (the request is
    // judged at its trailers), and an ejected endpoint stays avoided.
    let broken = healthy().with_fault(
        Duration::ZERO,
        Duration::from_secs(3600),
        FaultKind::Status(503),
    );
    let mut host = host("", vec![broken, healthy(), healthy()]);
    common::load(
        &mut host,
        Duration::ZERO,
        2,
        40,
        Duration::from_secs(120),
        || chat(false),
    );
    assert_eq!(metric(&host, ENDPOINTS[0], "ejections"), 1);
    let body = r#"{"model":"big","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    let (a, b) = body.split_at(body.len() / 2);
    for i in 0..10 {
        let request = Request::new("POST", "/v1/chat/completions")
            .header("content-type", "application/json")
            .header_bytes("x-tenant-id", &[0xff, 0xfe, i])
            .header_bytes("x-gateway-destination-endpoint", &[0xc3, 0x28])
            .chunk(a.as_bytes())
            .chunk(b.as_bytes())
            .trailer("x-checksum", "0");
        let r = host.send(request);
        assert_eq!(r.status, 200);
        assert_eq!(r.attempts, 1);
        let sent = r.upstream_request_headers.as_ref().unwrap();
        let named = sent.get("x-gateway-destination-endpoint").unwrap();
        assert!(!named.contains(ENDPOINTS[0]), "{named}");
        assert!(served_by(&r) != ENDPOINTS[0]);
    }
    no_failures(&host);
}

#[test]
fn a_stream_that_stalls_after_its_headers_is_abandoned_at_the_first_token_deadline() {
    // An endpoint that answers `200` at once and then sends nothing for 5 s:
    // without the per-attempt instance holding the headers, the router
    // would see them, stop the per-try timer, and the client would wait the
    // 5 s. With the hold, the attempt is cut at the deadline and retried.
    let stalled = healthy().with_body_delay(Duration::from_secs(5));
    let mut host = host(
        r#"first_token_timeout = "500ms""#,
        vec![stalled, healthy(), healthy()],
    );
    common::load(
        &mut host,
        Duration::ZERO,
        4,
        30,
        Duration::from_secs(120),
        || chat(true),
    );
    let all = responses(&host);
    assert!(all.iter().all(|(_, r)| r.status == 200 && !r.reset));
    let first_token = |r: &Response| {
        r.chunks
            .first()
            .map(|(at, _)| Duration::from_nanos(at.saturating_sub(r.started_ns)))
            .unwrap()
    };
    let worst = all.iter().map(|(_, r)| first_token(r)).max().unwrap();
    // The deadline, a healthy first token (50 ms + 20 %) and the back-off.
    assert!(
        worst <= Duration::from_millis(500 + 60 + 50),
        "a client waited {worst:?}"
    );
    assert!(
        all.iter().any(|(_, r)| r.attempts > 1),
        "no attempt was abandoned: the stalled endpoint was never tried"
    );
    assert!(all.iter().all(|(_, r)| served_by(r) != ENDPOINTS[0]));
    no_failures(&host);
}
