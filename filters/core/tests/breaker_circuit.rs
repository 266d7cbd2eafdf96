//! The circuit breaker: each mode, the half-open dance, back-off, leases,
//! backwards clocks and the encoded size, by example and by property.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "breaker_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use sluice_core::breaker::{
    Admission, Circuit, CircuitState, Outcome, PROBE_LEASE, ProbeTicket, RejectReason,
    ResponseFlags, Transition, classify, open_time, reject_probability,
};
use sluice_core::config::{BreakerConfig, FailureKind, Window};
use sluice_core::time::Timestamp;
use sluice_core::units::Ratio;

const FAIL: Outcome = Outcome {
    failure: Some(FailureKind::Status5xx),
    slow: false,
};
const OK: Outcome = Outcome::SUCCESS;

fn allowed(c: &mut Circuit, cfg: &BreakerConfig, now: Timestamp) -> Option<ProbeTicket> {
    match c.admit(cfg, now, 0.5).admission {
        Admission::Allowed { probe } => probe,
        other => panic!("expected the request to be allowed, got {other:?}"),
    }
}

fn rejected(
    c: &mut Circuit,
    cfg: &BreakerConfig,
    now: Timestamp,
) -> (RejectReason, Option<Duration>) {
    match c.admit(cfg, now, 0.5).admission {
        Admission::Rejected {
            reason,
            retry_after,
        } => (reason, retry_after),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Trips a consecutive-mode circuit at `t`.
fn trip(c: &mut Circuit, cfg: &BreakerConfig, t: Timestamp) -> Option<Transition> {
    let mut last = None;
    for _ in 0..5 {
        allowed(c, cfg, t);
        last = c.record(cfg, t, FAIL, None, 0.5);
    }
    last
}

// ---------------------------------------------------------------- consecutive

#[test]
fn consecutive_failures_open_the_circuit_and_a_success_resets_the_run() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    for _ in 0..4 {
        assert_eq!(c.record(&cfg, at(0.0), FAIL, None, 0.5), None);
    }
    c.record(&cfg, at(0.0), OK, None, 0.5);
    for _ in 0..4 {
        assert_eq!(c.record(&cfg, at(1.0), FAIL, None, 0.5), None);
    }
    assert_eq!(c.state(at(1.0)), CircuitState::Closed);
    assert_eq!(
        c.record(&cfg, at(1.0), FAIL, None, 0.5),
        Some(Transition {
            from: CircuitState::Closed,
            to: CircuitState::Open
        })
    );
    assert_eq!(c.state(at(1.0)).code(), 1);
    let (reason, retry_after) = rejected(&mut c, &cfg, at(11.0));
    assert_eq!(reason, RejectReason::CircuitOpen);
    assert_eq!(retry_after, Some(secs(20)));
}

#[test]
fn slow_calls_do_not_trip_a_consecutive_circuit() {
    let cfg = consecutive(2);
    let mut c = Circuit::new(&cfg);
    for _ in 0..10 {
        c.record(&cfg, at(0.0), Outcome::slow(), None, 0.5);
    }
    assert_eq!(c.state(at(0.0)), CircuitState::Closed);
}

// ---------------------------------------------------------------- half-open

#[test]
fn half_open_admits_at_most_the_probes_and_closes_when_all_succeed() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(0.0));
    rejected(&mut c, &cfg, at(29.9));
    assert_eq!(c.state(at(30.0)), CircuitState::HalfOpen);
    let first = c.admit(&cfg, at(30.0), 0.5);
    assert_eq!(
        first.transition,
        Some(Transition {
            from: CircuitState::Open,
            to: CircuitState::HalfOpen
        })
    );
    let Admission::Allowed { probe: Some(p1) } = first.admission else {
        panic!("the first request after the open time is a probe: {first:?}");
    };
    let p2 = allowed(&mut c, &cfg, at(30.0)).unwrap();
    let p3 = allowed(&mut c, &cfg, at(30.0)).unwrap();
    assert_eq!(c.probes_in_flight(at(30.0)), 3);
    assert_eq!(
        rejected(&mut c, &cfg, at(30.0)).0,
        RejectReason::CircuitOpen
    );

    assert_eq!(c.record(&cfg, at(31.0), OK, Some(p1), 0.5), None);
    // A freed slot is not re-issued: two successes plus two in flight would
    // exceed the probes still needed.
    assert_eq!(c.probes_in_flight(at(31.0)), 2);
    rejected(&mut c, &cfg, at(31.0));
    assert_eq!(c.record(&cfg, at(32.0), OK, Some(p2), 0.5), None);
    assert_eq!(
        c.record(&cfg, at(33.0), OK, Some(p3), 0.5),
        Some(Transition {
            from: CircuitState::HalfOpen,
            to: CircuitState::Closed
        })
    );
    assert_eq!(
        allowed(&mut c, &cfg, at(33.0)),
        None,
        "closed: no probe ticket"
    );
}

