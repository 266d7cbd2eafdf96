//! The bulkhead: caps, tenant isolation, the FIFO queue, leases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "breaker_common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use sluice_core::breaker::{
    Acquire, Bulkhead, Poll, QueueTicket, SLOT_EPOCH, SlotLease, tenant_cap, tenant_key,
};
use sluice_core::config::BulkheadConfig;
use sluice_core::time::Timestamp;

fn granted(b: &mut Bulkhead, cfg: &BulkheadConfig, tenant: &str, now: Timestamp) -> SlotLease {
    match b.try_acquire(cfg, tenant, now) {
        Acquire::Granted(lease) => lease,
        other => panic!("{tenant}: expected a slot, got {other:?}"),
    }
}

fn queued(b: &mut Bulkhead, cfg: &BulkheadConfig, tenant: &str, now: Timestamp) -> QueueTicket {
    match b.try_acquire(cfg, tenant, now) {
        Acquire::Queued(ticket) => ticket,
        other => panic!("{tenant}: expected to queue, got {other:?}"),
    }
}

#[test]
fn caps_apply_per_backend_and_per_tenant() {
    let cfg = bulkhead_with(4, Some(2), 0, Duration::ZERO);
    let mut b = Bulkhead::default();
    let a1 = granted(&mut b, &cfg, "a", at(0.0));
    granted(&mut b, &cfg, "a", at(0.0));
    assert_eq!(
        b.try_acquire(&cfg, "a", at(0.0)),
        Acquire::Full,
        "a at its cap"
    );
    granted(&mut b, &cfg, "b", at(0.0));
    // batch's override is 1, and one slot is left.
    granted(&mut b, &cfg, "batch", at(0.0));
    assert_eq!(b.try_acquire(&cfg, "batch", at(0.0)), Acquire::Full);
    assert_eq!(b.in_flight(at(0.0)), 4);
    assert_eq!(
        b.try_acquire(&cfg, "c", at(0.0)),
        Acquire::Full,
        "backend full"
    );
    b.release(a1, at(1.0));
    assert_eq!(b.in_flight_of("a", at(1.0)), 1);
    granted(&mut b, &cfg, "c", at(1.0));
}

#[test]
fn tenant_caps_resolve_overrides_then_the_default_then_the_total() {
    let cfg = bulkhead_with(10, Some(4), 0, Duration::ZERO);
    assert_eq!(tenant_cap(&cfg, "batch"), 1);
    assert_eq!(tenant_cap(&cfg, "anyone"), 4);
    let cfg = bulkhead_with(3, None, 0, Duration::ZERO);
    assert_eq!(tenant_cap(&cfg, "anyone"), 3);
    let cfg = bulkhead_with(3, Some(50), 0, Duration::ZERO);
    assert_eq!(tenant_cap(&cfg, "anyone"), 3, "never above the total");
}

#[test]
fn the_queue_is_fifo_and_bounded() {
    let cfg = bulkhead_with(2, None, 2, secs(2));
    let mut b = Bulkhead::default();
    let l1 = granted(&mut b, &cfg, "a", at(0.0));
    let l2 = granted(&mut b, &cfg, "b", at(0.0));
    let q1 = queued(&mut b, &cfg, "c", at(0.1));
    let q2 = queued(&mut b, &cfg, "d", at(0.2));
    assert_eq!(
        b.try_acquire(&cfg, "e", at(0.3)),
        Acquire::Full,
        "queue full"
    );
    assert_eq!(b.queue_len(), 2);
    assert_eq!(b.poll(&cfg, q2, at(0.4)), Poll::Waiting { position: 1 });
    b.release(l1, at(0.5));
    // One slot: the second in line may not take it...
    assert_eq!(b.poll(&cfg, q2, at(0.6)), Poll::Waiting { position: 1 });
    // ...nor may a newcomer.
    assert!(matches!(b.try_acquire(&cfg, "f", at(0.6)), Acquire::Full));
    match b.poll(&cfg, q1, at(0.7)) {
        Poll::Granted { waited, .. } => assert_eq!(waited, Duration::from_millis(600)),
        other => panic!("{other:?}"),
    }
    b.release(l2, at(0.8));
    assert!(matches!(b.poll(&cfg, q2, at(0.9)), Poll::Granted { .. }));
    assert_eq!(b.queue_len(), 0);
}

