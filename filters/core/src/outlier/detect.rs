//! The detectors: which endpoints look sick, and why.
//!
//! Each is a pure function of the endpoints' records at one instant, judged
//! over the endpoints currently in rotation (an ejected endpoint's numbers
//! are stale and would skew its peers'). Each is off when its threshold is
//! zero.

use serde::{Deserialize, Serialize};

use super::record::EndpointRecord;
use crate::config::OutlierConfig;
use crate::time::Timestamp;

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// `consecutive_errors` failed attempts in a row.
    ConsecutiveErrors,
    /// Its failure share reached `failure_rate`.
    FailureRate,
    /// Its success rate fell below its peers' mean − k·σ.
    SuccessRate,
    /// Its time to first token is an outlier against its peers'.
    SlowFirstToken,
    /// Its time per output token is an outlier against its peers'.
    SlowTokens,
    /// Phi accrual: its successes stopped while attempts kept going to it.
    Silent,
    /// A probe after an ejection failed.
    FailedProbe,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveErrors => "consecutive-errors",
            Reason::FailureRate => "failure-rate",
            Reason::SuccessRate => "success-rate",
            Reason::SlowFirstToken => "slow-first-token",
            Reason::SlowTokens => "slow-tokens",
            Reason::Silent => "silent",
            Reason::FailedProbe => "failed-probe",
        }
    }
}

/// Attempts sent since the last success before phi accrual may judge an
/// endpoint: one slow answer is no silence.
const PHI_MIN_UNANSWERED: u32 = 3;

/// Shortest mean gap between successes phi accrual assumes, in ms. Workers
/// fold their successes into the shared record on a tick (50 ms), so on a
/// busy endpoint (a success every millisecond) the record's "last success"
/// is always tens of milliseconds old: judged against the true gap, every
/// busy endpoint would look silent between two flushes. With this floor φ
/// passes 8 only after about 1.8 s without a success.
pub const PHI_MIN_GAP_MS: f64 = 100.0;

/// `log10(e)`: φ of an exponential inter-arrival model is `Δt / mean · log10 e`
/// (Cassandra's approximation of Hayashibara et al.'s detector).
const LOG10_E: f64 = std::f64::consts::LOG10_E;

/// The endpoints (indexes into `records`, among `in_rotation`) that a
/// detector flags, each with its first reason, worst first within a
/// detector, detectors in the order of their cost to clients (hard
/// failures first).
pub fn suspects(
    records: &[EndpointRecord],
    in_rotation: &[usize],
    cfg: &OutlierConfig,
    now: Timestamp,
) -> Vec<(usize, Reason)> {
    let mut out: Vec<(usize, Reason)> = Vec::new();
    let mut flag = |i: usize, r: Reason| {
        if !out.iter().any(|(j, _)| *j == i) {
            out.push((i, r));
        }
    };
    let min_requests = f64::from(cfg.min_requests.max(1));
    for &i in in_rotation {
        let r = &records[i];
        if cfg.consecutive_errors > 0 && r.consecutive >= cfg.consecutive_errors {
            flag(i, Reason::ConsecutiveErrors);
        }
    }
    for &i in in_rotation {
        let r = &records[i];
        // Silent, not idle: attempts are out now, and several went
        // unanswered since the last answer.
        if cfg.phi_threshold > 0.0
            && r.outstanding > 0
            && r.unanswered >= PHI_MIN_UNANSWERED
            && r.attempts >= min_requests
            && phi(r, now).is_some_and(|p| p > cfg.phi_threshold)
        {
            flag(i, Reason::Silent);
        }
    }
    if cfg.failure_rate.get() > 0.0 {
        for &i in in_rotation {
            let r = &records[i];
            if r.attempts >= min_requests && r.failures / r.attempts >= cfg.failure_rate.get() {
                flag(i, Reason::FailureRate);
            }
        }
    }
    if cfg.success_rate_stdev > 0.0 {
        let judged: Vec<(usize, f64)> = in_rotation
            .iter()
            .map(|&i| (i, &records[i]))
            .filter(|(_, r)| r.attempts >= min_requests)
            .map(|(i, r)| (i, 1.0 - r.failures / r.attempts))
            .collect();
        if judged.len() >= cfg.min_hosts as usize {
            let n = judged.len() as f64;
            let mean = judged.iter().map(|(_, s)| s).sum::<f64>() / n;
            let var = judged.iter().map(|(_, s)| (s - mean).powi(2)).sum::<f64>() / n;
            let threshold = mean - cfg.success_rate_stdev * var.sqrt();
            let mut low: Vec<&(usize, f64)> =
                judged.iter().filter(|(_, s)| *s < threshold).collect();
            low.sort_by(|a, b| a.1.total_cmp(&b.1));
            for (i, _) in low {
                flag(*i, Reason::SuccessRate);
            }
        }
    }
    if cfg.latency_factor > 0.0 {
        let mut slow: Vec<(usize, u32, Reason)> = Vec::new();
        for &i in in_rotation {
            let r = &records[i];
            if r.slow_ttft_run >= cfg.min_samples {
                slow.push((i, r.slow_ttft_run, Reason::SlowFirstToken));
            }
            if r.slow_tpot_run >= cfg.min_samples {
                slow.push((i, r.slow_tpot_run, Reason::SlowTokens));
            }
        }
        slow.sort_by_key(|s| std::cmp::Reverse(s.1));
        for (i, _, reason) in slow {
            flag(i, reason);
        }
    }
    out
}