#[test]
fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(0.0));
    let mut t = 0.0;
    // Open times: 30, 60, 120, 240, then capped at 300.
    for expected in [30u64, 60, 120, 240, 300, 300] {
        let (_, retry_after) = rejected(&mut c, &cfg, at(t));
        assert_eq!(retry_after, Some(secs(expected)), "trip {}", c.trips());
        t += expected as f64;
        let probe = allowed(&mut c, &cfg, at(t)).unwrap();
        assert_eq!(
            c.record(&cfg, at(t), FAIL, Some(probe), 0.5),
            Some(Transition {
                from: CircuitState::HalfOpen,
                to: CircuitState::Open
            })
        );
    }
}

#[test]
fn a_slow_probe_fails_in_rate_mode() {
    let cfg = rate(Window::Calls(nz(10)), 10, 50, 100);
    let mut c = Circuit::new(&cfg);
    for _ in 0..10 {
        c.record(&cfg, at(0.0), FAIL, None, 0.5);
    }
    let probe = allowed(&mut c, &cfg, at(30.0)).unwrap();
    c.record(&cfg, at(31.0), Outcome::slow(), Some(probe), 0.5);
    assert_eq!(c.state(at(31.0)), CircuitState::Open);
}

#[test]
fn jitter_spreads_the_open_time_both_ways() {
    let mut cfg = consecutive(5);
    cfg.jitter = Ratio::percent(10);
    let close = |d: Duration, s: f64| (d.as_secs_f64() - s).abs() < 1e-6;
    assert!(close(open_time(&cfg, 1, 0.0), 27.0));
    assert!(close(open_time(&cfg, 1, 0.5), 30.0));
    let high = open_time(&cfg, 1, 0.999_999);
    assert!(
        high > Duration::from_millis(32_999) && high <= secs(33),
        "{high:?}"
    );
    assert!(open_time(&cfg, 50, 0.999_999) <= secs(330));
    assert!(open_time(&cfg, u32::MAX, 1.0) <= secs(330));
    assert!(close(open_time(&cfg, 1, f64::NAN), 30.0));
    let mut c = Circuit::new(&cfg);
    for _ in 0..5 {
        c.record(&cfg, at(0.0), FAIL, None, 0.0);
    }
    assert!(close(rejected(&mut c, &cfg, at(0.0)).1.unwrap(), 27.0));
}

#[test]
fn the_back_off_forgets_after_staying_closed_for_max_open_for() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    let close_after_open = |c: &mut Circuit, t: f64| {
        let probes: Vec<_> = (0..3).map(|_| allowed(c, &cfg, at(t)).unwrap()).collect();
        for p in probes {
            c.record(&cfg, at(t), OK, Some(p), 0.5);
        }
        assert_eq!(c.state(at(t)), CircuitState::Closed);
    };
    trip(&mut c, &cfg, at(0.0));
    close_after_open(&mut c, 30.0);
    // Trips again soon: the back-off goes on (60 s).
    trip(&mut c, &cfg, at(40.0));
    assert_eq!(rejected(&mut c, &cfg, at(40.0)).1, Some(secs(60)));
    close_after_open(&mut c, 100.0);
    // Trips after five quiet minutes: back to 30 s.
    trip(&mut c, &cfg, at(400.0));
    assert_eq!(c.trips(), 1);
    assert_eq!(rejected(&mut c, &cfg, at(400.0)).1, Some(secs(30)));
}

