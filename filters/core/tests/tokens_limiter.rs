//! The limiter's decisions, headers, settlements and stored state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use common::{config, quota, rate};
use sluice_core::config::{Api, Match, Pattern};
use sluice_core::llm::{ErrorKind, error_body};
use sluice_core::shared::{MemoryStore, update};
use sluice_core::time::Timestamp;
use sluice_core::tokens::{
    Claim, Decision, KeyId, KeyState, Limited, Limiter, QuotaId, QuotaStatus, Reservation,
    STREAM_LEASE, Ticket,
};

const T0: Timestamp = Timestamp(1_700_000_000_000_000_000);

fn at(ms: u64) -> Timestamp {
    T0 + Duration::from_millis(ms)
}

fn tokens(n: u64) -> Reservation {
    Reservation {
        prompt_tokens: n / 2,
        completion_tokens: n - n / 2,
    }
}

fn admitted(d: Decision) -> (Ticket, QuotaStatus) {
    match d {
        Decision::Admitted { ticket, status } => (ticket, status),
        Decision::Rejected(r) => panic!("rejected: {r:?}"),
    }
}

fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

/// 600 tokens/min (10 per second), 5 requests/min.
fn small() -> Limiter {
    let mut q = quota(vec![rate(600, 60), rate(10_000, 86_400)]);
    q.requests = Some(rate(5, 60));
    Limiter::new(&config(vec![q]))
}

#[test]
fn remaining_decreases_then_a_429_says_when_to_retry() {
    let l = small();
    let mut s = KeyState::default();
    let (_, st1) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(200)));
    let h1 = l.headers(&st1, None);
    assert_eq!(header(&h1, "x-ratelimit-limit-tokens"), Some("600"));
    assert_eq!(header(&h1, "x-ratelimit-remaining-tokens"), Some("400"));
    assert_eq!(header(&h1, "x-ratelimit-reset-tokens"), Some("20s"));
    assert_eq!(header(&h1, "x-ratelimit-remaining-requests"), Some("4"));
    assert_eq!(header(&h1, "x-ratelimit-reset-requests"), Some("12s"));
    let (_, st2) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(300)));
    let h2 = l.headers(&st2, None);
    assert_eq!(header(&h2, "x-ratelimit-remaining-tokens"), Some("100"));
    assert_eq!(header(&h2, "x-ratelimit-remaining-requests"), Some("3"));
    assert!(
        header(&h2, "ratelimit")
            .unwrap()
            .contains("\"tokens-1m\";r=100;t=50")
    );

    let before = s.clone();
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(150)) else {
        panic!("150 > 100 left");
    };
    assert_eq!(s, before, "a rejection takes nothing");
    assert_eq!(
        r.limited,
        Limited::Tokens {
            window: Duration::from_secs(60),
            limit: 600
        }
    );
    assert_eq!(
        r.retry_after,
        Some(Duration::from_secs(5)),
        "50 missing at 10/s"
    );
    assert_eq!((r.available, r.requested), (100, 150));
    assert_eq!(r.error_kind(), ErrorKind::RateLimitTokens);
    let h = l.headers(&r.status, r.retry_after);
    assert_eq!(header(&h, "retry-after"), Some("5"));
    assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("100"));
    let msg = r.message("gpt-4o");
    assert!(
        msg.contains("Rate limit reached for gpt-4o on tokens per 1m")
            && msg.contains("try again in 5s"),
        "{msg}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&error_body(Api::Openai, r.error_kind(), &msg)).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Not a millisecond early; exactly when it said, it fits.
    assert!(matches!(
        l.reserve(&mut s, at(4_999), QuotaId(0), &tokens(150)),
        Decision::Rejected(_)
    ));
    admitted(l.reserve(&mut s, at(5_000), QuotaId(0), &tokens(150)));
}

