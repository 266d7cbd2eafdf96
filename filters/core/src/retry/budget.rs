//! The budget: net deposits per slice of `ttl`, plus a fixed reserve.
//!
//! A [`RetryBudget`] is ten numbers and a slice index. Slice `k` (newest
//! first) holds what was deposited in it minus what was withdrawn; the
//! balance is the reserve plus the slices still within `ttl`. Every
//! operation first moves the ring to `now` (`advance`), then
//! changes the newest slice, so a worker's read → change → compare-and-swap
//! loop can re-apply it to whatever another worker wrote.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RetryConfig;
use crate::time::{Timestamp, duration_nanos};

/// Slices a budget's `ttl` is cut into (Finagle's and tower's ten): a
/// deposit lives between 0.9 and 1 `ttl`.
pub const BUCKETS: usize = 10;

/// Most a single request or retry weighs, in typical requests: bounds what
/// one absurd request (a client asking for 2³² completion tokens) can add
/// to a budget every request of the backend shares.
pub const MAX_WEIGHT: f64 = 1_000.0;

/// Least a single request or retry weighs: a retry is never free.
pub const MIN_WEIGHT: f64 = 1.0 / MAX_WEIGHT;

/// Rounding a withdrawal forgives, so that five deposits of 0.2 pay for a
/// retry of 1 whatever order the additions happened in.
const EPSILON: f64 = 1e-9;

/// A retry budget: the state one backend × zone keeps in shared data.
///
/// All amounts are in typical retries (weight 1). Small (about 110 bytes
/// of MessagePack), `Default` is an empty budget, and every operation is a
/// deterministic function of (state, now, config, arguments).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryBudget {
    /// Index of the newest slice: its start in nanoseconds over `slice`.
    head: u64,
    /// Length of a slice in nanoseconds (`ttl / BUCKETS`, at least 1) that
    /// `head` counts in; 0 in a budget never written.
    slice: u64,
    /// Deposits minus withdrawals per slice, newest first.
    net: [f64; BUCKETS],
}

impl RetryBudget {
    /// Records one request of weight `weight` (typical requests; see
    /// [`deposit_many`](Self::deposit_many)): it funds `budget × weight` of
    /// retries for the next `ttl`.
    pub fn deposit(&mut self, now: Timestamp, cfg: &RetryConfig, weight: f64) {
        self.deposit_many(now, cfg, 1, weight);
    }

    /// Records `requests` requests whose weights sum to `weight_sum`, as a
    /// worker's tick flushes them. Each weight counts within
    /// [`MIN_WEIGHT`]..=[`MAX_WEIGHT`] (the sum is clamped to
    /// `requests` times those bounds); a sum that is not a finite positive
    /// number counts every request as 1.
    pub fn deposit_many(
        &mut self,
        now: Timestamp,
        cfg: &RetryConfig,
        requests: u32,
        weight_sum: f64,
    ) {
        self.advance(now, cfg);
        let amount = cfg.budget.get() * total_weight(requests, weight_sum);
        self.net[0] += amount;
    }

    /// Takes a retry of weight `weight` if the balance covers it: `true`
    /// and the balance is lower, or `false` and nothing changed (but the
    /// ring's age). A weight that is not a finite positive number counts
    /// as 1; it is clamped to [`MIN_WEIGHT`]..=[`MAX_WEIGHT`].
    pub fn try_withdraw(&mut self, now: Timestamp, cfg: &RetryConfig, weight: f64) -> bool {
        self.advance(now, cfg);
        let w = one_weight(weight);
        let allowed = self.current(cfg) + EPSILON >= w;
        if allowed {
            self.net[0] -= w;
        }
        allowed
    }

    /// Records a retry that already happened (Envoy's router made it within
    /// the bound a [`plan`](super::plan()) gave), even into debt: a negative
    /// balance holds later retries back until deposits repay it or it
    /// expires. Weights as in [`try_withdraw`](Self::try_withdraw).
    pub fn charge(&mut self, now: Timestamp, cfg: &RetryConfig, weight: f64) {
        self.advance(now, cfg);
        self.net[0] -= one_weight(weight);
    }

    /// Retries of weight 1 available at `now`: the reserve plus deposits
    /// minus withdrawals of the last `ttl`. Negative while in debt.
    pub fn balance(&self, now: Timestamp, cfg: &RetryConfig) -> f64 {
        let mut aged = self.clone();
        aged.advance(now, cfg);
        aged.current(cfg)
    }

