//! Sliding windows of call outcomes, small enough to live in shared data.
//!
//! Two shapes, as in resilience4j:
//!
//! - [`CallRing`]: the last `n` calls exactly, two bits per call (failed,
//!   slow) in a ring of `u64` words. Exact up to [`MAX_EXACT_CALLS`] calls
//!   (1024 calls: 32 words, about 290 bytes of MessagePack); the default
//!   window of 100 calls costs 4 words.
//! - [`BucketRing`]: at most [`MAX_BUCKETS`] aggregated buckets, each
//!   covering a fixed slice of an axis: time (a time window of `w` seconds
//!   gets 1 s buckets up to 60 s, then `w / 60` buckets), or the call count
//!   for call windows longer than [`MAX_EXACT_CALLS`], where a bucket holds
//!   `ceil(n / 64)` calls and the window is exact to within one bucket.
//!
//! A bucket ring's epochs come from the caller's clock. The clock may jump
//! backwards: a jump shorter than the window records into the newest bucket
//! (the window is at worst as long as the jump too wide); a longer jump
//! forgets the history, since it no longer says anything about "now".

use std::ops::AddAssign;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::{Timestamp, duration_nanos};

/// Longest call window kept call by call; longer ones are bucketed.
pub const MAX_EXACT_CALLS: u32 = 1024;

/// Most buckets a [`BucketRing`] holds.
pub const MAX_BUCKETS: u32 = 60;

/// Buckets of a bucketed call window (longer than [`MAX_EXACT_CALLS`]).
const CALL_BUCKETS: u32 = 64;

/// Calls, failures and slow calls counted over some span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

impl Tally {
    /// The tally of one call.
    pub fn of(failed: bool, slow: bool) -> Self {
        Self {
            calls: 1,
            failures: u32::from(failed),
            slow: u32::from(slow),
        }
    }

    /// Failures per call, in `[0, 1]`; 0 without calls.
    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    /// Slow calls per call, in `[0, 1]`; 0 without calls.
    pub fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, other: Self) {
        self.calls = self.calls.saturating_add(other.calls);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

/// The outcomes of the last `size` calls, two bits each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRing {
    /// Calls the ring covers (1..=[`MAX_EXACT_CALLS`]).
    size: u32,
    /// Slot the next call goes to.
    next: u32,
    /// Calls recorded so far, up to `size`.
    len: u32,
    /// Bit `i` set: call in slot `i` failed.
    failed: Vec<u64>,
    /// Bit `i` set: call in slot `i` was slow.
    slow: Vec<u64>,
}

impl CallRing {
    /// An empty ring of `size` calls, clamped to `1..=MAX_EXACT_CALLS`.
    pub fn new(size: u32) -> Self {
        let size = size.clamp(1, MAX_EXACT_CALLS);
        let words = size.div_ceil(64) as usize;
        Self {
            size,
            next: 0,
            len: 0,
            failed: vec![0; words],
            slow: vec![0; words],
        }
    }

    /// Calls the ring covers when full.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Records one call, pushing out the oldest when full.
    pub fn push(&mut self, failed: bool, slow: bool) {
        let slot = self.next.min(self.size.saturating_sub(1));
        set_bit(&mut self.failed, slot, failed);
        set_bit(&mut self.slow, slot, slow);
        self.next = (slot + 1) % self.size.max(1);
        self.len = self.len.saturating_add(1).min(self.size);
    }

    /// The calls in the ring.
    pub fn tally(&self) -> Tally {
        let ones = |words: &[u64]| words.iter().map(|w| w.count_ones()).sum::<u32>();
        Tally {
            calls: self.len,
            failures: ones(&self.failed),
            slow: ones(&self.slow),
        }
    }
}

fn set_bit(words: &mut [u64], bit: u32, value: bool) {
    if let Some(word) = words.get_mut((bit / 64) as usize) {
        let mask = 1u64 << (bit % 64);
        if value {
            *word |= mask;
        } else {
            *word &= !mask;
        }
    }
}

/// A ring of aggregated buckets over an axis of epochs (seconds, call
/// counts...): bucket `e % len` holds epoch `e`, for the newest `len` epochs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRing<T> {
    /// Epoch of the newest bucket.
    head: u64,
    buckets: Vec<T>,
}

impl<T: Copy + Default + AddAssign> BucketRing<T> {
    /// An empty ring of `len` buckets (clamped to at least 1).
    pub fn new(len: u32) -> Self {
        Self {
            head: 0,
            buckets: vec![T::default(); len.max(1) as usize],
        }
    }

    /// Buckets in the ring.
    pub fn len(&self) -> u32 {
        u32::try_from(self.buckets.len()).unwrap_or(u32::MAX)
    }

    /// Whether the ring has no buckets (never, once built by [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Adds `value` to the bucket of `epoch`, first moving the ring forward
    /// to it (see the module docs for an epoch older than the head).
    pub fn add(&mut self, epoch: u64, value: T) {
        self.advance(epoch);
        let len = self.buckets.len().max(1) as u64;
        if let Some(bucket) = self.buckets.get_mut((self.head % len) as usize) {
            *bucket += value;
        }
    }