#[test]
fn retry_after_is_exact() {
    let l = small();
    let mut s = KeyState::default();
    admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(500)));
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(150)) else {
        panic!()
    };
    let wait = r.retry_after.unwrap();
    assert!(matches!(
        l.reserve(
            &mut s,
            T0 + wait - Duration::from_millis(1),
            QuotaId(0),
            &tokens(150)
        ),
        Decision::Rejected(_)
    ));
    admitted(l.reserve(&mut s, T0 + wait, QuotaId(0), &tokens(150)));
}

#[test]
fn the_request_rate_limits_too() {
    let l = small();
    let mut s = KeyState::default();
    for _ in 0..5 {
        admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(1)));
    }
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(1)) else {
        panic!()
    };
    assert_eq!(
        r.limited,
        Limited::Requests {
            window: Duration::from_secs(60),
            limit: 5
        }
    );
    assert_eq!(r.retry_after, Some(Duration::from_secs(12)));
    assert_eq!(r.error_kind(), ErrorKind::RateLimitRequests);
    admitted(l.reserve(&mut s, at(12_000), QuotaId(0), &tokens(1)));
}

#[test]
fn the_longer_period_binds_once_the_short_one_refills() {
    // 1000/min but 1500/day: after the first minute's burst, the day holds.
    let l = Limiter::new(&config(vec![quota(vec![
        rate(1_000, 60),
        rate(1_500, 86_400),
    ])]));
    let mut s = KeyState::default();
    admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(1_000)));
    let (_, st) = admitted(l.reserve(&mut s, at(60_000), QuotaId(0), &tokens(500)));
    let binding = st.binding_tokens().unwrap();
    // One minute of the day's refill (1500/1440 per minute) is back.
    assert_eq!((binding.limit, binding.remaining), (1_500, 1));
    let Decision::Rejected(r) = l.reserve(&mut s, at(120_000), QuotaId(0), &tokens(100)) else {
        panic!()
    };
    assert_eq!(
        r.limited,
        Limited::Tokens {
            window: Duration::from_secs(86_400),
            limit: 1_500
        }
    );
}

#[test]
fn a_request_larger_than_the_bucket_is_told_so() {
    let l = small();
    let mut s = KeyState::default();
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(601)) else {
        panic!()
    };
    assert_eq!(r.retry_after, None);
    assert!(
        r.message("m").starts_with("Request too large"),
        "{}",
        r.message("m")
    );
    assert_eq!(header(&l.headers(&r.status, None), "retry-after"), None);
}

#[test]
fn refunds_and_debt() {
    let l = small();
    let mut s = KeyState::default();
    let (t, _) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(500)));
    // Used 100 of 500: 400 come back.
    assert_eq!(l.reconcile(&mut s, at(0), &t, 100).delta, -400);
    assert_eq!(l.status(&s, at(0), QuotaId(0)).tokens[0].remaining, 500);
    // Used 900 of 300 reserved: 600 charged on top, into debt.
    let (t, _) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(300)));
    assert_eq!(l.reconcile(&mut s, at(0), &t, 900).delta, 600);
    let st = l.status(&s, at(0), QuotaId(0));
    assert_eq!(
        st.tokens[0].remaining, 0,
        "headers never show debt as negative"
    );
    assert_eq!(
        st.tokens[0].reset,
        Duration::from_secs(100),
        "1000 short of full at 10/s"
    );
    // 400 tokens of debt (-400 held): a 10-token request waits 41 s.
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(10)) else {
        panic!()
    };
    assert_eq!(r.available, -400);
    assert_eq!(r.retry_after, Some(Duration::from_secs(41)));
    // Absurd usage saturates instead of overflowing.
    let (t, _) = admitted(l.reserve(&mut s, at(200_000), QuotaId(0), &tokens(1)));
    assert_eq!(
        l.reconcile(&mut s, at(200_000), &t, u64::MAX).delta,
        i64::try_from(u64::MAX - 1).unwrap_or(i64::MAX)
    );
}