    /// Whether a retry of weight 1 would be allowed at `now`.
    pub fn can_retry(&self, now: Timestamp, cfg: &RetryConfig) -> bool {
        self.balance(now, cfg) + EPSILON >= 1.0
    }

    /// The balance once the ring is at the current slice.
    fn current(&self, cfg: &RetryConfig) -> f64 {
        reserve(cfg) + self.net.iter().sum::<f64>()
    }

    /// Moves the ring to `now`: slices older than `ttl` drop off.
    ///
    /// - Ahead of the newest slice: the gap's slices start empty; a gap of
    ///   `BUCKETS` or more (a clock jumping forward by `ttl`) empties all.
    /// - Behind by at most one slice (two workers' clock reads racing): the
    ///   newest slice takes what comes.
    /// - Further behind (the wall clock was stepped back): the ring is
    ///   re-anchored at `now`, every slice keeping its age, so that nothing
    ///   expires early or late. Clamping instead would freeze the ring
    ///   until the clock caught up, piling every deposit of that time into
    ///   one slice.
    /// - A `ttl` other than the one the ring was cut for (a reload): slices
    ///   no longer mean the same time; the debt is kept in the newest
    ///   slice, the credit dropped (it cannot be given a correct age, and
    ///   keeping it would let it live past its `ttl`).
    ///
    /// Amounts that are not finite (a corrupted value) count as nothing.
    fn advance(&mut self, now: Timestamp, cfg: &RetryConfig) {
        for v in &mut self.net {
            if !v.is_finite() {
                *v = 0.0;
            }
        }
        let slice = slice_nanos(cfg.ttl);
        let at = now.as_nanos() / slice;
        if self.slice != slice {
            let debt = self.net.iter().sum::<f64>().min(0.0);
            self.net = [0.0; BUCKETS];
            self.net[0] = debt;
            self.slice = slice;
            self.head = at;
        } else if at >= self.head {
            let gap = usize::try_from(at - self.head).unwrap_or(usize::MAX);
            if gap >= BUCKETS {
                self.net = [0.0; BUCKETS];
            } else if gap > 0 {
                self.net.rotate_right(gap);
                for v in self.net.iter_mut().take(gap) {
                    *v = 0.0;
                }
            }
            self.head = at;
        } else if self.head - at > 1 {
            self.head = at;
        }
    }
}

/// The retries always available per `ttl`: `min_retries_per_second × ttl`
/// (Finagle's reserve). Spent, they come back as they expire.
pub fn reserve(cfg: &RetryConfig) -> f64 {
    f64::from(cfg.min_retries_per_second) * cfg.ttl.as_secs_f64()
}

/// A slice's length in nanoseconds: `ttl / BUCKETS`, at least 1.
fn slice_nanos(ttl: Duration) -> u64 {
    (duration_nanos(ttl) / BUCKETS as u64).max(1)
}

/// One request's or retry's weight, as counted.
fn one_weight(weight: f64) -> f64 {
    if weight.is_finite() && weight > 0.0 {
        weight.clamp(MIN_WEIGHT, MAX_WEIGHT)
    } else {
        1.0
    }
}