#[test]
fn waiters_time_out_after_max_wait_and_can_cancel() {
    let cfg = bulkhead_with(1, None, 3, secs(2));
    let mut b = Bulkhead::default();
    granted(&mut b, &cfg, "a", at(0.0));
    let q1 = queued(&mut b, &cfg, "b", at(0.0));
    let q2 = queued(&mut b, &cfg, "c", at(1.0));
    assert_eq!(b.poll(&cfg, q1, at(1.9)), Poll::Waiting { position: 0 });
    assert_eq!(b.poll(&cfg, q1, at(2.0)), Poll::TimedOut);
    assert_eq!(b.poll(&cfg, q2, at(2.5)), Poll::Waiting { position: 0 });
    b.cancel(q2);
    assert_eq!(b.queue_len(), 0);
    assert_eq!(b.poll(&cfg, q2, at(2.6)), Poll::TimedOut);
}

#[test]
fn a_tenant_at_its_cap_does_not_hold_up_the_queue() {
    let cfg = bulkhead_with(3, Some(1), 4, secs(10));
    let mut b = Bulkhead::default();
    granted(&mut b, &cfg, "slow", at(0.0));
    let la = granted(&mut b, &cfg, "a", at(0.0));
    granted(&mut b, &cfg, "b", at(0.0));
    let q_slow = queued(&mut b, &cfg, "slow", at(0.1));
    let q_c = queued(&mut b, &cfg, "c", at(0.2));
    b.release(la, at(0.3));
    // "slow" is first in line but at its cap: "c" gets the free slot.
    assert_eq!(b.poll(&cfg, q_slow, at(0.4)), Poll::Waiting { position: 0 });
    assert!(matches!(b.poll(&cfg, q_c, at(0.4)), Poll::Granted { .. }));
}

#[test]
fn a_slot_whose_release_never_comes_expires() {
    let cfg = bulkhead_with(1, None, 0, Duration::ZERO);
    let mut b = Bulkhead::default();
    let epoch = SLOT_EPOCH.as_secs_f64();
    // Taken at the start of an epoch: it holds through the next one.
    let t0 = (at(0.0).as_nanos() / 30_000_000_000 + 1) as f64 * epoch - 1_800_000_000.0;
    granted(&mut b, &cfg, "crashed", at(t0));
    assert_eq!(
        b.try_acquire(&cfg, "x", at(t0 + 2.0 * epoch - 0.001)),
        Acquire::Full
    );
    assert_eq!(b.in_flight(at(t0 + 2.0 * epoch)), 0);
    granted(&mut b, &cfg, "x", at(t0 + 2.0 * epoch));
}

#[test]
fn renewed_slots_live_on_and_late_releases_free_nothing_twice() {
    let cfg = bulkhead_with(1, None, 0, Duration::ZERO);
    let mut b = Bulkhead::default();
    let epoch = SLOT_EPOCH.as_secs_f64();
    let mut lease = granted(&mut b, &cfg, "stream", at(0.0));
    for i in 1..10 {
        let now = at(i as f64 * epoch);
        assert!(lease.due(now));
        lease = b.renew(&cfg, "stream", lease, now).unwrap();
        assert!(!lease.due(now));
        assert_eq!(b.try_acquire(&cfg, "other", now), Acquire::Full);
    }
    let end = at(10.0 * epoch);
    b.release(lease, end);
    assert_eq!(b.in_flight(end), 0);
    let other = granted(&mut b, &cfg, "other", end);
    // A stale copy of the old lease frees nothing.
    b.release(lease, end);
    b.release(lease, end);
    assert_eq!(b.in_flight(end), 1);
    b.release(other, end);
    // An expired lease renews only if a slot is free.
    let held = granted(&mut b, &cfg, "a", end);
    let _other = {
        let later = at(13.0 * epoch);
        let o = granted(&mut b, &cfg, "b", later);
        assert_eq!(b.renew(&cfg, "a", held, later), None);
        o
    };
}

