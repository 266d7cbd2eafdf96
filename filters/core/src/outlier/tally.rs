//! What one worker saw of one endpoint since its last flush.
//!
//! Recording an attempt touches only this worker's memory: no shared-data
//! call on the request path. The worker's tick folds its tallies into the
//! shared records ([`super::BackendState::flush`]), one compare-and-swap per
//! backend per tick.

use std::time::Duration;

use crate::outcome::ResponseFlags;
use crate::time::Timestamp;

/// How one attempt on an endpoint ended, as the outlier detector judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answered, and not with a server error: 2xx, 3xx, 4xx but 429.
    Success,
    /// A server error, a reset, a refused connection, a timeout, or no
    /// answer at all (abandoned when no first token came in time).
    Failure,
    /// A 429: the endpoint is alive but full. Neither a success nor a
    /// failure; it benches the endpoint until its reset time instead.
    Throttled,
    /// The client left before anything showed the endpoint's fault: says
    /// nothing about it. (In Envoy 1.40 the per-attempt instance reads the
    /// request's `DC` flag when the client's leaving ends the attempt; the
    /// flags are otherwise 0 there, so an attempt the router abandoned
    /// reads as no answer: a failure.)
    Unjudged,
}

impl Verdict {
    /// Judges an attempt by its status and Envoy's flags.
    pub fn of(status: Option<u16>, flags: ResponseFlags) -> Verdict {
        let upstream_trouble = flags.connect_failure || flags.reset || flags.timeout;
        match status {
            _ if upstream_trouble => Verdict::Failure,
            Some(429) => Verdict::Throttled,
            Some(s) if s >= 500 => Verdict::Failure,
            Some(_) => Verdict::Success,
            None if flags.downstream_disconnect => Verdict::Unjudged,
            None => Verdict::Failure,
        }
    }
}

/// One worker's record of one endpoint between two flushes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    /// Attempts started (their request left for the endpoint).
    pub started: u32,
    /// Attempts started after this tally's last answer (a success or a 429).
    pub started_since_answer: u32,
    /// Attempts judged, successes and failures.
    pub judged: u32,
    pub failures: u32,
    pub successes: u32,
    /// 429s: answers, though neither successes nor failures.
    pub throttled: u32,
    /// Failures after the last success of this tally (all of them when
    /// there was none).
    pub trailing_failures: u32,
    /// Attempts ended, judged or not (for the outstanding count).
    pub ended: u32,
    /// Sum and count of times to first token, in ms.
    pub ttft_ms: f64,
    pub ttft_samples: u32,
    /// Sum and count of per-output-token times, in ms per token.
    pub tpot_ms: f64,
    pub tpot_samples: u32,
    /// Latency samples judged against the peers' median: slow ones, and
    /// the slow ones after this tally's last fast one.
    pub ttft_run: Run,
    pub tpot_run: Run,
    /// Latest success.
    pub last_success: Option<Timestamp>,
    /// The latest 429's reset time, if one came.
    pub throttled_until: Option<Timestamp>,
}

impl Tally {
    /// An attempt left for the endpoint.
    pub fn start(&mut self) {
        self.started = self.started.saturating_add(1);
        self.started_since_answer = self.started_since_answer.saturating_add(1);
    }

    /// An attempt ended at `now`; `ttft` is the time to its first byte.
    /// `ttft_slow` is the sample judged against the peers' median
    /// ([`is_slow`]), `None` when it could not be.
    pub fn end(
        &mut self,
        verdict: Verdict,
        ttft: Option<Duration>,
        ttft_slow: Option<bool>,
        now: Timestamp,
    ) {
        self.ended = self.ended.saturating_add(1);
        match verdict {
            Verdict::Success => {
                self.judged += 1;
                self.successes += 1;
                self.trailing_failures = 0;
                self.started_since_answer = 0;
                self.last_success = Some(self.last_success.map_or(now, |t| t.max(now)));
                if let Some(t) = ttft {
                    self.ttft_ms += t.as_secs_f64() * 1000.0;
                    self.ttft_samples += 1;
                    self.ttft_run.push(ttft_slow);
                }
            }
            Verdict::Failure => {
                self.judged += 1;
                self.failures += 1;
                self.trailing_failures += 1;
            }
            Verdict::Throttled => {
                // The endpoint is up and says when to come back: what it
                // asks for is quiet, not the silence phi accrual looks for.
                self.throttled += 1;
                self.started_since_answer = 0;
            }
            Verdict::Unjudged => {}
        }
    }

