//! A seeded mesh scenario of 10,000 requests: zones, latency models, error
//! and 429 rates, a schedule of faults, override_host lists and retries.

mod common;

use std::time::Duration;

use common::probe;
use sluice_host_tests::mesh::{Scenario, run};
use sluice_host_tests::{Cluster, Endpoint, EndpointBehavior, FaultKind, PluginConfig, Request};

const S: Duration = Duration::from_secs(1);

fn scenario(seed: u64) -> Scenario {
    let llm = || {
        EndpointBehavior::llm(Duration::from_millis(80), Duration::from_millis(10), 8)
            .with_jitter(0.2)
            .with_error_rate(0.02)
    };
    let backend = Cluster::new(
        "backend",
        vec![
            Endpoint::new("10.0.0.1:8000", "zone-a", llm()),
            Endpoint::new(
                "10.0.0.2:8000",
                "zone-a",
                llm().with_fault(20 * S, 30 * S, FaultKind::Storm429),
            ),
            Endpoint::new(
                "10.0.0.3:8000",
                "zone-b",
                llm().with_fault(40 * S, 50 * S, FaultKind::Down),
            ),
            Endpoint::new(
                "10.0.0.4:8000",
                "zone-b",
                llm()
                    .with_fault(10 * S, 60 * S, FaultKind::Slow(5.0))
                    .with_fault(
                        70 * S,
                        75 * S,
                        FaultKind::ResetMidStream { after_chunks: 4 },
                    ),
            ),
        ],
    );
    let mut scenario = Scenario::new(seed, 10_000);
    scenario.rate_per_second = 100.0;
    scenario.workers = 2;
    scenario.clusters = vec![backend];
    scenario.filters = vec![PluginConfig::new(probe()).name("mesh").vm_id("mesh").configuration(
        r#"{"mode":"passthrough","retry_on":"5xx,reset,connect-failure,retriable-status-codes","max_retries":2,"retriable_status_codes":"429"}"#,
    )];
    scenario.request = Box::new(|index, _rng| {
        let request = Request::post_json("/v1/chat/completions", r#"{"model":"m","stream":true}"#);
        // A fifth of the requests pin an endpoint list, as an endpoint picker would.
        if index % 5 == 0 {
            request.header(
                "x-gateway-destination-endpoint",
                "10.0.0.3:8000,10.0.0.1:8000",
            )
        } else {
            request
        }
    });
    scenario
}

#[test]
fn ten_thousand_requests_seeded_and_reproducible() {
    let report = run(scenario(42)).unwrap();
    eprintln!(
        "mesh: {} requests, {:.1} s virtual, {:.2} s wall, {:.0} req/s, {} guest calls; outcomes {:?}; attempts {:?}; upstreams {:?}; p50 {:?} p99 {:?}",
        report.trace.len(),
        report.virtual_time.as_secs_f64(),
        report.wall_time.as_secs_f64(),
        report.requests_per_second(),
        report.guest_calls,
        report.outcomes,
        report.attempts,
        report.by_upstream,
        report.duration_percentile(50.0),
        report.duration_percentile(99.0),
    );
    assert!(report.vm_failures.is_empty(), "{:?}", report.vm_failures);
    assert_eq!(report.trace.len(), 10_000);
    assert_eq!(report.metrics["probe.passthrough.requests"], 10_000);

    // Retries hide most faults: 2 % errors, a 429 storm and an endpoint down
    // still leave ≥ 97 % successes; the reset window shows as truncated streams.
    assert!(report.share("200") > 0.97, "{:?}", report.outcomes);
    assert!(
        report.outcomes.get("200 reset").copied().unwrap_or(0) > 20,
        "{:?}",
        report.outcomes
    );
    assert!(report.share("200 reset") < 0.02);
    let retried: usize = report
        .attempts
        .iter()
        .filter(|(a, _)| **a > 1)
        .map(|(_, n)| n)
        .sum();
    assert!(retried > 200, "retries: {:?}", report.attempts);
    assert!(
        report.attempts.keys().all(|a| (1..=3).contains(a)),
        "max_retries 2: {:?}",
        report.attempts
    );
    // Every endpoint served traffic; the pinned list favours 10.0.0.3.
    assert_eq!(report.by_upstream.len(), 4, "{:?}", report.by_upstream);
    assert!(report.by_upstream["10.0.0.3:8000"] > report.by_upstream["10.0.0.2:8000"]);
    // Nothing answered from 10.0.0.3 while it was down, and no 10.0.0.2 success during the storm.
    for line in &report.trace {
        let start = Duration::from_micros(line.start_us);
        if line.upstream.as_deref() == Some("10.0.0.3:8000") && line.attempts == 1 {
            assert!(
                !(start >= 40 * S && start < 50 * S) || line.status != 200,
                "{line}"
            );
        }
    }
    // The slow window shows in the latency tail.
    assert!(report.duration_percentile(99.0).unwrap() > Duration::from_millis(400));

    // The same seed gives the identical trace; another seed does not.
    let again = run(scenario(42)).unwrap();
    assert_eq!(again.trace_hash, report.trace_hash);
    assert_eq!(again.trace, report.trace);
    let other = run(scenario(43)).unwrap();
    assert_ne!(other.trace_hash, report.trace_hash);
}
