//! Retry budgets (`[retry]` of `sluice.wasm`) in the test host: the module
//! in the listener's chain (it sets each request's `x-envoy-max-retries`
//! from the budget) and in the cluster's upstream filters (it deposits
//! each first attempt and charges each retry), two workers sharing one
//! budget, virtual time, an Envoy-like router that retries as told.

mod common;

use std::time::Duration;

use common::sluice_filter;
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FaultKind, Host, HostOptions, Request, Response,
};

fn healthy() -> EndpointBehavior {
    EndpointBehavior::fixed(200, r#"{"ok":true}"#, Duration::from_millis(20))
}

fn host(retry: &str, behaviours: Vec<EndpointBehavior>) -> Host {
    let addrs: Vec<String> = (1..=behaviours.len())
        .map(|i| format!("10.0.0.{i}:8000"))
        .collect();
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        r#"
name = "retry-test"

[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region"
  endpoints = [{}]

[retry]
{retry}
"#,
        list.join(", ")
    );
    let mut host = Host::new(HostOptions {
        workers: 2,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "backend",
        addrs
            .iter()
            .zip(behaviours)
            .map(|(a, b)| Endpoint::new(a, "zone-a", b))
            .collect(),
    ));
    host.add_filter(sluice_filter("sluice", &text)).unwrap();
    host.add_upstream_filter("backend", sluice_filter("sluice.attempt", &text))
        .unwrap();
    host
}

fn chat() -> Request {
    Request::post_json(
        "/v1/chat/completions",
        r#"{"model":"big","messages":[{"role":"user","content":"hello"}]}"#,
    )
}

fn load(host: &mut Host, seconds: u64, rps: u64) -> Vec<Response> {
    let total = seconds * rps;
    for i in 0..total {
        host.schedule_request(Duration::from_millis(i * 1000 / rps), None, chat(), i);
    }
    assert!(host.run_until(Duration::from_secs(seconds + 60), |h| {
        h.finished_count() == total as usize
    }));
    host.completed()
        .into_iter()
        .map(|(_, _, r)| r.clone())
        .collect()
}

fn no_failures(host: &Host) {
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

fn down() -> EndpointBehavior {
    healthy().with_fault(
        Duration::ZERO,
        Duration::from_secs(3600),
        FaultKind::Status(503),
    )
}

#[test]
fn a_total_outage_is_not_multiplied_and_clients_are_told_not_to_retry() {
    // 3 retries per request would make every request four attempts.
    let mut host = host(
        "max_retries = 3\nbudget = \"20%\"\nmin_retries_per_second = 1\nttl = \"10s\"",
        vec![down(), down(), down(), down()],
    );
    let all = load(&mut host, 10, 50);
    let attempts: u64 = all.iter().map(|r| r.attempts).sum();
    let amplification = attempts as f64 / all.len() as f64;
    eprintln!(
        "total outage: {attempts} attempts for {} requests ({amplification:.3}×)",
        all.len()
    );
    // Budget 20% plus the floor's share (1/s over 10 s + its 10 s reserve,
    // over 500 requests): 1.24 at most.
    assert!(
        amplification <= 1.24,
        "{attempts} attempts for {} requests",
        all.len()
    );
    assert!(
        amplification > 1.05,
        "the budget allowed no retry at all: {amplification}"
    );
    assert!(all.iter().all(|r| r.status == 503));
    let told = all
        .iter()
        .filter(|r| r.header("x-should-retry") == Some("false"))
        .count();
    // Once the budget is spent (early: a fifth of the first requests), the
    // failures say so.
    assert!(
        told * 10 >= all.len() * 7,
        "only {told} of {} told not to retry",
        all.len()
    );
    assert!(host.metric("sluice_retry.primary.refused") > 0);
    assert_eq!(host.metric("sluice_retry.primary.deposits"), 500);
    assert_eq!(
        host.metric("sluice_retry.primary.retries") as u64,
        attempts - 500,
        "every retry charged"
    );
    // Attempts per request, as the router counted them, one sample each.
    let samples = host
        .metrics()
        .get("sluice_retry.primary.attempts_per_request")
        .map(|m| m.samples.clone())
        .unwrap_or_default();
    assert_eq!(samples.len(), 500);
    assert_eq!(samples.iter().sum::<u64>(), attempts);
    no_failures(&host);
}

#[test]
fn random_failures_are_rescued_within_the_budget() {
    let flaky = || healthy().with_error_rate(0.3);
    let mut host = host(
        "max_retries = 2\nbudget = \"50%\"\nretry_on = [\"5xx\"]",
        vec![flaky(), flaky(), flaky(), flaky()],
    );
    let all = load(&mut host, 10, 50);
    let failed = all.iter().filter(|r| r.status != 200).count();
    let attempts: u64 = all.iter().map(|r| r.attempts).sum();
    let amplification = attempts as f64 / all.len() as f64;
    eprintln!(
        "30% 503s: {failed} of {} failed, {amplification:.3}× attempts",
        all.len()
    );
    // Without retries 30% would fail; two retries leave 0.3³ ≈ 2.7%.
    assert!(
        failed * 10 <= all.len() * 3 / 10,
        "{failed} of {} failed",
        all.len()
    );
    assert!(amplification <= 1.5, "amplification {amplification}");
    // Every answer says how many attempts it took.
    assert!(all.iter().any(|r| r.attempts > 1));
    no_failures(&host);
}

/// Big requests' retries in a total outage, with and without weighing
/// requests by their tokens.
fn big_retries(typical_request_tokens: u32) -> u64 {
    let mut host = host(
        &format!(
            "max_retries = 1\nbudget = \"20%\"\nmin_retries_per_second = 1\nttl = \"60s\"\n\
             typical_request_tokens = {typical_request_tokens}"
        ),
        vec![down(), down()],
    );
    // About 2,000 prompt tokens and a 100-token cap: 21 typical requests
    // of 100 tokens each.
    let prompt = "lorem ipsum dolor sit amet ".repeat(300);
    let body = format!(
        r#"{{"model":"big","max_tokens":100,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    for i in 0..40u64 {
        host.schedule_request(
            Duration::from_millis(i * 100),
            None,
            Request::post_json("/v1/chat/completions", &body),
            i,
        );
    }
    assert!(host.run_until(Duration::from_secs(60), |h| h.finished_count() == 40));
    no_failures(&host);
    host.metric("sluice_retry.primary.retries") as u64
}

#[test]
fn a_huge_prompt_s_retry_costs_what_many_small_ones_do() {
    // Unweighted, the floor's reserve (60 retries) pays every big retry;
    // weighted, the reserve and the 20% deposits are worth about 11 of them.
    let unweighted = big_retries(0);
    let weighted = big_retries(100);
    assert!(unweighted >= 38, "unweighted: {unweighted} of 40 retried");
    assert!(
        (5..=15).contains(&weighted),
        "weighted: {weighted} of 40 retried"
    );
}