/// φ of an endpoint at `now`: how unlikely its silence since the last
/// success is, given its mean gap between successes. `None` before enough
/// gaps were seen.
pub fn phi(r: &EndpointRecord, now: Timestamp) -> Option<f64> {
    let last = r.last_success?;
    if r.gaps < 2 || r.gap_ms <= 0.0 {
        return None;
    }
    let silence = now.since(last.max(r.busy_since)).as_secs_f64() * 1000.0;
    Some(silence / r.gap_ms.max(PHI_MIN_GAP_MS) * LOG10_E)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outlier::tests::config;

    fn rec(attempts: f64, failures: f64) -> EndpointRecord {
        EndpointRecord {
            attempts,
            failures,
            ..EndpointRecord::new("x", "z")
        }
    }

    #[test]
    fn success_rate_uses_mean_minus_k_sigma() {
        let cfg = config();
        let mut records: Vec<EndpointRecord> = (0..5).map(|_| rec(100.0, 1.0)).collect();
        records[4].failures = 40.0;
        let all: Vec<usize> = (0..5).collect();
        let s = suspects(&records, &all, &cfg, Timestamp::ZERO);
        assert_eq!(s, vec![(4, Reason::SuccessRate)]);
        // Too few endpoints with enough requests: no peer verdict.
        for r in &mut records[..3] {
            r.attempts = 1.0;
            r.failures = 0.0;
        }
        assert!(suspects(&records, &all, &cfg, Timestamp::ZERO).is_empty());
    }

    #[test]
    fn a_run_of_slow_samples_is_a_latency_outlier() {
        // Each sample was judged against the peers' median when it was
        // taken (`tally::is_slow`); the detector wants `min_samples` in a row.
        let cfg = config();
        let mut records: Vec<EndpointRecord> = (0..4).map(|_| rec(0.0, 0.0)).collect();
        records[2].slow_ttft_run = cfg.min_samples - 1;
        records[3].slow_tpot_run = cfg.min_samples + 2;
        let all: Vec<usize> = (0..4).collect();
        assert_eq!(
            suspects(&records, &all, &cfg, Timestamp::ZERO),
            vec![(3, Reason::SlowTokens)]
        );
        records[2].slow_ttft_run = cfg.min_samples;
        assert_eq!(
            suspects(&records, &all, &cfg, Timestamp::ZERO),
            vec![(3, Reason::SlowTokens), (2, Reason::SlowFirstToken)]
        );
        let off = OutlierConfig {
            latency_factor: 0.0,
            ..config()
        };
        assert!(suspects(&records, &all, &off, Timestamp::ZERO).is_empty());
    }

    #[test]
    fn phi_grows_with_silence() {
        let mut r = rec(50.0, 0.0);
        r.last_success = Some(Timestamp::from_millis(1000));
        r.gap_ms = 50.0;
        r.gaps = 20;
        r.unanswered = 10;
        r.outstanding = 3;
        let cfg = config();
        let at = |ms: u64| Timestamp::from_millis(1000 + ms);
        assert!(phi(&r, at(50)).unwrap() < 1.0);
        assert!(phi(&r, at(2000)).unwrap() > 8.0);
        let all = [0];
        assert!(suspects(std::slice::from_ref(&r), &all, &cfg, at(100)).is_empty());
        assert_eq!(
            suspects(std::slice::from_ref(&r), &all, &cfg, at(2000)),
            vec![(0, Reason::Silent)]
        );
        // Idle since the last success, then busy again at 1,950 ms: the
        // silence counts from there, not from the last success.
        r.busy_since = at(1950);
        assert!(suspects(std::slice::from_ref(&r), &all, &cfg, at(2000)).is_empty());
        r.busy_since = Timestamp::ZERO;
        // Nothing sent since the last success: quiet, not silent.
        r.unanswered = 0;
        assert!(suspects(std::slice::from_ref(&r), &all, &cfg, at(60_000)).is_empty());
        // Attempts went unanswered but none is out any more (the clients
        // left, the load stopped): idle, not silent.
        r.unanswered = 10;
        r.outstanding = 0;
        assert!(suspects(std::slice::from_ref(&r), &all, &cfg, at(60_000)).is_empty());
    }

    #[test]
    fn a_busy_endpoint_is_not_silent_between_two_flushes() {
        // A success every millisecond, folded in every 50 ms: the record's
        // last success is routinely 50–100 ms old.
        let mut r = rec(5000.0, 0.0);
        r.last_success = Some(Timestamp::from_millis(1000));
        r.gap_ms = 1.0;
        r.gaps = 5000;
        r.unanswered = 40;
        r.outstanding = 40;
        let cfg = config();
        let all = [0];
        assert!(
            suspects(
                std::slice::from_ref(&r),
                &all,
                &cfg,
                Timestamp::from_millis(1100)
            )
            .is_empty()
        );
        // Two seconds without a success while 40 attempts are out is silence.
        assert_eq!(
            suspects(
                std::slice::from_ref(&r),
                &all,
                &cfg,
                Timestamp::from_millis(3000)
            ),
            vec![(0, Reason::Silent)]
        );
    }
}