    /// The sum over the window ending at `epoch`: the buckets of epochs
    /// `epoch − len + 1 ..= epoch`. An epoch before the head (the clock went
    /// back) sums as if it were the head.
    pub fn sum(&self, epoch: u64) -> T {
        let len = self.buckets.len() as u64;
        let mut total = T::default();
        if len == 0 {
            return total;
        }
        let newest = self.head;
        let end = epoch.max(newest);
        let oldest = (end + 1).saturating_sub(len);
        if newest < oldest {
            return total;
        }
        // Every epoch in oldest..=newest is at most `len` apart: distinct slots.
        for e in oldest..=newest {
            if let Some(bucket) = self.buckets.get((e % len) as usize) {
                total += *bucket;
            }
        }
        total
    }

    /// Empties the ring.
    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = T::default());
    }

    fn advance(&mut self, epoch: u64) {
        let len = self.buckets.len() as u64;
        if len == 0 {
            return;
        }
        if epoch <= self.head {
            if self.head - epoch >= len {
                // A backwards jump longer than the window: start over at `epoch`.
                self.clear();
                self.head = epoch;
            }
            return;
        }
        let steps = epoch - self.head;
        if steps >= len {
            self.clear();
        } else {
            for e in self.head + 1..=epoch {
                if let Some(bucket) = self.buckets.get_mut((e % len) as usize) {
                    *bucket = T::default();
                }
            }
        }
        self.head = epoch;
    }
}

/// How a time window is cut into buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeBuckets {
    /// Length of one bucket, in nanoseconds (≥ 1 s).
    pub width_nanos: u64,
    /// Buckets covering the window (1..=[`MAX_BUCKETS`]).
    pub count: u32,
}

impl TimeBuckets {
    /// Buckets of one second, or `window / 60` rounded up to a whole second
    /// when the window is longer than a minute.
    pub fn for_window(window: Duration) -> Self {
        let second = 1_000_000_000u64;
        let window = duration_nanos(window).max(second);
        let per_bucket = window.div_ceil(u64::from(MAX_BUCKETS));
        let width_nanos = per_bucket.div_ceil(second).max(1).saturating_mul(second);
        let count = u32::try_from(window.div_ceil(width_nanos))
            .unwrap_or(MAX_BUCKETS)
            .clamp(1, MAX_BUCKETS);
        Self { width_nanos, count }
    }

    /// The epoch (bucket number since the Unix epoch) of `now`.
    pub fn epoch(&self, now: Timestamp) -> u64 {
        now.as_nanos() / self.width_nanos.max(1)
    }
}

/// A failure/slow-call window over calls or time, as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeWindow {
    /// The last `n ≤ MAX_EXACT_CALLS` calls, exactly.
    Calls(CallRing),
    /// The last `n > MAX_EXACT_CALLS` calls, in 64 buckets of `per_bucket`
    /// calls; `seen` counts every call ever recorded (the epoch axis).
    ManyCalls {
        per_bucket: u32,
        seen: u64,
        ring: BucketRing<Tally>,
    },
    /// The last `count × width` of time.
    Time {
        width_nanos: u64,
        ring: BucketRing<Tally>,
    },
}

impl OutcomeWindow {
    /// An empty window of the configured shape.
    pub fn new(window: crate::config::Window) -> Self {
        match window {
            crate::config::Window::Calls(n) if n.get() <= MAX_EXACT_CALLS => {
                Self::Calls(CallRing::new(n.get()))
            }
            crate::config::Window::Calls(n) => Self::ManyCalls {
                per_bucket: n.get().div_ceil(CALL_BUCKETS),
                seen: 0,
                ring: BucketRing::new(CALL_BUCKETS),
            },
            crate::config::Window::Time(d) => {
                let b = TimeBuckets::for_window(d);
                Self::Time {
                    width_nanos: b.width_nanos,
                    ring: BucketRing::new(b.count),
                }
            }
        }
    }

    /// Whether this window has the shape `window` asks for (a changed
    /// configuration starts a new window).
    pub fn fits(&self, window: crate::config::Window) -> bool {
        let fresh = Self::new(window);
        match (self, &fresh) {
            (Self::Calls(a), Self::Calls(b)) => a.size() == b.size(),
            (Self::ManyCalls { per_bucket: a, .. }, Self::ManyCalls { per_bucket: b, .. }) => {
                a == b
            }
            (
                Self::Time {
                    width_nanos: a,
                    ring: ra,
                },
                Self::Time {
                    width_nanos: b,
                    ring: rb,
                },
            ) => a == b && ra.len() == rb.len(),
            _ => false,
        }
    }

    /// Records one call that ended at `now`.
    pub fn record(&mut self, now: Timestamp, failed: bool, slow: bool) {
        match self {
            Self::Calls(ring) => ring.push(failed, slow),
            Self::ManyCalls {
                per_bucket,
                seen,
                ring,
            } => {
                ring.add(
                    *seen / u64::from((*per_bucket).max(1)),
                    Tally::of(failed, slow),
                );
                *seen = seen.saturating_add(1);
            }
            Self::Time { width_nanos, ring } => {
                ring.add(
                    now.as_nanos() / (*width_nanos).max(1),
                    Tally::of(failed, slow),
                );
            }
        }
    }

