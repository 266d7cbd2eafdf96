//! One limit's token bucket, kept as a single instant (GCRA form).
//!
//! A bucket of capacity `C` refilling at `L` tokens per period `P` is stored
//! as its *theoretical arrival time* `tat`: the instant at which it will be
//! full again. At time `now` the bucket is short of full by
//! `debt = max(tat − now, 0)` nanoseconds' worth of refill, so it holds
//! `C − debt·L/P` tokens; a negative holding is debt from usage charged
//! after the fact. Taking `n` tokens moves `tat` later by `n·P/L` (rounded
//! up), giving them back moves it earlier (rounded down, never before
//! `now`). All arithmetic is on integers in nanoseconds, in u128 where a
//! product could overflow, saturating at the ends: there is no fractional
//! remainder to lose between updates, and every rounding favours the limit.

use std::time::Duration;

use crate::units::Rate;

/// The fixed parameters of one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Tokens per period; 0 admits nothing.
    amount: u64,
    /// Period in nanoseconds (at least 1).
    period_ns: u64,
    /// Bucket capacity in tokens.
    capacity: u64,
    /// Capacity as refill time: `ceil(capacity·P/L)`.
    capacity_ns: u64,
}

/// Why tokens cannot be taken now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shortfall {
    /// Enough will have refilled after this wait.
    Wait(Duration),
    /// More than the bucket can ever hold.
    Never,
}

impl Gcra {
    /// A bucket for `rate` holding at most `capacity` tokens.
    pub(crate) fn new(rate: Rate, capacity: u64) -> Self {
        let period_ns = u64::try_from(rate.period.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut g = Gcra {
            amount: rate.amount,
            period_ns,
            capacity,
            capacity_ns: 0,
        };
        g.capacity_ns = g.time_for_ceil(capacity);
        g
    }

    pub(crate) fn amount(&self) -> u64 {
        self.amount
    }

    pub(crate) fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// Refill time of `tokens`, rounded up (saturating; `u64::MAX` when the
    /// rate is zero).
    fn time_for_ceil(&self, tokens: u64) -> u64 {
        if tokens == 0 {
            return 0;
        }
        if self.amount == 0 {
            return u64::MAX;
        }
        let t = (u128::from(tokens) * u128::from(self.period_ns)).div_ceil(u128::from(self.amount));
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Refill time of `tokens`, rounded down.
    fn time_for_floor(&self, tokens: u64) -> u64 {
        if self.amount == 0 {
            return 0;
        }
        let t = u128::from(tokens) * u128::from(self.period_ns) / u128::from(self.amount);
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Tokens that refill in `ns`, rounded up.
    fn tokens_in_ceil(&self, ns: u64) -> u64 {
        let t = (u128::from(ns) * u128::from(self.amount)).div_ceil(u128::from(self.period_ns));
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Tokens held at `now`: `capacity − debt`, negative when in debt.
    pub(crate) fn available(&self, tat: u64, now: u64) -> i64 {
        let short = self.tokens_in_ceil(tat.saturating_sub(now));
        let cap = i64::try_from(self.capacity).unwrap_or(i64::MAX);
        cap.saturating_sub(i64::try_from(short).unwrap_or(i64::MAX))
    }

    /// Time until the bucket is full again.
    pub(crate) fn time_to_full(&self, tat: u64, now: u64) -> Duration {
        Duration::from_nanos(tat.saturating_sub(now))
    }

    /// The new `tat` if `tokens` can be taken at `now`, or why not. Taking
    /// zero tokens always succeeds and changes nothing.
    pub(crate) fn try_take(&self, tat: u64, now: u64, tokens: u64) -> Result<u64, Shortfall> {
        if tokens == 0 {
            return Ok(tat);
        }
        if tokens > self.capacity || self.amount == 0 {
            return Err(Shortfall::Never);
        }
        let new_tat = tat.max(now).saturating_add(self.time_for_ceil(tokens));
        let debt = new_tat.saturating_sub(now);
        if debt <= self.capacity_ns {
            Ok(new_tat)
        } else {
            Err(Shortfall::Wait(Duration::from_nanos(
                debt - self.capacity_ns,
            )))
        }
    }

    /// The new `tat` after charging `tokens` unconditionally (may go into
    /// debt: later takes wait until it is paid back).
    pub(crate) fn charge(&self, tat: u64, now: u64, tokens: u64) -> u64 {
        if tokens == 0 {
            return tat;
        }
        tat.max(now).saturating_add(self.time_for_ceil(tokens))
    }

    /// The new `tat` after giving `tokens` back (never above capacity).
    pub(crate) fn refund(&self, tat: u64, now: u64, tokens: u64) -> u64 {
        if tokens == 0 || tat <= now {
            return tat;
        }
        tat.saturating_sub(self.time_for_floor(tokens)).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn per_minute(amount: u64) -> Gcra {
        Gcra::new(
            Rate {
                amount,
                period: Duration::from_secs(60),
            },
            amount,
        )
    }

    #[test]
    fn full_bucket_admits_its_capacity_then_refills_linearly() {
        let g = per_minute(600); // 10 tokens per second
        let now = 1_000 * S;
        let tat = g.try_take(0, now, 600).unwrap();
        assert_eq!(g.available(tat, now), 0);
        assert_eq!(
            g.try_take(tat, now, 1),
            Err(Shortfall::Wait(Duration::from_millis(100)))
        );
        assert_eq!(g.available(tat, now + S), 10);
        assert_eq!(g.time_to_full(tat, now), Duration::from_secs(60));
        assert_eq!(g.try_take(tat, now, 601), Err(Shortfall::Never));
    }

    #[test]
    fn debt_and_refunds() {
        let g = per_minute(600);
        let now = 1_000 * S;
        let tat = g.charge(0, now, 900);
        assert_eq!(g.available(tat, now), -300);
        // 30 s to pay back 300 tokens, then 10 tokens take 1 s more.
        assert_eq!(
            g.try_take(tat, now, 10),
            Err(Shortfall::Wait(Duration::from_secs(31)))
        );
        let tat = g.refund(tat, now, 400);
        assert_eq!(g.available(tat, now), 100);
        // Refunds never fill beyond capacity.
        assert_eq!(g.refund(tat, now, 10_000), now);
        assert_eq!(g.available(now, now), 600);
    }

    #[test]
    fn zero_rate_admits_nothing_but_zero() {
        let g = per_minute(0);
        assert_eq!(g.try_take(0, S, 1), Err(Shortfall::Never));
        assert_eq!(g.try_take(0, S, 0), Ok(0));
        assert_eq!(g.available(0, S), 0);
    }

    #[test]
    fn extremes_saturate() {
        let g = Gcra::new(
            Rate {
                amount: u64::MAX,
                period: Duration::from_secs(u64::MAX),
            },
            u64::MAX,
        );
        let tat = g.charge(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(tat, u64::MAX);
        assert_eq!(g.available(tat, 0), 0, "saturated at both ends");
        let _ = g.try_take(u64::MAX, 0, u64::MAX);
        assert_eq!(g.refund(u64::MAX, 0, u64::MAX), 0);
    }
}