#[test]
fn vanished_probes_free_their_slots_after_the_lease() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(0.0));
    let probes: Vec<_> = (0..3)
        .map(|_| allowed(&mut c, &cfg, at(30.0)).unwrap())
        .collect();
    rejected(&mut c, &cfg, at(30.0));
    // One live stream renews its probe; the other two never report.
    let lease = PROBE_LEASE.as_secs_f64();
    assert!(c.renew_probe(probes[0], at(30.0 + lease - 1.0)));
    rejected(&mut c, &cfg, at(30.0 + lease - 0.5));
    let fresh: Vec<_> = (0..2)
        .map(|_| allowed(&mut c, &cfg, at(30.0 + lease)).unwrap())
        .collect();
    rejected(&mut c, &cfg, at(30.0 + lease));
    assert!(!c.renew_probe(probes[1], at(30.0 + lease)), "expired");
    for p in [probes[0], fresh[0], fresh[1]] {
        c.record(&cfg, at(100.0), OK, Some(p), 0.5);
    }
    assert_eq!(c.state(at(100.0)), CircuitState::Closed);
}

#[test]
fn an_abandoned_probe_gives_its_slot_back() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(0.0));
    let probes: Vec<_> = (0..3)
        .map(|_| allowed(&mut c, &cfg, at(30.0)).unwrap())
        .collect();
    c.abandon(probes[1]);
    assert_eq!(c.probes_in_flight(at(30.0)), 2);
    assert!(allowed(&mut c, &cfg, at(30.0)).is_some());
}

#[test]
fn outcomes_from_before_the_trip_and_stale_tickets_are_ignored() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(0.0));
    // Late answers of requests admitted while closed.
    for _ in 0..10 {
        assert_eq!(c.record(&cfg, at(1.0), OK, None, 0.5), None);
    }
    assert_eq!(c.state(at(1.0)), CircuitState::Open);
    let old = allowed(&mut c, &cfg, at(30.0)).unwrap();
    c.record(&cfg, at(30.0), FAIL, Some(old), 0.5);
    // Next half-open period: the old ticket is stale, and so are closed-time answers.
    let _new = allowed(&mut c, &cfg, at(90.0)).unwrap();
    assert_eq!(c.record(&cfg, at(91.0), FAIL, Some(old), 0.5), None);
    assert_eq!(c.record(&cfg, at(91.0), FAIL, None, 0.5), None);
    assert_eq!(c.state(at(91.0)), CircuitState::HalfOpen);
}

// ---------------------------------------------------------------- rate

#[test]
fn rate_mode_waits_for_min_calls_then_trips_at_the_threshold() {
    let cfg = rate(Window::Calls(nz(10)), 6, 50, 100);
    let mut c = Circuit::new(&cfg);
    // Five failures: 100%, but under min_calls.
    for _ in 0..5 {
        assert_eq!(c.record(&cfg, at(0.0), FAIL, None, 0.5), None);
    }
    assert_eq!(c.state(at(0.0)), CircuitState::Closed);
    // Successes dilute: 5/6, trips at the 6th call.
    assert!(c.record(&cfg, at(0.0), OK, None, 0.5).is_some());

    let cfg = rate(Window::Calls(nz(10)), 10, 50, 100);
    let mut c = Circuit::new(&cfg);
    // 4 failures in 10 calls (40%) stay closed; the 5th (50%) trips.
    for i in 0..10 {
        c.record(&cfg, at(0.0), if i % 5 < 2 { FAIL } else { OK }, None, 0.5);
    }
    assert_eq!(c.state(at(0.0)), CircuitState::Closed);
    // The window slides: the oldest call (a failure) leaves as a failure enters.
    assert_eq!(c.record(&cfg, at(0.0), FAIL, None, 0.5), None);
    c.record(&cfg, at(0.0), FAIL, None, 0.5);
    assert_eq!(
        c.record(&cfg, at(0.0), FAIL, None, 0.5).map(|t| t.to),
        Some(CircuitState::Open)
    );
}

#[test]
fn rate_mode_trips_on_slow_calls() {
    let cfg = rate(Window::Calls(nz(10)), 10, 50, 80);
    let mut c = Circuit::new(&cfg);
    for i in 0..10 {
        let o = if i < 8 { Outcome::slow() } else { OK };
        let t = c.record(&cfg, at(0.0), o, None, 0.5);
        assert_eq!(t.is_some(), i == 9, "call {i}");
    }
}

