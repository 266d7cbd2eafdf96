//! The overshoot bound of `tokens` (see its module docs), over arbitrary
//! interleavings of reservations, settlements and time steps:
//!
//! for every token limit `L` per `P` with capacity `C` and every window of
//! length `T`, tokens charged in the window ≤ `C + L·T/P + O`, `O` being the
//! excess charged in the window (usage beyond the reservation), up to the
//! rounding slack of one nanosecond of refill per excess charge plus one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{config, quota, rate};
use proptest::prelude::*;
use sluice_core::time::Timestamp;
use sluice_core::tokens::{Decision, KeyState, Limiter, QuotaId, Reservation, Ticket};

#[derive(Clone, Debug)]
enum Op {
    /// Reserve this many tokens.
    Reserve(u64),
    /// Settle an outstanding ticket (index modulo their count) with this
    /// usage (capped at the reservation in "correct upstream" runs).
    Settle { which: usize, actual: u64 },
    /// Let this many milliseconds pass.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..4_000).prop_map(Op::Reserve),
        3 => (any::<usize>(), 0u64..6_000).prop_map(|(which, actual)| Op::Settle { which, actual }),
        3 => (0u64..30_000).prop_map(Op::Wait),
    ]
}

/// One change to the buckets: when, how many tokens (negative: refund),
/// and how many of them were excess beyond a reservation.
struct Charge {
    at: u64,
    tokens: i128,
    excess: u64,
}

/// Runs `ops`; `correct_upstream` caps every usage at its reservation.
/// Returns the charges and the limits `(L, P ns, C)` to check.
fn run(
    ops: &[Op],
    burst: Option<u64>,
    correct_upstream: bool,
) -> (Vec<Charge>, Vec<(u64, u64, u64)>) {
    let mut q = quota(vec![rate(10_000, 60), rate(50_000, 3_600)]);
    q.burst = burst;
    let limiter = Limiter::new(&config(vec![q]));
    let limits = vec![
        (10_000u64, 60_000_000_000u64, burst.unwrap_or(10_000)),
        (50_000, 3_600_000_000_000, 50_000),
    ];
    let mut state = KeyState::default();
    let mut now = 1_700_000_000_000_000_000u64;
    let mut outstanding: Vec<Ticket> = Vec::new();
    let mut charges = Vec::new();
    for op in ops {
        match *op {
            Op::Reserve(n) => {
                let before = state.clone();
                let r = Reservation {
                    prompt_tokens: n / 3,
                    completion_tokens: n - n / 3,
                };
                match limiter.reserve(&mut state, Timestamp(now), QuotaId(0), &r) {
                    Decision::Admitted { ticket, .. } => {
                        assert_eq!(ticket.reserved, n);
                        charges.push(Charge {
                            at: now,
                            tokens: i128::from(n),
                            excess: 0,
                        });
                        outstanding.push(ticket);
                    }
                    Decision::Rejected(_) => {
                        assert_eq!(state, before, "a rejection changes nothing")
                    }
                }
            }
            Op::Settle { which, actual } => {
                if outstanding.is_empty() {
                    continue;
                }
                let ticket = outstanding.swap_remove(which % outstanding.len());
                let actual = if correct_upstream {
                    actual.min(ticket.reserved)
                } else {
                    actual
                };
                let rec = limiter.reconcile(&mut state, Timestamp(now), &ticket, actual);
                assert_eq!(
                    i128::from(rec.delta),
                    i128::from(actual) - i128::from(ticket.reserved)
                );
                charges.push(Charge {
                    at: now,
                    tokens: i128::from(rec.delta),
                    excess: actual.saturating_sub(ticket.reserved),
                });
            }
            Op::Wait(ms) => now += ms * 1_000_000,
        }
    }
    (charges, limits)
}

fn check_bound(charges: &[Charge], limits: &[(u64, u64, u64)]) -> Result<(), TestCaseError> {
    for &(l, p, c) in limits {
        let (l, p, c) = (i128::from(l), i128::from(p), i128::from(c));
        for i in 0..charges.len() {
            let mut net = 0i128;
            let mut excess = 0i128;
            let mut excess_events = 0i128;
            for ch in &charges[i..] {
                net += ch.tokens;
                if ch.excess > 0 {
                    excess += i128::from(ch.excess);
                    excess_events += 1;
                }
                let t = i128::from(ch.at - charges[i].at);
                let bound = (c + excess) * p + l * t + l * (1 + excess_events);
                prop_assert!(
                    net * p <= bound,
                    "limit {l}/{p}ns cap {c}: {net} tokens charged in {t} ns, excess {excess}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn charged_tokens_never_exceed_capacity_plus_refill_plus_excess(
        ops in prop::collection::vec(op(), 1..160),
        burst in prop::option::of(4_000u64..20_000),
    ) {
        let (charges, limits) = run(&ops, burst, false);
        check_bound(&charges, &limits)?;
    }

    /// With usage never beyond the reservation, the excess term is zero.
    #[test]
    fn a_correct_upstream_never_overshoots(
        ops in prop::collection::vec(op(), 1..160),
        burst in prop::option::of(4_000u64..20_000),
    ) {
        let (charges, limits) = run(&ops, burst, true);
        prop_assert!(charges.iter().all(|c| c.excess == 0));
        check_bound(&charges, &limits)?;
    }
}

/// The bound is tight: a full bucket plus one period of refill is reachable.
#[test]
fn two_limits_per_period_are_reachable_and_no_more() {
    let limiter = Limiter::new(&config(vec![quota(vec![rate(10_000, 60)])]));
    let mut state = KeyState::default();
    let start = 1_000_000_000_000u64;
    let mut admitted = 0u64;
    // Every 6 s for one minute (inclusive of both ends), take what is there.
    for step in 0..=10u64 {
        let now = Timestamp(start + step * 6_000_000_000);
        let status = limiter.status(&state, now, QuotaId(0));
        let free = status.tokens[0].remaining;
        if free > 0 {
            let r = Reservation {
                prompt_tokens: free,
                completion_tokens: 0,
            };
            assert!(matches!(
                limiter.reserve(&mut state, now, QuotaId(0), &r),
                Decision::Admitted { .. }
            ));
            admitted += free;
        }
    }
    assert_eq!(admitted, 20_000, "C + L over a window of one period");
}