#[test]
fn the_clock_going_back_does_not_pin_slots() {
    let cfg = bulkhead_with(1, None, 1, secs(2));
    let mut b = Bulkhead::default();
    granted(&mut b, &cfg, "a", at(10_000.0));
    // A day back: the slot still expires within two epochs of the new time.
    let back = 10_000.0 - 86_400.0;
    assert_eq!(
        b.try_acquire(&cfg, "b", at(back)),
        Acquire::Queued(QueueTicket {
            id: 0,
            tenant: tenant_key("b")
        })
    );
    assert!(matches!(
        b.try_acquire(&cfg, "c", at(back + 2.0 * SLOT_EPOCH.as_secs_f64() + 0.1)),
        Acquire::Granted(_)
    ));
    // The waiter's wait counts from the jump, so it times out, not waits a day.
    let mut b = Bulkhead::default();
    granted(&mut b, &cfg, "a", at(4_999.0));
    let q = queued(&mut b, &cfg, "b", at(5_000.0));
    assert_eq!(b.poll(&cfg, q, at(1_000.0)), Poll::Waiting { position: 0 });
    assert_eq!(b.poll(&cfg, q, at(1_002.0)), Poll::TimedOut);
    b.try_acquire(&cfg, "z", Timestamp::ZERO);
    b.try_acquire(&cfg, "z", Timestamp(u64::MAX));
}

#[test]
fn the_encoded_bulkhead_stays_small() {
    let cfg = bulkhead_with(256, Some(64), 32, secs(2));
    let mut b = Bulkhead::default();
    for i in 0..256 {
        b.try_acquire(&cfg, &format!("tenant-with-a-long-name-{}", i % 8), at(0.0));
    }
    for i in 0..32 {
        b.try_acquire(&cfg, &format!("t{i}"), at(0.0));
    }
    assert_eq!(b.in_flight(at(0.0)), 256);
    assert_eq!(b.queue_len(), 32);
    let bytes = rmp_serde::to_vec(&b).unwrap();
    eprintln!(
        "bulkhead: 8 tenants, 256 in flight, 32 waiting: {} bytes",
        bytes.len()
    );
    assert!(bytes.len() <= 1024, "{}", bytes.len());
    let back: Bulkhead = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, b);
}

// ---------------------------------------------------------------- properties

#[derive(Clone, Debug)]
enum Op {
    Acquire(u8),
    Release(usize),
    Poll(usize),
    Cancel(usize),
    Renew(usize),
    Wait(u32),
    Back(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..5).prop_map(Op::Acquire),
        3 => any::<usize>().prop_map(Op::Release),
        3 => any::<usize>().prop_map(Op::Poll),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Renew),
        3 => (0u32..40_000).prop_map(Op::Wait),
        1 => (0u32..100_000).prop_map(Op::Back),
    ]
}