#[test]
fn a_time_window_forgets_calls_older_than_the_window() {
    let cfg = rate(Window::Time(secs(10)), 5, 50, 100);
    let mut c = Circuit::new(&cfg);
    for i in 0..4 {
        c.record(&cfg, at(i as f64), FAIL, None, 0.5);
    }
    // Ten seconds on the four failures are gone: five successes keep it closed.
    for i in 0..5 {
        c.record(&cfg, at(14.0 + i as f64 * 0.1), OK, None, 0.5);
    }
    assert_eq!(c.state(at(15.0)), CircuitState::Closed);
    // Within the window, failures accumulate: 5 ok + 5 fail = 50%.
    for i in 0..4 {
        assert_eq!(c.record(&cfg, at(15.0 + i as f64), FAIL, None, 0.5), None);
    }
    assert!(c.record(&cfg, at(19.0), FAIL, None, 0.5).is_some());
}

#[test]
fn a_new_mode_or_window_starts_the_evidence_over() {
    let cfg = rate(Window::Calls(nz(10)), 10, 50, 100);
    let mut c = Circuit::new(&cfg);
    for _ in 0..9 {
        c.record(&cfg, at(0.0), FAIL, None, 0.5);
    }
    let bigger = rate(Window::Calls(nz(20)), 10, 50, 100);
    assert_eq!(c.record(&bigger, at(0.0), FAIL, None, 0.5), None);
    let cons = consecutive(2);
    assert_eq!(c.record(&cons, at(0.0), FAIL, None, 0.5), None);
    assert!(c.record(&cons, at(0.0), FAIL, None, 0.5).is_some());
}

// ---------------------------------------------------------------- adaptive

#[test]
fn throttling_probability_follows_the_sre_formula_and_its_cap() {
    assert_eq!(reject_probability(0, 0, 2.0, 0.8), 0.0);
    assert_eq!(reject_probability(100, 50, 2.0, 0.8), 0.0);
    assert!((reject_probability(100, 40, 2.0, 0.8) - 20.0 / 101.0).abs() < 1e-12);
    assert!((reject_probability(99, 0, 2.0, 0.95) - 0.95).abs() < 1e-12);
    assert!((reject_probability(9, 0, 2.0, 0.95) - 0.9).abs() < 1e-12);
    assert_eq!(reject_probability(1000, 0, 2.0, 0.8), 0.8);
    assert_eq!(reject_probability(10, 0, f64::NAN, 0.8), 0.0);
}

#[test]
fn adaptive_mode_sheds_in_proportion_and_recovers() {
    let cfg = adaptive(2.0, secs(60), 80);
    let mut c = Circuit::new(&cfg);
    // 100 requests, 40 accepted.
    for i in 0..100 {
        allowed(&mut c, &cfg, at(0.0));
        let o = if i < 40 { OK } else { FAIL };
        assert_eq!(c.record(&cfg, at(0.0), o, None, 0.5), None);
    }
    let p = c.throttle_probability(&cfg, at(1.0));
    assert!((p - 20.0 / 101.0).abs() < 1e-12, "{p}");
    // A draw under p is rejected (and still counted as a request); above, allowed.
    match c.admit(&cfg, at(1.0), p - 0.01).admission {
        Admission::Rejected { reason, .. } => assert_eq!(reason, RejectReason::Throttled),
        other => panic!("{other:?}"),
    }
    let p2 = c.throttle_probability(&cfg, at(1.0));
    assert!((p2 - 21.0 / 102.0).abs() < 1e-12, "{p2}");
    assert!(c.admit(&cfg, at(1.0), p2 + 0.01).admission.is_allowed());
    // Never beyond the cap, even when nothing is accepted.
    for _ in 0..1000 {
        c.admit(&cfg, at(2.0), 0.99);
    }
    assert!((c.throttle_probability(&cfg, at(2.0)) - 0.8).abs() < 1e-12);
    assert!(c.admit(&cfg, at(2.0), 0.81).admission.is_allowed());
    assert_eq!(
        c.state(at(2.0)),
        CircuitState::Closed,
        "adaptive never opens"
    );
    // A window later the history is gone.
    assert_eq!(c.throttle_probability(&cfg, at(62.5)), 0.0);
    assert!(c.admit(&cfg, at(62.5), 0.0).admission.is_allowed());
}