#[test]
fn concurrent_streams_are_held_until_released() {
    let mut q = quota(vec![]);
    q.concurrent_streams = NonZeroU32::new(2);
    let l = Limiter::new(&config(vec![q]));
    let mut s = KeyState::default();
    let (a, _) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(10)));
    let (_b, _) = admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(10)));
    assert!(a.holds_stream);
    let Decision::Rejected(r) = l.reserve(&mut s, at(0), QuotaId(0), &tokens(10)) else {
        panic!()
    };
    assert_eq!(r.limited, Limited::ConcurrentStreams { limit: 2 });
    assert_eq!(r.error_kind(), ErrorKind::ConcurrentStreams);
    assert_eq!(
        l.finish(&mut s, at(5), &a, Some(3)).map(|r| r.delta),
        Some(-7)
    );
    assert_eq!(s.streams(), 1);
    admitted(l.reserve(&mut s, at(6), QuotaId(0), &tokens(10)));
    // Releasing more than was taken never underflows.
    l.release(&mut s, &a);
    l.release(&mut s, &a);
    l.release(&mut s, &a);
    assert_eq!(s.streams(), 0);
}

#[test]
fn leaked_streams_heal_after_an_idle_lease() {
    let mut q = quota(vec![]);
    q.concurrent_streams = NonZeroU32::new(1);
    let l = Limiter::new(&config(vec![q]));
    let mut s = KeyState::default();
    admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(1)));
    // Its worker died: never released.
    assert!(matches!(
        l.reserve(&mut s, at(1_000), QuotaId(0), &tokens(1)),
        Decision::Rejected(_)
    ));
    let later = T0 + STREAM_LEASE + Duration::from_secs(1);
    admitted(l.reserve(&mut s, later, QuotaId(0), &tokens(1)));
}

#[test]
fn a_clock_going_backwards_refills_nothing_and_never_panics() {
    let l = small();
    let mut s = KeyState::default();
    admitted(l.reserve(&mut s, at(60_000), QuotaId(0), &tokens(600)));
    assert!(matches!(
        l.reserve(&mut s, at(0), QuotaId(0), &tokens(1)),
        Decision::Rejected(_)
    ));
    assert!(matches!(
        l.reserve(&mut s, Timestamp::ZERO, QuotaId(0), &tokens(1)),
        Decision::Rejected(_)
    ));
    let (t, _) = admitted(l.reserve(&mut s, Timestamp(u64::MAX), QuotaId(0), &tokens(1)));
    l.reconcile(&mut s, Timestamp::ZERO, &t, 5);
}

#[test]
fn the_first_matching_quota_applies() {
    let mut acme = quota(vec![rate(100, 60)]);
    acme.matcher = Match {
        tenants: vec![Pattern::new("acme")],
        models: vec![Pattern::new("gpt-4o*")],
        ..Match::default()
    };
    let l = Limiter::new(&config(vec![acme, quota(vec![rate(10, 60)])]));
    assert_eq!(
        l.quota_for("/v1/chat/completions", "h", "gpt-4o-mini", "acme"),
        Some(QuotaId(0))
    );
    assert_eq!(
        l.quota_for("/v1/chat/completions", "h", "claude", "acme"),
        Some(QuotaId(1))
    );
    assert_eq!(
        Limiter::new(&config(vec![])).quota_for("/", "h", "m", "t"),
        None
    );
    // A quota id from another policy admits and holds nothing.
    let mut s = KeyState::default();
    let (t, st) = admitted(l.reserve(&mut s, at(0), QuotaId(9), &tokens(1_000)));
    assert_eq!((t.reserved, st), (0, QuotaStatus::default()));
}

#[test]
fn workers_sharing_state_through_cas_never_over_admit() {
    // Two "workers" take turns on one stored key; each update is the pure
    // reserve applied to whatever is stored.
    let l = Limiter::new(&config(vec![quota(vec![rate(600, 60)])]));
    let store = MemoryStore::default();
    let mut admitted_tokens = 0;
    for i in 0..20 {
        let d = update(&store, "sluice.tokens.0", 4, |s: &mut KeyState| {
            l.reserve(s, at(i), QuotaId(0), &tokens(50))
        })
        .unwrap();
        if matches!(d, Decision::Admitted { .. }) {
            admitted_tokens += 50;
        }
    }
    assert_eq!(admitted_tokens, 600, "the bucket's capacity, within 20 ms");
}