    /// The calls in the window as of `now`.
    pub fn tally(&self, now: Timestamp) -> Tally {
        match self {
            Self::Calls(ring) => ring.tally(),
            Self::ManyCalls {
                per_bucket,
                seen,
                ring,
            } => ring.sum(seen.saturating_sub(1) / u64::from((*per_bucket).max(1))),
            Self::Time { width_nanos, ring } => ring.sum(now.as_nanos() / (*width_nanos).max(1)),
        }
    }

    /// Forgets every call.
    pub fn clear(&mut self) {
        match self {
            Self::Calls(ring) => *ring = CallRing::new(ring.size()),
            Self::ManyCalls { seen, ring, .. } => {
                *seen = 0;
                *ring = BucketRing::new(ring.len());
            }
            Self::Time { ring, .. } => ring.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Window;
    use std::num::NonZeroU32;

    #[test]
    fn call_ring_counts_exactly_the_last_n_calls() {
        let mut ring = CallRing::new(100);
        for i in 0..250u32 {
            ring.push(i % 5 == 0, i % 2 == 0);
        }
        let t = ring.tally();
        // Calls 150..250: multiples of 5 → 20, even → 50.
        assert_eq!(
            t,
            Tally {
                calls: 100,
                failures: 20,
                slow: 50
            }
        );
        assert!((t.failure_rate() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn call_ring_of_one() {
        let mut ring = CallRing::new(1);
        ring.push(true, false);
        assert_eq!(ring.tally().failures, 1);
        ring.push(false, true);
        assert_eq!(
            ring.tally(),
            Tally {
                calls: 1,
                failures: 0,
                slow: 1
            }
        );
    }

    #[test]
    fn time_buckets_are_seconds_up_to_a_minute_then_sixtieths() {
        let b = TimeBuckets::for_window(Duration::from_secs(60));
        assert_eq!((b.width_nanos, b.count), (1_000_000_000, 60));
        let b = TimeBuckets::for_window(Duration::from_secs(10));
        assert_eq!((b.width_nanos, b.count), (1_000_000_000, 10));
        let b = TimeBuckets::for_window(Duration::from_secs(300));
        assert_eq!((b.width_nanos, b.count), (5_000_000_000, 60));
        let b = TimeBuckets::for_window(Duration::from_secs(90));
        assert_eq!((b.width_nanos, b.count), (2_000_000_000, 45));
        let b = TimeBuckets::for_window(Duration::from_secs(86_400 * 365));
        assert!(b.count <= MAX_BUCKETS);
        let b = TimeBuckets::for_window(Duration::from_millis(1));
        assert_eq!((b.width_nanos, b.count), (1_000_000_000, 1));
    }

    #[test]
    fn bucket_ring_forgets_epochs_older_than_the_window() {
        let mut ring: BucketRing<Tally> = BucketRing::new(10);
        for e in 100..120u64 {
            ring.add(e, Tally::of(e < 110, false));
        }
        // Epochs 110..=119 remain, all successes.
        assert_eq!(
            ring.sum(119),
            Tally {
                calls: 10,
                failures: 0,
                slow: 0
            }
        );
        // Five epochs later only 115..=119 are inside.
        assert_eq!(ring.sum(124).calls, 5);
        assert_eq!(ring.sum(129).calls, 0);
        // A big leap clears everything.
        ring.add(1_000, Tally::of(true, false));
        assert_eq!(
            ring.sum(1_000),
            Tally {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
    }

    #[test]
    fn bucket_ring_survives_the_clock_going_back() {
        let mut ring: BucketRing<Tally> = BucketRing::new(10);
        ring.add(50, Tally::of(true, false));
        // A short jump back lands in the head bucket.
        ring.add(45, Tally::of(true, false));
        assert_eq!(ring.sum(45).failures, 2);
        // A jump back past the window starts over.
        ring.add(10, Tally::of(false, false));
        assert_eq!(
            ring.sum(10),
            Tally {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        ring.add(11, Tally::of(false, false));
        assert_eq!(ring.sum(11).calls, 2);
    }

    #[test]
    fn long_call_windows_are_bucketed_within_one_bucket() {
        let n = NonZeroU32::new(6400).unwrap();
        let mut w = OutcomeWindow::new(Window::Calls(n));
        assert!(matches!(
            w,
            OutcomeWindow::ManyCalls {
                per_bucket: 100,
                ..
            }
        ));
        for i in 0..20_000u32 {
            w.record(Timestamp::ZERO, i >= 10_000, false);
        }
        let t = w.tally(Timestamp::ZERO);
        assert!(t.calls > 6400 - 100 && t.calls <= 6400, "{t:?}");
        assert_eq!(t.failures, t.calls);
        assert!(w.fits(Window::Calls(n)));
        assert!(!w.fits(Window::Calls(NonZeroU32::new(100).unwrap())));
    }
}