// ---------------------------------------------------------------- clock

#[test]
fn the_clock_going_back_never_extends_an_open_circuit_much() {
    let cfg = consecutive(5);
    let mut c = Circuit::new(&cfg);
    trip(&mut c, &cfg, at(1000.0));
    // A day back: the open time counts from the new now.
    let (_, retry) = rejected(&mut c, &cfg, at(1000.0 - 86_400.0));
    assert_eq!(retry, Some(secs(30)));
    assert!(allowed(&mut c, &cfg, at(1000.0 - 86_400.0 + 30.0)).is_some());
    // Back again while half-open: leases are pulled in, not stuck for a day.
    let t = 1000.0 - 86_400.0 + 30.0;
    allowed(&mut c, &cfg, at(t));
    allowed(&mut c, &cfg, at(t));
    rejected(&mut c, &cfg, at(t - 3600.0));
    assert!(allowed(&mut c, &cfg, at(t - 3600.0 + 60.0)).is_some());
    // Clock at zero and at the end of time: no panic.
    c.admit(&cfg, Timestamp::ZERO, 0.5);
    c.record(&cfg, Timestamp(u64::MAX), FAIL, None, 0.5);
    c.admit(&cfg, Timestamp(u64::MAX), 0.5);
}

// ---------------------------------------------------------------- classify

#[test]
fn classify_counts_only_listed_failures() {
    let mut cfg = consecutive(5);
    let none = ResponseFlags::default();
    let c = |status, flags, cfg: &BreakerConfig| classify(status, flags, None, None, cfg);
    assert_eq!(c(Some(200), none, &cfg), Some(OK));
    assert_eq!(
        c(Some(404), none, &cfg),
        Some(OK),
        "a client error is not sickness"
    );
    assert_eq!(
        c(Some(500), none, &cfg),
        Some(Outcome::failure(FailureKind::Status5xx))
    );
    assert_eq!(c(Some(429), none, &cfg), Some(OK), "429 not listed");
    let uf = ResponseFlags::from_envoy_bits(ResponseFlags::ENVOY_UF);
    assert_eq!(
        c(Some(503), uf, &cfg),
        Some(Outcome::failure(FailureKind::ConnectFailure))
    );
    let ur = ResponseFlags::from_envoy_bits(ResponseFlags::ENVOY_UR);
    assert_eq!(
        c(None, ur, &cfg),
        Some(Outcome::failure(FailureKind::Reset))
    );
    let ut = ResponseFlags::from_envoy_bits(ResponseFlags::ENVOY_UT | 0x8000);
    assert_eq!(
        c(Some(504), ut, &cfg),
        Some(Outcome::failure(FailureKind::Timeout))
    );
    let dc = ResponseFlags::from_envoy_bits(ResponseFlags::ENVOY_DC);
    assert_eq!(c(None, dc, &cfg), None, "the client left: no verdict");
    assert_eq!(
        c(
            Some(500),
            ResponseFlags::from_envoy_bits(ResponseFlags::ENVOY_DC),
            &cfg
        ),
        Some(Outcome::failure(FailureKind::Status5xx))
    );

    cfg.failure_on = vec![FailureKind::GatewayError, FailureKind::Status429];
    assert_eq!(c(Some(500), none, &cfg), Some(OK));
    assert_eq!(
        c(Some(502), none, &cfg),
        Some(Outcome::failure(FailureKind::GatewayError))
    );
    assert_eq!(
        c(Some(429), none, &cfg),
        Some(Outcome::failure(FailureKind::Status429))
    );
    assert_eq!(
        c(Some(503), uf, &cfg),
        Some(Outcome::failure(FailureKind::GatewayError))
    );
}

#[test]
fn classify_judges_slowness_by_ttft_and_tpot() {
    let cfg = consecutive(5);
    let none = ResponseFlags::default();
    let ms = Duration::from_millis;
    let slow = |ttft, tpot| classify(Some(200), none, ttft, tpot, &cfg).unwrap().slow;
    assert!(
        !slow(Some(secs(10)), Some(ms(200))),
        "at the limits is not slow"
    );
    assert!(slow(Some(ms(10_001)), None));
    assert!(slow(Some(ms(100)), Some(ms(201))));
    assert!(!slow(None, None));
}