#[test]
fn bytes_per_key() {
    let l = small();
    let mut s = KeyState::default();
    assert_eq!(
        s.claim(KeyId::new(0, "acme", "gpt-4o"), at(0)),
        Claim::Fresh
    );
    admitted(l.reserve(&mut s, at(0), QuotaId(0), &tokens(100)));
    let state = rmp_serde::to_vec(&s).unwrap();
    println!(
        "state per key (2 token limits + requests + streams): {} bytes",
        state.len()
    );
    assert!(state.len() <= 48, "{} bytes", state.len());
    let back: KeyState = rmp_serde::from_slice(&state).unwrap();
    assert_eq!(back, s);
}

#[test]
fn a_key_in_flight_or_refilling_keeps_its_slot_and_one_at_rest_loses_nothing() {
    let l = small();
    let a = KeyId::new(0, "a", "m");
    let b = KeyId::new(0, "b", "m");
    let mut slot = KeyState::default();
    assert_eq!(slot.claim(a, at(0)), Claim::Fresh);
    let (ticket, _) = admitted(l.reserve(&mut slot, at(0), QuotaId(0), &tokens(600)));
    // In flight, and its buckets refill for a minute: b cannot take it.
    assert_eq!(slot.claim(b, at(1)), Claim::Taken);
    l.finish(&mut slot, at(1), &ticket, Some(600));
    assert_eq!(slot.claim(b, at(30_000)), Claim::Taken, "still refilling");
    // The minute bucket is full again, the day bucket (10k/day) is not.
    assert_eq!(slot.claim(b, at(120_000)), Claim::Taken, "still refilling");
    // Once every bucket is full again its state is a fresh one: b may take
    // the slot, and a, coming back anywhere, gets exactly what it had.
    let later = at(6_000_000);
    let rested = slot.clone();
    assert!(rested.at_rest(later));
    assert_eq!(slot.claim(b, later), Claim::Fresh);
    let mut fresh = KeyState::default();
    assert_eq!(fresh.claim(a, later), Claim::Fresh);
    assert_eq!(
        l.status(&fresh, later, QuotaId(0)),
        l.status(&rested, later, QuotaId(0))
    );
    // A worker still believing the slot is a's finds out.
    admitted(l.reserve(&mut slot, later, QuotaId(0), &tokens(10)));
    assert_eq!(slot.claim(a, later), Claim::Taken);
}

#[test]
fn anthropic_429_shape() {
    let body: serde_json::Value = serde_json::from_str(&error_body(
        Api::Anthropic,
        ErrorKind::RateLimitTokens,
        "slow down",
    ))
    .unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[test]
fn a_reload_that_reorders_rules_keeps_every_key() {
    use sluice_core::config::Pattern;
    let mut acme = quota(vec![rate(1_000, 60)]);
    acme.matcher.tenants = vec![Pattern::new("acme")];
    let mut beta = quota(vec![rate(500, 60)]);
    beta.matcher.tenants = vec![Pattern::new("beta")];
    let before = Limiter::new(&config(vec![acme.clone(), beta.clone()]));
    let after = Limiter::new(&config(vec![beta, acme]));
    let find = |l: &Limiter, tenant: &str| {
        let q = l
            .quota_for("/v1/chat/completions", "h", "m", tenant)
            .unwrap();
        KeyId::new(l.identity(q), tenant, "m")
    };
    // Each rule moved (0 ↔ 1): its tenants keep their state. With the
    // rule's position in the key (as before), both would have changed.
    assert_eq!(find(&before, "acme"), find(&after, "acme"));
    assert_eq!(find(&before, "beta"), find(&after, "beta"));
    assert_ne!(find(&before, "acme"), find(&before, "beta"));
}
