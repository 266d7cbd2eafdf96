//! Decaying estimates: counts and means that forget at a fixed rate.
//!
//! Why not windows of buckets or an HDR histogram: an endpoint's record
//! lives in shared data and is rewritten by every worker's flush, so it must
//! be small and cheap to merge, and the detectors need means and counts,
//! not quantiles. An exponentially decaying sum (`s ← s·e^(−Δt/τ) + x`)
//! and its decaying weight give both: `s / w` is the recent mean, `w` is
//! how many samples it rests on, and two workers' contributions merge by
//! adding. Old samples fade smoothly rather than falling off a window's
//! edge all at once, which would flip a verdict on a bucket boundary.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// `e^(−Δt/τ)`: the share of a sample `Δt` old that still counts.
pub fn retention(elapsed: Duration, tau: Duration) -> f64 {
    if tau.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / tau.as_secs_f64()).exp()
}

/// A decaying mean: a sum and a weight, both decayed together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Decayed sum of the samples (milliseconds).
    pub sum: f64,
    /// Decayed number of samples.
    pub weight: f64,
}

impl Estimate {
    /// Ages the estimate by `keep` ([`retention`]).
    pub fn decay(&mut self, keep: f64) {
        self.sum *= keep;
        self.weight *= keep;
    }

    /// Adds samples: their sum and count.
    pub fn add(&mut self, sum: f64, count: f64) {
        if sum.is_finite() && count.is_finite() && sum >= 0.0 && count > 0.0 {
            self.sum += sum;
            self.weight += count;
        }
    }

    /// The recent mean, `None` without samples.
    pub fn mean(&self) -> Option<f64> {
        (self.weight > 1e-9).then(|| self.sum / self.weight)
    }
}

/// The share of what was recorded at `then` that still counts at `now`.
pub fn aged(then: Timestamp, now: Timestamp, tau: Duration) -> f64 {
    retention(now.since(then), tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mean_follows_new_samples_at_the_time_constant() {
        let mut e = Estimate::default();
        e.add(50.0 * 20.0, 20.0);
        assert_eq!(e.mean(), Some(50.0));
        // One time constant later the old samples weigh e^-1 of their count.
        e.decay(retention(Duration::from_secs(2), Duration::from_secs(2)));
        e.add(250.0 * 20.0, 20.0);
        let mean = e.mean().unwrap();
        let expected = (50.0 * 20.0 * (-1f64).exp() + 250.0 * 20.0) / (20.0 * (-1f64).exp() + 20.0);
        assert!((mean - expected).abs() < 1e-9, "{mean} vs {expected}");
    }

    #[test]
    fn nonsense_samples_are_ignored() {
        let mut e = Estimate::default();
        e.add(f64::NAN, 1.0);
        e.add(1.0, 0.0);
        e.add(-5.0, 1.0);
        e.add(f64::INFINITY, 1.0);
        assert_eq!(e.mean(), None);
        assert_eq!(retention(Duration::from_secs(1), Duration::ZERO), 0.0);
    }
}
