//! Zone failover (`[failover]` of `sluice.wasm`) in the test host, wired as
//! `sluice render envoy` wires it (the module in the listener's chain and
//! in the cluster's upstream filters, one `vm_id`, an `override_host`
//! cluster whose localities are the zones), two workers, virtual time.
//! Zone a = 10.0.0.1–2, zone b = 10.0.0.3–4; the proxy's own zone comes
//! from `node.locality`.

mod common;

use std::time::Duration;

use common::{rendered_route, responses, sluice_filter};
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FaultKind, Host, HostOptions, Locality, Request, Response,
};

const ZONE_A: [&str; 2] = ["10.0.0.1:8000", "10.0.0.2:8000"];
const ZONE_B: [&str; 2] = ["10.0.0.3:8000", "10.0.0.4:8000"];

fn policy(failover: &str) -> String {
    format!(
        r#"
name = "failover-test"

[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region"
  endpoints = ["{}", "{}"]
  [[backend.zone]]
  name = "zone-b"
  region = "region"
  endpoints = ["{}", "{}"]

[outlier]
jitter = "0%"

[failover]
failback_after = "5s"
{failover}
"#,
        ZONE_A[0], ZONE_A[1], ZONE_B[0], ZONE_B[1]
    )
}

/// A healthy endpoint: a JSON answer after 40 ms ±20 %.
fn healthy() -> EndpointBehavior {
    EndpointBehavior::fixed(
        200,
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#,
        Duration::from_millis(40),
    )
    .with_jitter(0.2)
}

fn host_in(node_zone: &str, failover: &str, a: EndpointBehavior, b: EndpointBehavior) -> Host {
    host_with_state(node_zone, failover, a, b, &[])
}

/// [`host_in`], its shared data holding `state` (key, bytes) before the
/// filters start: what a reloaded configuration finds.
fn host_with_state(
    node_zone: &str,
    failover: &str,
    a: EndpointBehavior,
    b: EndpointBehavior,
    state: &[(&str, Vec<u8>)],
) -> Host {
    let mut options = HostOptions {
        workers: 2,
        route: rendered_route("primary"),
        ..HostOptions::default()
    };
    options.node.locality = Locality::zone("region", node_zone);
    let mut host = Host::new(options);
    let endpoints = ZONE_A
        .iter()
        .map(|e| Endpoint::new(e, "zone-a", a.clone()))
        .chain(ZONE_B.iter().map(|e| Endpoint::new(e, "zone-b", b.clone())))
        .collect();
    host.add_cluster(Cluster::new("primary", endpoints));
    for (key, bytes) in state {
        host.set_shared_data("sluice", key, bytes);
    }
    let text = policy(failover);
    host.add_filter(sluice_filter("sluice", &text)).unwrap();
    host.add_upstream_filter("primary", sluice_filter("sluice.attempt", &text))
        .unwrap();
    host
}

fn chat() -> Request {
    Request::post_json(
        "/v1/chat/completions",
        r#"{"model":"big","messages":[{"role":"user","content":"hello"}]}"#,
    )
}

/// `(zone, reason)` of `x-sluice-zone`.
fn zone_of(r: &Response) -> (String, String) {
    let v = r.header("x-sluice-zone").unwrap_or("-; reason=-");
    let (zone, reason) = v.split_once("; reason=").unwrap_or((v, "-"));
    let reason = reason.split(';').next().unwrap_or("-");
    (zone.to_owned(), reason.to_owned())
}

/// The zone a request was first sent to, and why (`first=` after a retry).
fn first_zone(r: &Response) -> (String, String) {
    let v = r.header("x-sluice-zone").unwrap_or("-");
    match v.split_once("; first=") {
        Some((_, first)) => {
            let (zone, why) = first.split_once('/').unwrap_or((first, "-"));
            (zone.to_owned(), why.to_owned())
        }
        None => zone_of(r),
    }
}

fn metric(host: &Host, name: &str) -> i64 {
    host.metric(&format!("sluice_failover.primary.{name}"))
}

fn no_vm_failures(host: &Host) {
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

#[test]
fn the_proxys_own_zone_is_preferred_and_every_answer_names_its_zone() {
    for (node, other) in [("zone-a", "zone-b"), ("zone-b", "zone-a")] {
        let mut host = host_in(node, "", healthy(), healthy());
        common::load(
            &mut host,
            Duration::ZERO,
            3,
            40,
            Duration::from_secs(60),
            chat,
        );
        let all = responses(&host);
        assert_eq!(all.len(), 120);
        // Every request but the standby zone's probes (one a second, the
        // latency its peer is judged against) stays in the proxy's zone.
        let probes = all.iter().filter(|(_, r)| zone_of(r).1 == "probe").count();
        for (_, r) in &all {
            assert_eq!(r.status, 200);
            if zone_of(r).1 == "probe" {
                assert_eq!(zone_of(r).0, other);
            } else {
                assert_eq!(zone_of(r), (node.to_owned(), "preferred".to_owned()));
            }
        }
        assert!((2..=4).contains(&probes), "{probes} probes in 3 s");
        assert_eq!(metric(&host, &format!("{other}.requests")), probes as i64);
        assert_eq!(metric(&host, &format!("{node}.share")), 1000);
        no_vm_failures(&host);
    }
}

#[test]
fn a_zone_answering_503_is_drained_within_ticks_and_no_client_fails() {
    let failing = healthy().with_fault(
        Duration::from_secs(2),
        Duration::from_secs(3600),
        FaultKind::Status(503),
    );
    let mut host = host_in("zone-a", "", failing, healthy());
    common::load(
        &mut host,
        Duration::ZERO,
        6,
        100,
        Duration::from_secs(60),
        chat,
    );
    let all = responses(&host);
    let failed: Vec<_> = all.iter().filter(|(_, r)| r.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    // After the drain (ten failures in a row, 40 ms each, flushed at once,
    // and a tick to plan: 250 ms at 100 requests a second), requests drawn
    // for zone a are probes only.
    let to_a: Vec<(u64, (String, String))> = all
        .iter()
        .filter(|(t, _)| *t >= 2250)
        .map(|(t, r)| (*t, first_zone(r)))
        .filter(|(_, (zone, why))| zone == "zone-a" && why != "probe")
        .collect();
    assert!(to_a.is_empty(), "sent to zone a after the drain: {to_a:?}");
    // The endpoints named for the router agree: first a zone-b endpoint
    // once zone a is drained, and before, zone b's best as first fallback.
    for (t, r) in &all {
        let list = r
            .upstream_request_headers
            .as_ref()
            .and_then(|h| h.get("x-gateway-destination-endpoint"))
            .unwrap_or_default()
            .to_owned();
        let named: Vec<&str> = list.split(',').collect();
        if *t >= 2250 && first_zone(r).1 != "probe" {
            assert!(ZONE_B.contains(&named[0]), "{t}: {list}");
        }
        if *t < 2000 && first_zone(r).1 != "probe" {
            assert!(
                ZONE_A.contains(&named[0]) && ZONE_B.contains(&named[1]),
                "{t}: {list}"
            );
        }
    }
    // Probes, one a second: of standby zone b before the fault, of
    // drained zone a after (each saved by zone b).
    let probes = metric(&host, "probes");
    assert!((4..=8).contains(&probes), "{probes} probes in 6 s");
    assert_eq!(metric(&host, "zone-a.drains"), 1);
    assert_eq!(metric(&host, "zone-a.share"), 0);
    assert_eq!(metric(&host, "zone-b.share"), 1000);
    assert_eq!(
        host.logs_containing("zone zone-a drained (errors)").len(),
        1
    );
    no_vm_failures(&host);
}

#[test]
fn a_healed_zone_fails_back_once_after_failback_after() {
    let flaky = healthy().with_fault(
        Duration::from_secs(1),
        Duration::from_secs(3),
        FaultKind::Status(503),
    );
    let mut host = host_in("zone-a", "", flaky, healthy());
    common::load(
        &mut host,
        Duration::ZERO,
        14,
        40,
        Duration::from_secs(60),
        chat,
    );
    let all = responses(&host);
    assert!(all.iter().all(|(_, r)| r.status == 200));
    assert_eq!(metric(&host, "zone-a.drains"), 1);
    assert_eq!(metric(&host, "zone-a.failbacks"), 1);
    // Healed at 3 s. The zone was drained before [outlier] ejected any of
    // its endpoints (five failures in a row over the zone, two or three
    // per endpoint), so it comes all the way back; had one stayed ejected,
    // it would come back at the level it held.
    let back = all
        .iter()
        .filter(|(t, r)| *t > 3000 && zone_of(r) == ("zone-a".into(), "preferred".into()))
        .map(|(t, _)| *t)
        .min()
        .expect("zone a never came back");
    // Its probes show it healthy within a few seconds (the failure share
    // they saw fades over the 2 s error window), then 5 s of dwell.
    assert!((8000..=14_000).contains(&back), "back at {back} ms");
    let share = metric(&host, "zone-a.share");
    assert_eq!(share, 1000, "zone a's share {share}‰");
    assert_eq!(
        host.metric("sluice_outlier.primary.10_0_0_1_8000.ejections")
            + host.metric("sluice_outlier.primary.10_0_0_2_8000.ejections"),
        0
    );
    assert_eq!(
        host.logs_containing("zone zone-a back from 0% to").len(),
        1,
        "{:?}",
        host.logs_containing("sluice failover")
    );
    no_vm_failures(&host);
}

#[test]
fn provider_quota_headers_move_traffic_before_any_429() {
    // Zone a's provider reports 8 requests of 100 left, and a request or
    // two are always on their way (50 a second, 40 ms each): 93–94% used,
    // past max_utilization (90%), so its health is about (1 − 0.935) / 0.1
    // ≈ 65% and about 90% of new requests stay (65% / min_healthy 71%); as
    // more are in flight at a moment, less. Its share only drops until
    // failback_after (5 s) passes, so it settles at the lowest seen.
    let nearly_out = healthy()
        .with_header_bytes("x-ratelimit-limit-requests", b"100")
        .with_header_bytes("x-ratelimit-remaining-requests", b"8")
        .with_header_bytes("x-ratelimit-reset-requests", b"20s");
    let mut host = host_in("zone-a", "", nearly_out, healthy());
    common::load(
        &mut host,
        Duration::ZERO,
        4,
        50,
        Duration::from_secs(60),
        chat,
    );
    let all = responses(&host);
    assert!(all.iter().all(|(_, r)| r.status == 200));
    let late: Vec<&Response> = all
        .iter()
        .filter(|(t, _)| *t >= 1000)
        .map(|(_, r)| r)
        .collect();
    let on_a = late.iter().filter(|r| zone_of(r).0 == "zone-a").count();
    let share = on_a as f64 / late.len() as f64;
    assert!((0.1..0.95).contains(&share), "zone a kept {share:.2}");
    assert!(late.iter().any(|r| zone_of(r).1 == "spill"));
    assert!(
        host.logs_containing("health (quota): spilling").len() == 1,
        "{:?}",
        host.logs_containing("sluice failover")
    );
    no_vm_failures(&host);
}

#[test]
fn garbage_rate_limit_headers_change_nothing() {
    let garbage = healthy()
        .with_header_bytes("x-ratelimit-limit-requests", b"\xff\xfe")
        .with_header_bytes("x-ratelimit-remaining-requests", b"-1")
        .with_header_bytes("anthropic-ratelimit-tokens-limit", b"0")
        .with_header_bytes(
            "anthropic-ratelimit-tokens-remaining",
            b"99999999999999999999999",
        )
        .with_header_bytes("x-ratelimit-reset-requests", b"\x00\x01");
    let mut host = host_in("zone-a", "", garbage, healthy());
    common::load(
        &mut host,
        Duration::ZERO,
        2,
        50,
        Duration::from_secs(60),
        chat,
    );
    let all = responses(&host);
    assert!(
        all.iter()
            .all(|(_, r)| r.status == 200 && (zone_of(r).0 == "zone-a" || zone_of(r).1 == "probe"))
    );
    no_vm_failures(&host);
}

#[test]
fn when_every_zone_fails_requests_spread_in_panic() {
    let failing = || {
        healthy().with_fault(
            Duration::from_secs(1),
            Duration::from_secs(3600),
            FaultKind::Status(503),
        )
    };
    let mut host = host_in("zone-a", "", failing(), failing());
    common::load(
        &mut host,
        Duration::ZERO,
        3,
        40,
        Duration::from_secs(60),
        chat,
    );
    assert_eq!(metric(&host, "panic"), 1);
    let all = responses(&host);
    let late: Vec<&Response> = all
        .iter()
        .filter(|(t, _)| *t >= 1500)
        .map(|(_, r)| r)
        .collect();
    assert!(
        late.iter()
            .any(|r| first_zone(r) == ("zone-b".into(), "panic".into()))
    );
    assert!(
        late.iter()
            .any(|r| first_zone(r) == ("zone-a".into(), "panic".into()))
    );
    assert_eq!(host.logs_containing("every zone drained: panic").len(), 1);
    no_vm_failures(&host);
}

#[test]
fn a_reloaded_configuration_keeps_a_drained_zone_drained_from_its_first_request() {
    let failing = || {
        healthy().with_fault(
            Duration::ZERO,
            Duration::from_secs(3600),
            FaultKind::Status(503),
        )
    };
    let mut before = host_in("zone-a", "", failing(), healthy());
    common::load(
        &mut before,
        Duration::ZERO,
        2,
        40,
        Duration::from_secs(60),
        chat,
    );
    assert_eq!(metric(&before, "zone-a.drains"), 1);
    let state: Vec<(&str, Vec<u8>)> = ["failover/primary", "outlier/primary"]
        .into_iter()
        .map(|key| (key, before.shared_data("sluice", key).expect(key).0))
        .collect();
    // The new configuration's first requests come before its first tick
    // (50 ms): they must already leave the drained zone alone.
    let mut after = host_with_state("zone-a", "", failing(), healthy(), &state);
    for i in 0..10 {
        let at = Duration::from_millis(i * 4);
        after.schedule_request(at, None, chat(), i);
    }
    assert!(after.run_until(Duration::from_secs(10), |h| h.finished_count() == 10));
    for (_, r) in responses(&after) {
        assert_eq!(r.status, 200);
        assert_eq!(r.attempts, 1, "{:?}", r.header("x-sluice-zone"));
        assert_eq!(
            first_zone(&r).0,
            "zone-b",
            "{:?}",
            r.header("x-sluice-zone")
        );
    }
    no_vm_failures(&after);
}
