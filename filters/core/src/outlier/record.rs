//! One endpoint's shared record: its recent numbers and its health.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::detect::Reason;
use super::estimate::{Estimate, aged};
use super::tally::Tally;
use crate::config::OutlierConfig;
use crate::time::Timestamp;

/// Smoothing of the mean gap between successes, per flush that saw some.
const GAP_SMOOTHING: f64 = 0.2;

/// Whether an endpoint is in rotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Health {
    /// In rotation.
    #[default]
    Healthy,
    /// Out of rotation until `until`, then probed.
    Ejected { until: Timestamp, reason: Reason },
    /// Its ejection ended: it gets probe requests only, and returns after
    /// `left` more successes (a failure ejects it again).
    Probing { left: u32 },
}

/// One endpoint as every worker sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// `ip:port`, as Envoy reports `upstream.address` and `override_host`
    /// reads it.
    pub addr: String,
    /// The policy's zone holding it (published zone health).
    pub zone: String,
    /// When the decaying numbers below were last aged.
    pub at: Timestamp,
    /// Judged attempts and failures, decayed over `interval`.
    pub attempts: f64,
    pub failures: f64,
    /// Failed attempts since the last success.
    pub consecutive: u32,
    /// Time to first token and per output token (ms), decayed over
    /// `latency_window`.
    pub ttft: Estimate,
    pub tpot: Estimate,
    /// Latency samples in a row that were outliers against the peers.
    pub slow_ttft_run: u32,
    pub slow_tpot_run: u32,
    /// The latest success anywhere, and the smoothed gap between successes.
    pub last_success: Option<Timestamp>,
    pub gap_ms: f64,
    pub gaps: u32,
    /// Attempts sent since the latest answer (a success or a 429).
    pub unanswered: u32,
    /// Attempts sent and not yet ended, over all workers.
    pub outstanding: u32,
    /// When it last went from no attempt out to some (the flush that saw
    /// it): its idle time before is no silence.
    #[serde(default)]
    pub busy_since: Timestamp,
    /// No new request before this (a 429's reset time).
    pub throttled_until: Timestamp,
    pub health: Health,
    /// Recent ejections: the multiplier of the next ejection's length.
    pub ejections: u32,
    /// When it last came back (ejections fade by one per healthy
    /// `interval`, as Envoy's multiplier does).
    pub returned_at: Timestamp,
}

impl EndpointRecord {
    pub fn new(addr: &str, zone: &str) -> Self {
        EndpointRecord {
            addr: addr.to_owned(),
            zone: zone.to_owned(),
            at: Timestamp::ZERO,
            attempts: 0.0,
            failures: 0.0,
            consecutive: 0,
            ttft: Estimate::default(),
            tpot: Estimate::default(),
            slow_ttft_run: 0,
            slow_tpot_run: 0,
            last_success: None,
            gap_ms: 0.0,
            gaps: 0,
            unanswered: 0,
            outstanding: 0,
            busy_since: Timestamp::ZERO,
            throttled_until: Timestamp::ZERO,
            health: Health::Healthy,
            ejections: 0,
            returned_at: Timestamp::ZERO,
        }
    }

    /// Ages the decaying numbers to `now`.
    pub fn age(&mut self, now: Timestamp, cfg: &OutlierConfig) {
        if self.at == Timestamp::ZERO {
            self.at = now;
            return;
        }
        let keep = aged(self.at, now, cfg.interval);
        self.attempts *= keep;
        self.failures *= keep;
        let keep = aged(self.at, now, cfg.latency_window);
        self.ttft.decay(keep);
        self.tpot.decay(keep);
        self.at = self.at.max(now);
    }

    /// Folds one worker's tally in (already aged to `now`).
    pub fn absorb(&mut self, t: &Tally) {
        self.attempts += f64::from(t.judged);
        self.failures += f64::from(t.failures);
        self.consecutive = if t.successes > 0 {
            t.trailing_failures
        } else {
            self.consecutive.saturating_add(t.failures)
        };
        self.unanswered = if t.successes > 0 || t.throttled > 0 {
            t.started_since_answer
        } else {
            self.unanswered.saturating_add(t.started)
        };
        if self.outstanding == 0 && t.started > 0 {
            // Idle until now: the quiet before is not silence (phi
            // accrual measures from here, not from the last success).
            self.busy_since = self.at;
        }
        self.outstanding = self
            .outstanding
            .saturating_add(t.started)
            .saturating_sub(t.ended);
        self.ttft.add(t.ttft_ms, f64::from(t.ttft_samples));
        self.tpot.add(t.tpot_ms, f64::from(t.tpot_samples));
        self.slow_ttft_run = t.ttft_run.continue_from(self.slow_ttft_run);
        self.slow_tpot_run = t.tpot_run.continue_from(self.slow_tpot_run);
        if let Some(last) = t.last_success {
            if let Some(prev) = self.last_success
                && last > prev
            {
                let gap = last.since(prev).as_secs_f64() * 1000.0 / f64::from(t.successes.max(1));
                self.gap_ms = if self.gaps == 0 {
                    gap
                } else {
                    self.gap_ms + GAP_SMOOTHING * (gap - self.gap_ms)
                };
                self.gaps = self.gaps.saturating_add(t.successes);
            }
            self.last_success = Some(self.last_success.map_or(last, |p| p.max(last)));
        }
        if let Some(until) = t.throttled_until {
            self.throttled_until = self.throttled_until.max(until);
        }
    }

    /// Whether new requests may go to it as usual.
    pub fn in_rotation(&self, now: Timestamp) -> bool {
        self.health == Health::Healthy && now >= self.throttled_until
    }

    /// Takes it out of rotation at `now` for a time that grows with its
    /// recent ejections: `base × k`, capped at `max`, spread by ± `jitter`
    /// (`rand` uniform in [0, 1)). Returns the length.
    pub fn eject(
        &mut self,
        reason: Reason,
        now: Timestamp,
        cfg: &OutlierConfig,
        rand: f64,
    ) -> Duration {
        let healthy_intervals = if self.returned_at == Timestamp::ZERO {
            0
        } else {
            let i = now.since(self.returned_at).as_secs_f64() / cfg.interval.as_secs_f64();
            i.max(0.0).min(f64::from(u32::MAX)) as u32
        };
        let k = self
            .ejections
            .saturating_sub(healthy_intervals)
            .saturating_add(1);
        self.ejections = k;
        let length = cfg
            .base_ejection_time
            .saturating_mul(k)
            .min(cfg.max_ejection_time);
        let spread = cfg.jitter.get() * (2.0 * rand.clamp(0.0, 1.0) - 1.0);
        let length = length.mul_f64((1.0 + spread).max(0.0));
        self.health = Health::Ejected {
            until: now + length,
            reason,
        };
        self.consecutive = 0;
        self.unanswered = 0;
        self.slow_ttft_run = 0;
        self.slow_tpot_run = 0;
        length
    }

    /// Puts it back in rotation at `now`.
    pub fn restore(&mut self, now: Timestamp) {
        self.health = Health::Healthy;
        self.returned_at = now;
        // Judge it afresh: its old numbers describe the sick endpoint.
        self.attempts = 0.0;
        self.failures = 0.0;
        self.consecutive = 0;
        self.ttft = Estimate::default();
        self.tpot = Estimate::default();
        self.slow_ttft_run = 0;
        self.slow_tpot_run = 0;
    }
}