    /// A stream's mean time per output token.
    pub fn per_token(&mut self, tpot: Duration, slow: Option<bool>) {
        self.tpot_ms += tpot.as_secs_f64() * 1000.0;
        self.tpot_samples += 1;
        self.tpot_run.push(slow);
    }

    /// A 429 asked for no requests until `until`.
    pub fn throttle(&mut self, until: Timestamp) {
        self.throttled_until = Some(self.throttled_until.map_or(until, |t| t.max(until)));
    }

    /// Whether there is anything to flush.
    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// Latency samples judged slow or fast against the peers, as a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub slow: u32,
    /// Slow samples after the last fast one.
    pub trailing: u32,
    pub saw_fast: bool,
}

impl Run {
    pub fn push(&mut self, slow: Option<bool>) {
        match slow {
            Some(true) => {
                self.slow += 1;
                self.trailing += 1;
            }
            Some(false) => {
                self.trailing = 0;
                self.saw_fast = true;
            }
            None => {}
        }
    }

    /// The shared run after this one: continued, or restarted after a
    /// fast sample.
    pub fn continue_from(&self, run: u32) -> u32 {
        if self.saw_fast {
            self.trailing
        } else {
            run.saturating_add(self.slow)
        }
    }
}

/// Whether a latency sample (ms) is an outlier against its peers'
/// current estimates: above `factor` × their median and above `floor`.
/// `None` (not judged) when fewer than `min_hosts − 1` peers have an
/// estimate or the detector is off (`factor` 0).
pub fn is_slow(
    sample_ms: f64,
    peers: &mut [f64],
    factor: f64,
    floor_ms: f64,
    min_hosts: u32,
) -> Option<bool> {
    if factor <= 0.0 || peers.is_empty() || peers.len() + 1 < min_hosts as usize {
        return None;
    }
    peers.sort_by(f64::total_cmp);
    let mid = peers.len() / 2;
    let median = if peers.len().is_multiple_of(2) {
        (peers[mid - 1] + peers[mid]) / 2.0
    } else {
        peers[mid]
    };
    Some(sample_ms > floor_ms && sample_ms > factor * median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let none = ResponseFlags::default();
        assert_eq!(Verdict::of(Some(200), none), Verdict::Success);
        assert_eq!(Verdict::of(Some(404), none), Verdict::Success);
        assert_eq!(Verdict::of(Some(429), none), Verdict::Throttled);
        assert_eq!(Verdict::of(Some(503), none), Verdict::Failure);
        assert_eq!(Verdict::of(None, none), Verdict::Failure);
        let reset = ResponseFlags {
            reset: true,
            ..none
        };
        assert_eq!(Verdict::of(Some(200), reset), Verdict::Failure);
        let left = ResponseFlags {
            downstream_disconnect: true,
            ..none
        };
        assert_eq!(Verdict::of(None, left), Verdict::Unjudged);
        assert_eq!(Verdict::of(Some(200), left), Verdict::Success);
    }

    #[test]
    fn a_success_ends_the_streak() {
        let mut t = Tally::default();
        let now = Timestamp::from_millis(1);
        t.start();
        t.end(Verdict::Failure, None, None, now);
        t.start();
        t.end(
            Verdict::Success,
            Some(Duration::from_millis(40)),
            Some(true),
            now,
        );
        t.start();
        t.end(Verdict::Failure, None, None, now);
        assert_eq!((t.judged, t.failures, t.trailing_failures), (3, 2, 1));
        assert_eq!(t.started_since_answer, 1);
        t.start();
        t.end(Verdict::Throttled, None, None, now);
        assert_eq!((t.started_since_answer, t.throttled, t.judged), (0, 1, 3));
        assert_eq!((t.ttft_ms, t.ttft_samples), (40.0, 1));
        assert_eq!(t.ttft_run.continue_from(7), 8);
    }

    #[test]
    fn slowness_is_judged_against_the_peers_median() {
        let slow = |ms, peers: &[f64]| is_slow(ms, &mut peers.to_vec(), 3.0, 200.0, 3);
        assert_eq!(slow(150.0, &[40.0, 40.0, 45.0]), Some(false)); // under the floor
        assert_eq!(slow(900.0, &[50.0, 50.0, 600.0]), Some(true));
        assert_eq!(slow(900.0, &[300.0, 400.0]), Some(false));
        assert_eq!(slow(900.0, &[50.0]), None); // too few peers
        assert_eq!(is_slow(900.0, &mut [50.0, 50.0], 0.0, 0.0, 2), None); // off
    }
}