// ---------------------------------------------------------------- size

#[test]
fn encoded_circuits_stay_small() {
    let size = |cfg: &BreakerConfig, calls: u32| {
        let mut c = Circuit::new(cfg);
        for i in 0..calls {
            c.admit(cfg, at(f64::from(i) * 0.5), 0.99);
            let o = if i % 7 == 0 { Outcome::slow() } else { OK };
            c.record(cfg, at(f64::from(i) * 0.5), o, None, 0.5);
        }
        rmp_serde::to_vec(&c).unwrap().len()
    };
    let consecutive = size(&consecutive(5), 10);
    let calls_100 = size(&rate(Window::Calls(nz(100)), 100, 50, 100), 300);
    let calls_1024 = size(&rate(Window::Calls(nz(1024)), 100, 50, 100), 3000);
    let calls_10k = size(&rate(Window::Calls(nz(10_000)), 100, 50, 100), 30_000);
    let time_60s = size(&rate(Window::Time(secs(60)), 100, 50, 100), 300);
    let time_1h = size(&rate(Window::Time(secs(3600)), 100, 50, 100), 300);
    let adaptive = size(&adaptive(2.0, secs(120), 80), 300);
    eprintln!(
        "encoded sizes: consecutive {consecutive}, calls(100) {calls_100}, calls(1024) {calls_1024}, \
         calls(10k) {calls_10k}, 60s {time_60s}, 1h {time_1h}, adaptive(2m) {adaptive}"
    );
    assert!(consecutive <= 32, "{consecutive}");
    assert!(calls_100 <= 96, "{calls_100}");
    assert!(calls_1024 <= 600, "{calls_1024}");
    assert!(calls_10k <= 1024, "{calls_10k}");
    assert!(time_60s <= 1024, "{time_60s}");
    assert!(time_1h <= 1024, "{time_1h}");
    assert!(adaptive <= 1024, "{adaptive}");
}

#[test]
fn a_circuit_round_trips_through_messagepack() {
    let cfg = consecutive(5);
    let mut c = Circuit::default();
    trip(&mut c, &cfg, at(0.0));
    let probe = allowed(&mut c, &cfg, at(30.0)).unwrap();
    let bytes = rmp_serde::to_vec(&c).unwrap();
    let mut back: Circuit = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, c);
    back.record(&cfg, at(31.0), FAIL, Some(probe), 0.5);
    assert_eq!(back.state(at(31.0)), CircuitState::Open);
}

// ---------------------------------------------------------------- properties

#[derive(Clone, Debug)]
enum Event {
    /// A request arrives; the draw is its randomness.
    Admit(f64),
    /// The `i`-th outstanding request (mod their number) ends.
    End { i: usize, fail: bool, slow: bool },
    /// The `i`-th outstanding request's client leaves.
    Abandon(usize),
    /// Time passes (ms).
    Wait(u32),
    /// The clock jumps back (ms).
    Back(u32),
}

fn event(backwards: bool) -> impl Strategy<Value = Event> {
    let back = if backwards { 1 } else { 0 };
    prop_oneof![
        6 => (0.0..1.0f64).prop_map(Event::Admit),
        5 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, fail, slow)| Event::End { i, fail, slow }),
        1 => any::<usize>().prop_map(Event::Abandon),
        3 => (0u32..120_000).prop_map(Event::Wait),
        back => (0u32..3_600_000).prop_map(Event::Back),
    ]
}

fn any_config() -> impl Strategy<Value = BreakerConfig> {
    let mode = prop_oneof![
        (1u32..6).prop_map(consecutive),
        (1u32..20, 1u8..=100, 1u8..=100).prop_map(|(n, f, s)| rate(Window::Calls(nz(n)), n, f, s)),
        (1u64..120, 1u32..20, 1u8..=100).prop_map(|(w, m, f)| rate(
            Window::Time(secs(w)),
            m,
            f,
            100
        )),
        (1.0..4.0f64, 1u64..180, 1u8..=100).prop_map(|(k, w, r)| adaptive(k, secs(w), r)),
    ];
    (mode, 1u32..5, 1u64..60, 1u64..10, 1.0..4.0f64, 0u8..50).prop_map(
        |(mut cfg, probes, open, max_factor, backoff, jitter)| {
            cfg.half_open_probes = nz(probes);
            cfg.open_for = secs(open);
            cfg.max_open_for = secs(open * max_factor);
            cfg.backoff = backoff;
            cfg.jitter = Ratio::percent(jitter);
            cfg
        },
    )
}