fn tenant(i: u8) -> String {
    // Tenant 0 is "batch", whose override cap is 1.
    if i == 0 {
        "batch".to_string()
    } else {
        format!("t{i}")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever happens, the bulkhead never holds more than its caps, the
    /// queue never exceeds its size, and leases the caller still holds
    /// (renewed in time) are never lost.
    #[test]
    fn never_over_capacity(
        max in 1u32..8,
        per_tenant in proptest::option::of(1u32..4),
        queue in 0u32..4,
        ops in prop::collection::vec(op(), 0..300),
    ) {
        let cfg = bulkhead_with(max, per_tenant, queue, secs(2));
        let mut b = Bulkhead::default();
        let mut now = at(0.0);
        let mut held: Vec<(String, SlotLease)> = vec![];
        let mut waiting: Vec<(String, QueueTicket)> = vec![];
        for o in &ops {
            match *o {
                Op::Acquire(t) => match b.try_acquire(&cfg, &tenant(t), now) {
                    Acquire::Granted(l) => held.push((tenant(t), l)),
                    Acquire::Queued(q) => waiting.push((tenant(t), q)),
                    Acquire::Full => {}
                },
                Op::Release(i) if !held.is_empty() => {
                    let (_, l) = held.remove(i % held.len());
                    b.release(l, now);
                }
                Op::Poll(i) if !waiting.is_empty() => {
                    let i = i % waiting.len();
                    let (t, q) = waiting[i].clone();
                    match b.poll(&cfg, q, now) {
                        Poll::Granted { lease, waited } => {
                            prop_assert!(waited < cfg.max_wait);
                            waiting.remove(i);
                            held.push((t, lease));
                        }
                        Poll::TimedOut => { waiting.remove(i); }
                        Poll::Waiting { position } => prop_assert!(position < queue),
                    }
                }
                Op::Cancel(i) if !waiting.is_empty() => {
                    let (_, q) = waiting.remove(i % waiting.len());
                    b.cancel(q);
                }
                Op::Renew(i) if !held.is_empty() => {
                    let i = i % held.len();
                    let (t, l) = held[i].clone();
                    match b.renew(&cfg, &t, l, now) {
                        Some(l) => held[i].1 = l,
                        None => { held.remove(i); }
                    }
                }
                Op::Wait(ms) => now = now + Duration::from_millis(u64::from(ms)),
                Op::Back(ms) => now = now - Duration::from_millis(u64::from(ms)),
                _ => {}
            }
            prop_assert!(b.in_flight(now) <= max, "{} in flight > {max}", b.in_flight(now));
            prop_assert!(b.queue_len() <= queue);
            let mut per: HashMap<String, u32> = HashMap::new();
            for t in 0..5 {
                per.insert(tenant(t), b.in_flight_of(&tenant(t), now));
            }
            for (t, n) in &per {
                prop_assert!(*n <= tenant_cap(&cfg, t), "{t} holds {n}");
            }
        }
        // Leases expire: two epochs after the last event, everything is
        // free. (Any call tells the bulkhead the time; a poll with a ticket
        // that does not exist is the one that changes nothing else.)
        b.poll(&cfg, QueueTicket { id: u64::MAX, tenant: 0 }, now);
        let later = now + SLOT_EPOCH * 2;
        prop_assert_eq!(b.in_flight(later), 0);
        prop_assert!(matches!(b.try_acquire(&cfg, "fresh", later), Acquire::Granted(_)));
    }

    /// Isolation: however many requests a greedy tenant sends, another
    /// tenant still gets `max − greedy's cap` slots.
    #[test]
    fn one_tenant_cannot_take_anothers_slots(
        max in 2u32..16,
        cap_share in 1u32..16,
        greedy_requests in 0u32..100,
    ) {
        let cap = cap_share.min(max - 1);
        let cfg = bulkhead_with(max, Some(cap), 0, Duration::ZERO);
        let mut b = Bulkhead::default();
        for _ in 0..greedy_requests {
            b.try_acquire(&cfg, "greedy", at(0.0));
        }
        prop_assert_eq!(b.in_flight_of("greedy", at(0.0)), greedy_requests.min(cap));
        let mut polite = 0;
        while let Acquire::Granted(_) = b.try_acquire(&cfg, "polite", at(0.0)) {
            polite += 1;
        }
        prop_assert_eq!(polite, cap.min(max - greedy_requests.min(cap)));
    }
}