/// The weight of `requests` requests whose weights sum to `weight_sum`, as
/// counted.
fn total_weight(requests: u32, weight_sum: f64) -> f64 {
    let n = f64::from(requests);
    if weight_sum.is_finite() && weight_sum > 0.0 {
        weight_sum.clamp(n * MIN_WEIGHT, n * MAX_WEIGHT)
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailureKind;
    use crate::units::Ratio;

    /// The policy's defaults: 20%, 10 retries per second, 10 s.
    fn cfg() -> RetryConfig {
        RetryConfig {
            budget: Ratio::percent(20),
            min_retries_per_second: 10,
            ttl: Duration::from_secs(10),
            max_retries: 1,
            retry_on: vec![FailureKind::GatewayError, FailureKind::Reset],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            honor_retry_after: true,
            typical_request_tokens: 0,
        }
    }

    fn no_floor() -> RetryConfig {
        RetryConfig {
            min_retries_per_second: 0,
            ..cfg()
        }
    }

    /// A realistic epoch, on a slice boundary.
    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_795_978_950_000 + ms)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_fifth_of_the_requests_plus_the_floor() {
        let c = cfg();
        let mut b = RetryBudget::default();
        assert!(close(b.balance(at(0), &c), 100.0), "the floor: 10/s × 10 s");
        for i in 0..100 {
            b.deposit(at(i * 10), &c, 1.0);
        }
        assert!(close(b.balance(at(1000), &c), 120.0));
        let c = no_floor();
        let mut b = RetryBudget::default();
        for i in 0..100 {
            b.deposit(at(i * 10), &c, 1.0);
        }
        let taken = (0..100)
            .filter(|_| b.try_withdraw(at(1000), &c, 1.0))
            .count();
        assert_eq!(taken, 20);
        assert!(!b.can_retry(at(1000), &c));
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let c = no_floor();
        let mut b = RetryBudget::default();
        b.deposit_many(at(0), &c, 100, 100.0);
        assert!(close(b.balance(at(9_999), &c), 20.0));
        assert!(close(b.balance(at(10_000), &c), 0.0));
        // Mid-slice: still there a slice short of ttl, gone by ttl.
        let mut b = RetryBudget::default();
        b.deposit_many(at(500), &c, 100, 100.0);
        assert!(close(b.balance(at(9_499), &c), 20.0));
        assert!(close(b.balance(at(10_500), &c), 0.0));
    }

    #[test]
    fn withdrawals_expire_too_which_refills_the_floor() {
        let c = cfg();
        let mut b = RetryBudget::default();
        // No traffic: 100 retries at once, then none until they age out.
        let taken = (0..150).filter(|_| b.try_withdraw(at(0), &c, 1.0)).count();
        assert_eq!(taken, 100);
        assert!(!b.try_withdraw(at(5_000), &c, 1.0));
        assert!(close(b.balance(at(10_000), &c), 100.0));
        // A steady 10 retries per second is sustained indefinitely...
        let mut b = RetryBudget::default();
        for ms in (0..60_000).step_by(100) {
            assert!(b.try_withdraw(at(ms), &c, 1.0), "refused at {ms} ms");
        }
        // ...and 11 per second is not, once the first reserve is spent.
        let mut b = RetryBudget::default();
        let refused = (0..660)
            .filter(|i| !b.try_withdraw(at(i * 1000 / 11), &c, 1.0))
            .count();
        assert!(refused >= 40, "{refused} refused");
    }

    #[test]
    fn a_forward_jump_expires_everything() {
        let c = cfg();
        let mut b = RetryBudget::default();
        b.deposit_many(at(0), &c, 1000, 1000.0);
        b.charge(at(0), &c, 500.0);
        let year = 365 * 86_400_000;
        assert!(close(b.balance(at(year), &c), 100.0));
        assert!(b.try_withdraw(at(year), &c, 1.0));
        assert!(close(b.balance(at(year), &c), 99.0));
    }

    #[test]
    fn a_clock_stepped_back_neither_panics_nor_mints() {
        let c = no_floor();
        let mut b = RetryBudget::default();
        b.deposit_many(at(100_000), &c, 100, 100.0);
        // A racing worker a few milliseconds behind, across a slice edge:
        // its deposit joins the newest slice.
        b.deposit_many(at(99_998), &c, 5, 5.0);
        assert!(close(b.balance(at(99_998), &c), 21.0));
        assert!(close(b.balance(at(109_999), &c), 21.0));
        assert!(close(b.balance(at(110_000), &c), 0.0));
        // Stepped back an hour: the deposits keep their age on the new clock.
        let mut b = RetryBudget::default();
        b.deposit_many(at(3_600_000), &c, 100, 100.0);
        let back = 5_000;
        assert!(close(b.balance(at(back), &c), 20.0));
        b.deposit_many(at(back), &c, 50, 50.0);
        assert!(close(b.balance(at(back + 9_999), &c), 30.0));
        assert!(close(b.balance(at(back + 10_000), &c), 0.0));
        // From the budget's birth (time 0) and back past it.
        let mut b = RetryBudget::default();
        b.deposit(Timestamp::ZERO, &c, 1.0);
        assert!(!b.try_withdraw(Timestamp::ZERO, &c, 1.0));
        let mut b = RetryBudget::default();
        b.deposit(Timestamp(u64::MAX), &c, 5.0);
        assert!(b.try_withdraw(Timestamp::ZERO, &c, 1.0));
        assert!(!b.try_withdraw(Timestamp::ZERO, &c, 0.5));
    }

    #[test]
    fn weights_count_work_not_requests() {
        let c = no_floor();
        let mut b = RetryBudget::default();
        b.deposit(at(0), &c, 5.0);
        assert!(close(b.balance(at(0), &c), 1.0));
        b.deposit_many(at(0), &c, 4, 20.0);
        assert!(close(b.balance(at(0), &c), 5.0));
        // An expensive retry costs its weight.
        assert!(!b.try_withdraw(at(0), &c, 6.0));
        assert!(b.try_withdraw(at(0), &c, 3.0));
        assert!(close(b.balance(at(0), &c), 2.0));
        assert!(b.try_withdraw(at(0), &c, 2.0));
        assert!(!b.can_retry(at(0), &c));
    }

    #[test]
    fn nonsense_weights_count_as_one_and_absurd_ones_are_capped() {
        let c = no_floor();
        for w in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -3.0, 0.0] {
            let mut b = RetryBudget::default();
            b.deposit(at(0), &c, w);
            b.deposit_many(at(0), &c, 4, w);
            assert!(close(b.balance(at(0), &c), 1.0), "deposit of {w}");
            assert!(b.try_withdraw(at(0), &c, w), "withdrawal of {w}");
            assert!(close(b.balance(at(0), &c), 0.0), "withdrawal of {w}");
            b.charge(at(0), &c, w);
            assert!(close(b.balance(at(0), &c), -1.0), "charge of {w}");
        }
        let mut b = RetryBudget::default();
        b.deposit(at(0), &c, 1e300);
        assert!(close(b.balance(at(0), &c), 0.2 * MAX_WEIGHT));
        b.deposit_many(at(0), &c, 2, 1e300);
        assert!(close(b.balance(at(0), &c), 0.6 * MAX_WEIGHT));
        // A retry is never free.
        let mut b = RetryBudget::default();
        b.deposit(at(0), &c, 0.01);
        let taken = (0..10_000)
            .filter(|_| b.try_withdraw(at(0), &c, 1e-12))
            .count();
        assert_eq!(taken, 2);
    }

    #[test]
    fn charges_go_into_debt_that_expires() {
        let c = cfg();
        let mut b = RetryBudget::default();
        for _ in 0..130 {
            b.charge(at(0), &c, 1.0);
        }
        assert!(close(b.balance(at(0), &c), -30.0));
        assert!(!b.can_retry(at(5_000), &c));
        b.deposit_many(at(5_000), &c, 155, 155.0);
        assert!(close(b.balance(at(5_000), &c), 1.0));
        assert!(close(b.balance(at(10_000), &c), 131.0));
    }

    #[test]
    fn a_reload_with_another_ttl_keeps_the_debt_and_drops_the_credit() {
        let c = no_floor();
        let longer = RetryConfig {
            ttl: Duration::from_secs(30),
            ..no_floor()
        };
        let mut b = RetryBudget::default();
        b.deposit_many(at(0), &c, 100, 100.0);
        assert!(close(b.balance(at(0), &longer), 0.0));
        let mut b = RetryBudget::default();
        b.charge(at(0), &c, 7.0);
        b.deposit(at(1_000), &c, 1.0);
        assert!(close(b.balance(at(1_000), &longer), -6.8));
        b.deposit(at(1_000), &longer, 1.0);
        // Slices of 3 s now: the one holding it is gone 30 s after it began.
        assert!(close(b.balance(at(29_999), &longer), -6.6));
        assert!(close(b.balance(at(30_000), &longer), 0.0));
    }

    #[test]
    fn a_tiny_or_zero_ttl_does_not_divide_by_zero() {
        let c = RetryConfig {
            ttl: Duration::ZERO,
            ..cfg()
        };
        let mut b = RetryBudget::default();
        b.deposit_many(at(0), &c, 100, 100.0);
        assert!(b.try_withdraw(at(0), &c, 1.0));
        assert!(close(b.balance(at(0), &c), 19.0));
        assert!(close(b.balance(at(1), &c), 0.0));
    }

    #[test]
    fn corrupted_amounts_count_as_nothing() {
        let c = cfg();
        let mut b = RetryBudget::default();
        b.deposit(at(0), &c, 1.0);
        b.net[1] = f64::INFINITY;
        b.net[2] = f64::NAN;
        b.net[3] = f64::NEG_INFINITY;
        assert!(close(b.balance(at(0), &c), 100.2));
        assert!(b.try_withdraw(at(0), &c, 1.0));
        assert!(b.net.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_state_is_small_and_round_trips_through_messagepack() {
        let c = cfg();
        let mut b = RetryBudget::default();
        for i in 0..BUCKETS as u64 {
            b.deposit_many(at(i * 1000), &c, 1000, 1234.5);
            b.charge(at(i * 1000 + 1), &c, 3.3);
        }
        let bytes = rmp_serde::to_vec(&b).unwrap();
        assert!(bytes.len() <= 112, "{} bytes", bytes.len());
        let back: RetryBudget = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.balance(at(9_500), &c), b.balance(at(9_500), &c));
    }
}