struct Run {
    now: Timestamp,
    circuit: Circuit,
    /// Requests in flight: their probe ticket and when they were admitted.
    outstanding: Vec<(Option<ProbeTicket>, Timestamp)>,
}

impl Run {
    fn new(cfg: &BreakerConfig) -> Self {
        Run {
            now: at(0.0),
            circuit: Circuit::new(cfg),
            outstanding: vec![],
        }
    }

    /// Applies one event and checks the invariants that hold after any step.
    fn step(&mut self, cfg: &BreakerConfig, e: &Event) -> Result<(), TestCaseError> {
        let cap_open = cfg.max_open_for.as_secs_f64() * (1.0 + cfg.jitter.get()) + 1e-6;
        match *e {
            Event::Admit(r) => {
                let a = self.circuit.admit(cfg, self.now, r);
                match a.admission {
                    Admission::Allowed { probe } => self.outstanding.push((probe, self.now)),
                    Admission::Rejected { retry_after, .. } => {
                        if let Some(d) = retry_after {
                            prop_assert!(d.as_secs_f64() <= cap_open, "open {d:?} > cap");
                        }
                    }
                }
            }
            Event::End { i, fail, slow } if !self.outstanding.is_empty() => {
                let (probe, _) = self.outstanding.remove(i % self.outstanding.len());
                let outcome = Outcome {
                    failure: fail.then_some(FailureKind::Status5xx),
                    slow,
                };
                self.circuit.record(cfg, self.now, outcome, probe, 0.99);
            }
            Event::Abandon(i) if !self.outstanding.is_empty() => {
                let (probe, _) = self.outstanding.remove(i % self.outstanding.len());
                if let Some(p) = probe {
                    self.circuit.abandon(p);
                }
            }
            Event::Wait(ms) => self.now = self.now + Duration::from_millis(u64::from(ms)),
            Event::Back(ms) => self.now = self.now - Duration::from_millis(u64::from(ms)),
            _ => {}
        }
        prop_assert!(self.circuit.probes_in_flight(self.now) <= cfg.half_open_probes.get());
        if let Some(left) = self.circuit_open_left(cfg) {
            prop_assert!(left.as_secs_f64() <= cap_open, "open for {left:?}");
        }
        let p = self.circuit.throttle_probability(cfg, self.now);
        if let sluice_core::config::BreakerMode::Adaptive { max_reject, .. } = cfg.mode {
            prop_assert!((0.0..=max_reject.get()).contains(&p));
        }
        Ok(())
    }

    /// Time until an open circuit half-opens, read through a copy.
    fn circuit_open_left(&self, cfg: &BreakerConfig) -> Option<Duration> {
        match self.circuit.clone().admit(cfg, self.now, 0.5).admission {
            Admission::Rejected {
                reason: RejectReason::CircuitOpen,
                retry_after,
            } => retry_after,
            _ => None,
        }
    }
}

/// After any history, traffic that succeeds brings the circuit back to
/// closed within a bounded time: one request at the clock's current reading
/// (after a backwards jump a circuit learns the time from its callers, and
/// without traffic nothing is rejected anyway), then successful calls,
/// waiting whenever told to. Old evidence in a count window may trip the
/// circuit once more (it is still evidence: resilience4j does the same), so
/// the bound is two open times and two probe leases, plus the adaptive
/// window.
fn recovers(cfg: &BreakerConfig, run: &mut Run) -> Result<(), TestCaseError> {
    let start = run.now;
    let bound = (cfg.max_open_for.mul_f64(1.0 + cfg.jitter.get()) + PROBE_LEASE) * 2
        + cfg_window(cfg)
        + secs(1);
    let mut closed_in_a_row = 0;
    for _ in 0..10_000 {
        match run.circuit.admit(cfg, run.now, 0.999).admission {
            Admission::Allowed { probe } => {
                run.circuit.record(cfg, run.now, OK, probe, 0.5);
                if probe.is_none() && run.circuit.state(run.now) == CircuitState::Closed {
                    closed_in_a_row += 1;
                }
            }
            Admission::Rejected { retry_after, .. } => {
                closed_in_a_row = 0;
                run.now = run.now + retry_after.unwrap_or(secs(1));
            }
        }
        prop_assert!(
            run.now.since(start) <= bound,
            "still not recovered after {:?}: {:?}",
            run.now.since(start),
            run.circuit
        );
        if closed_in_a_row > 2 * cfg.half_open_probes.get() + 20 {
            return Ok(());
        }
        run.now = run.now + Duration::from_millis(100);
    }
    prop_assert!(false, "no recovery: {:?}", run.circuit);
    Ok(())
}

fn cfg_window(cfg: &BreakerConfig) -> Duration {
    match cfg.mode {
        sluice_core::config::BreakerMode::Adaptive { window, .. } => window,
        _ => Duration::ZERO,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Never stuck, probes bounded, open time capped, with a clock that
    /// also jumps backwards.
    #[test]
    fn any_history_recovers_and_keeps_its_bounds(
        cfg in any_config(),
        events in prop::collection::vec(event(true), 0..300),
    ) {
        let mut run = Run::new(&cfg);
        for e in &events {
            run.step(&cfg, e)?;
        }
        recovers(&cfg, &mut run)?;
    }

    /// With a forward clock, the probes a client holds at once never exceed
    /// `half_open_probes`, counting every probe admitted and not yet
    /// reported whose lease is still running.
    #[test]
    fn concurrent_probes_never_exceed_the_limit(
        cfg in any_config(),
        events in prop::collection::vec(event(false), 0..300),
    ) {
        let mut run = Run::new(&cfg);
        for e in &events {
            run.step(&cfg, e)?;
            // Probes of the current half-open period (older ones are stale).
            let current = run.outstanding.iter().filter_map(|(p, _)| p.map(|p| p.generation)).max();
            let live = run
                .outstanding
                .iter()
                .filter(|(p, t)| {
                    p.is_some_and(|p| Some(p.generation) == current) && run.now < *t + PROBE_LEASE
                })
                .count();
            prop_assert!(live <= cfg.half_open_probes.get() as usize, "{live} probes live");
        }
    }

    /// The open time lies in [open_for·(1−jitter), max_open_for·(1+jitter)].
    #[test]
    fn back_off_is_capped(cfg in any_config(), trips in any::<u32>(), r in any::<f64>()) {
        let d = open_time(&cfg, trips, r).as_secs_f64();
        let j = cfg.jitter.get();
        prop_assert!(d <= cfg.max_open_for.as_secs_f64() * (1.0 + j) + 1e-6, "{d}");
        prop_assert!(d >= cfg.open_for.as_secs_f64() * (1.0 - j) - 1e-6, "{d}");
        prop_assert!(open_time(&cfg, trips.saturating_add(1), 0.5) >= open_time(&cfg, trips, 0.5));
    }

    /// The throttle probability is the SRE formula, clamped to [0, cap].
    #[test]
    fn throttle_probability_formula(r in 0u32..100_000, a in 0u32..100_000, k in 1.0..10.0f64, cap in 0.0..=1.0f64) {
        let p = reject_probability(r, a, k, cap);
        let raw = (f64::from(r) - k * f64::from(a)) / (f64::from(r) + 1.0);
        prop_assert!((p - raw.max(0.0).min(cap)).abs() < 1e-12);
    }

    /// An adaptive circuit admits a draw exactly when it is at or above the
    /// probability it reports.
    #[test]
    fn throttling_uses_the_callers_draw(fails in 0u32..200, oks in 0u32..200, r in 0.0..1.0f64) {
        let cfg = adaptive(2.0, secs(60), 90);
        let mut c = Circuit::new(&cfg);
        for i in 0..fails + oks {
            c.admit(&cfg, at(1.0), 0.999);
            c.record(&cfg, at(1.0), if i < oks { OK } else { FAIL }, None, 0.5);
        }
        let p = c.throttle_probability(&cfg, at(2.0));
        prop_assert_eq!(c.admit(&cfg, at(2.0), r).admission.is_allowed(), r >= p);
    }
}
