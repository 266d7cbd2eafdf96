//! Faults: the ways a simulated server misbehaves, and the per-request draw.
//!
//! Each fault models a failure sluice must handle: a fraction of 5xx answers
//! (outlier detection, retry budgets), a server that answers everything with
//! one status (circuit breaking), added latency and slow decoding (latency-based
//! ejection, degradation), streams cut mid-way (retries must not double-count
//! tokens), refused connections and a dead-then-revived endpoint (zone
//! failover, recovery), a blackhole that reads requests and never answers
//! (timeouts as the only signal, while health checks still pass), and
//! rate-limit hints on error answers (`retry-after` and the provider's reset
//! header, for retry back-off that honours the upstream), bare errors with
//! no hint at all (a 429 that names no end), and a provider quota whose
//! rate-limit headers fall toward zero before it refuses (zone failover that
//! moves before the first refusal; [`crate::quota`]).
//!
//! The fault set is replaced as a whole (flags at start-up, `POST /_sim/faults`
//! at run time), and each replacement reseeds the PRNG with `--seed`: what
//! happens after a given POST depends only on the seed and the order of the
//! requests that follow, so a scenario replays identically. Every request
//! draws the same number of random values whether or not a fault uses them,
//! which keeps the sequence stable when one rate changes. A request held by
//! the blackhole draws nothing while held; if the blackhole is cleared while
//! its client is still there, it draws when released, after the reseed, like
//! any request that follows the POST. A replacement also starts the quota's
//! first window afresh (as used as the new set says).

use std::num::{NonZeroU32, NonZeroU64};
use std::time::{Duration, Instant};

use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::quota::{Quota, QuotaLimits};

/// A fault set that does not make sense.
#[derive(Debug, Error, PartialEq)]
pub enum FaultError {
    /// A probability outside [0, 1].
    #[error("{field} must be a probability in [0, 1], got {value}")]
    NotAProbability {
        /// The JSON field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A status that is not an error status.
    #[error("{field} must be an HTTP error status in 400..=599, got {value}")]
    NotAnErrorStatus {
        /// The JSON field.
        field: &'static str,
        /// The value given.
        value: u16,
    },
    /// A rate that is not a positive finite number.
    #[error("{field} must be a finite number > 0, got {value}")]
    NotPositive {
        /// The JSON field.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A number above its ceiling.
    #[error("{field} must be at most {max}, got {value}")]
    TooLarge {
        /// The JSON field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The largest accepted value.
        max: u64,
    },
}

/// Largest `quota_window_s`, in seconds: one day, the longest window
/// providers use.
pub const MAX_QUOTA_WINDOW_S: u32 = 86_400;

/// `quota_window_s` when the fault set does not name it: providers count per minute.
pub const DEFAULT_QUOTA_WINDOW_S: NonZeroU32 = NonZeroU32::MIN.saturating_add(59);

/// Largest `retry_after_s`, in seconds: one day. A longer hint is more
/// likely a unit mistake (milliseconds given as seconds) than a drill.
pub const MAX_RETRY_AFTER_S: u32 = 86_400;

/// The active faults; the JSON body of `/_sim/faults`. A missing field means
/// "no such fault", so `{}` clears everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability in [0, 1] that a request is answered with `error_status`.
    pub error_rate: f64,
    /// Status of `error_rate` answers (400..=599; default 503).
    pub error_status: u16,
    /// When set, every inference request is answered with this status.
    pub fixed_status: Option<u16>,
    /// Milliseconds added to the time to first token, and before fault errors.
    pub added_latency_ms: u64,
    /// When set, the decode rate in tokens per second (replaces the configured one).
    pub slow_tokens_per_sec: Option<f64>,
    /// When set, the connection is cut after this many tokens, with no clean end.
    pub abort_after_tokens: Option<u32>,
    /// Probability in [0, 1] that `abort_after_tokens` applies (default 1).
    pub abort_rate: f64,
    /// The API listener is closed: new connections are refused, open ones are served.
    pub refuse_connections: bool,
    /// The server is dead: listener closed and every open connection cut.
    /// Setting it back to false revives the server on the same port.
    pub dead: bool,
    /// Inference requests are read and then never answered (no status, no
    /// byte) until the client goes away, the fault is cleared (the request is
    /// then served) or `--blackhole-max-hold-s` passes (the connection is
    /// closed without an answer). `/health` and `/v1/models` still answer:
    /// the host looks healthy to health checks, as a hung inference engine
    /// behind a live HTTP front does.
    pub blackhole: bool,
    /// When set, every fault error answer (`error_rate`, `fixed_status`)
    /// carries `retry-after` with this many seconds and the provider's reset
    /// header (`x-ratelimit-reset-requests` or
    /// `anthropic-ratelimit-requests-reset`), whatever its status; at most
    /// [`MAX_RETRY_AFTER_S`]. Unset, 429/503/529 fault answers carry
    /// `retry-after: --retry-after-s` and no reset header.
    pub retry_after_s: Option<u32>,
    /// Fault error answers (`error_rate`, `fixed_status`) carry no
    /// `retry-after` and no rate-limit header at all, quota headers
    /// included: a 429 or 503 that names no end, as some gateways and
    /// self-hosted servers send.
    pub bare_errors: bool,
    /// When set, the quota's requests per window: every inference answer
    /// carries the provider's request rate-limit headers, and a request
    /// past the limit is answered 429 until the window ends ([`crate::quota`]).
    pub quota_requests: Option<NonZeroU64>,
    /// When set, the quota's tokens per window (prompt plus the completion
    /// the request is going to produce, charged when it is admitted), with
    /// the provider's token rate-limit headers.
    pub quota_tokens: Option<NonZeroU64>,
    /// Length of the quota's fixed window, in seconds (default 60, at most
    /// [`MAX_QUOTA_WINDOW_S`]). The first window starts when the fault set
    /// is applied.
    pub quota_window_s: NonZeroU32,
    /// Requests already used in the first window (at most `quota_requests`):
    /// a drill starts near exhaustion without spending the quota first.
    pub quota_requests_used: u64,
    /// Tokens already used in the first window (at most `quota_tokens`).
    pub quota_tokens_used: u64,
}

impl Default for Faults {
    /// No fault at all.
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 503,
            fixed_status: None,
            added_latency_ms: 0,
            slow_tokens_per_sec: None,
            abort_after_tokens: None,
            abort_rate: 1.0,
            refuse_connections: false,
            dead: false,
            blackhole: false,
            retry_after_s: None,
            bare_errors: false,
            quota_requests: None,
            quota_tokens: None,
            quota_window_s: DEFAULT_QUOTA_WINDOW_S,
            quota_requests_used: 0,
            quota_tokens_used: 0,
        }
    }
}

fn probability(field: &'static str, value: f64) -> Result<(), FaultError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(FaultError::NotAProbability { field, value })
    }
}

fn error_status(field: &'static str, value: u16) -> Result<(), FaultError> {
    if (400..=599).contains(&value) {
        Ok(())
    } else {
        Err(FaultError::NotAnErrorStatus { field, value })
    }
}

impl Faults {
    /// Checks ranges: probabilities in [0, 1], statuses in 400..=599, rates > 0,
    /// `retry_after_s` at most [`MAX_RETRY_AFTER_S`], `quota_window_s` at
    /// most [`MAX_QUOTA_WINDOW_S`], a quota's used part within its limit
    /// (0 when there is no such limit).
    pub fn validate(&self) -> Result<(), FaultError> {
        probability("error_rate", self.error_rate)?;
        probability("abort_rate", self.abort_rate)?;
        error_status("error_status", self.error_status)?;
        if let Some(status) = self.fixed_status {
            error_status("fixed_status", status)?;
        }
        if let Some(rate) = self.slow_tokens_per_sec
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(FaultError::NotPositive {
                field: "slow_tokens_per_sec",
                value: rate,
            });
        }
        if let Some(secs) = self.retry_after_s
            && secs > MAX_RETRY_AFTER_S
        {
            return Err(FaultError::TooLarge {
                field: "retry_after_s",
                value: u64::from(secs),
                max: u64::from(MAX_RETRY_AFTER_S),
            });
        }
        if self.quota_window_s.get() > MAX_QUOTA_WINDOW_S {
            return Err(FaultError::TooLarge {
                field: "quota_window_s",
                value: u64::from(self.quota_window_s.get()),
                max: u64::from(MAX_QUOTA_WINDOW_S),
            });
        }
        for (field, used, limit) in [
            (
                "quota_requests_used",
                self.quota_requests_used,
                self.quota_requests,
            ),
            (
                "quota_tokens_used",
                self.quota_tokens_used,
                self.quota_tokens,
            ),
        ] {
            let max = limit.map_or(0, NonZeroU64::get);
            if used > max {
                return Err(FaultError::TooLarge {
                    field,
                    value: used,
                    max,
                });
            }
        }
        Ok(())
    }

    /// The quota the set asks for, if any.
    pub fn quota_limits(&self) -> Option<QuotaLimits> {
        (self.quota_requests.is_some() || self.quota_tokens.is_some()).then(|| QuotaLimits {
            requests: self.quota_requests,
            tokens: self.quota_tokens,
            window: Duration::from_secs(u64::from(self.quota_window_s.get())),
            requests_used: self.quota_requests_used,
            tokens_used: self.quota_tokens_used,
        })
    }

    /// Whether the API listener should be open.
    pub fn listener_open(&self) -> bool {
        !self.dead && !self.refuse_connections
    }
}

/// What the faults do to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Answer with this error status instead of generating.
    pub error_status: Option<u16>,
    /// Delay added before the first token or the error answer.
    pub added_latency: Duration,
    /// Decode rate (tokens/s) replacing the configured one.
    pub rate_override: Option<f64>,
    /// Cut the connection after this many tokens.
    pub abort_after_tokens: Option<u32>,
    /// Rate-limit hint for the error answer, in seconds (the `retry_after_s` fault).
    pub retry_after_s: Option<u32>,
    /// The error answer carries no hint at all (the `bare_errors` fault).
    pub bare: bool,
}

/// The fault set, the seeded PRNG that decides each request, and the
/// quota's window.
#[derive(Debug)]
pub struct FaultState {
    faults: Faults,
    seed: u64,
    rng: XorShiftRng,
    quota: Option<Quota>,
}

impl FaultState {
    /// Starts with `faults` (the quota's first window starting now) and a
    /// PRNG seeded from `seed`.
    pub fn new(faults: Faults, seed: u64) -> Self {
        let quota = faults.quota_limits().map(|l| Quota::new(l, Instant::now()));
        Self {
            faults,
            seed,
            rng: XorShiftRng::seed_from_u64(seed),
            quota,
        }
    }

    /// The quota's window, when the fault set has a quota.
    pub fn quota(&mut self) -> Option<&mut Quota> {
        self.quota.as_mut()
    }

    /// The active faults.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Replaces the fault set (already validated), reseeds the PRNG and
    /// starts the quota's first window now.
    pub fn replace(&mut self, faults: Faults) {
        self.quota = faults.quota_limits().map(|l| Quota::new(l, Instant::now()));
        self.faults = faults;
        self.rng = XorShiftRng::seed_from_u64(self.seed);
    }

    /// Draws the decision for the next request (two PRNG draws, always).
    pub fn decide(&mut self) -> Decision {
        let error_draw = unit(self.rng.next_u64());
        let abort_draw = unit(self.rng.next_u64());
        let f = &self.faults;
        let error_status = f.fixed_status.or_else(|| {
            // `<` so that a rate of 0 never fires and 1 always does.
            (error_draw < f.error_rate).then_some(f.error_status)
        });
        let abort_after_tokens = f.abort_after_tokens.filter(|_| abort_draw < f.abort_rate);
        Decision {
            error_status,
            added_latency: Duration::from_millis(f.added_latency_ms),
            rate_override: f.slow_tokens_per_sec,
            abort_after_tokens,
            retry_after_s: f.retry_after_s,
            bare: f.bare_errors,
        }
    }
}

/// Maps a random u64 to [0, 1) using its top 53 bits.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_is_no_fault() {
        let f: Faults = serde_json::from_str("{}").unwrap();
        assert_eq!(f, Faults::default());
        assert!(f.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<Faults>(r#"{"eror_rate":0.5}"#).is_err());
    }

    #[test]
    fn validation() {
        let bad = Faults {
            error_rate: 1.5,
            ..Faults::default()
        };
        assert!(bad.validate().is_err());
        let bad = Faults {
            fixed_status: Some(200),
            ..Faults::default()
        };
        assert!(bad.validate().is_err());
        let bad = Faults {
            slow_tokens_per_sec: Some(0.0),
            ..Faults::default()
        };
        assert!(bad.validate().is_err());
        let bad = Faults {
            retry_after_s: Some(MAX_RETRY_AFTER_S + 1),
            ..Faults::default()
        };
        assert_eq!(
            bad.validate(),
            Err(FaultError::TooLarge {
                field: "retry_after_s",
                value: 86_401,
                max: 86_400,
            })
        );
        for secs in [0, 1, MAX_RETRY_AFTER_S] {
            let ok = Faults {
                retry_after_s: Some(secs),
                ..Faults::default()
            };
            assert_eq!(ok.validate(), Ok(()), "{secs}");
        }
    }

    #[test]
    fn new_faults_read_from_json_and_default_off() {
        let f: Faults = serde_json::from_str(r#"{"blackhole":true,"retry_after_s":7}"#).unwrap();
        assert!(f.blackhole);
        assert_eq!(f.retry_after_s, Some(7));
        assert!(f.listener_open(), "a blackhole still accepts connections");
        assert!(!Faults::default().blackhole);
        assert_eq!(Faults::default().retry_after_s, None);
        assert!(serde_json::from_str::<Faults>(r#"{"retry_after_s":-1}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"blackhole":1}"#).is_err());
    }

    #[test]
    fn new_faults_do_not_change_the_draws() {
        let plain = Faults {
            error_rate: 0.3,
            abort_after_tokens: Some(2),
            abort_rate: 0.5,
            ..Faults::default()
        };
        let hinted = Faults {
            retry_after_s: Some(3),
            blackhole: true,
            ..plain.clone()
        };
        let mut a = FaultState::new(plain, 11);
        let mut b = FaultState::new(hinted, 11);
        for _ in 0..500 {
            let (da, db) = (a.decide(), b.decide());
            assert_eq!(da.error_status, db.error_status);
            assert_eq!(da.abort_after_tokens, db.abort_after_tokens);
            assert_eq!(da.retry_after_s, None);
            assert_eq!(db.retry_after_s, Some(3));
        }
    }

    #[test]
    fn same_seed_same_decisions_and_rate_is_respected() {
        let faults = Faults {
            error_rate: 0.3,
            ..Faults::default()
        };
        let mut a = FaultState::new(faults.clone(), 7);
        let mut b = FaultState::new(faults.clone(), 7);
        let da: Vec<_> = (0..1000).map(|_| a.decide().error_status).collect();
        let db: Vec<_> = (0..1000).map(|_| b.decide().error_status).collect();
        assert_eq!(da, db);
        let errors = da.iter().filter(|s| s.is_some()).count();
        assert!((200..400).contains(&errors), "{errors}");
        a.replace(faults);
        let again: Vec<_> = (0..1000).map(|_| a.decide().error_status).collect();
        assert_eq!(again, da, "replace reseeds");
    }

    #[test]
    fn quota_fields_read_from_json_default_off_and_are_checked() {
        let f = Faults::default();
        assert_eq!(f.quota_limits(), None);
        assert_eq!(f.quota_window_s.get(), 60);
        assert!(!f.bare_errors);
        let f: Faults = serde_json::from_str(
            r#"{"quota_requests":10,"quota_window_s":5,"quota_requests_used":4,"bare_errors":true}"#,
        )
        .unwrap();
        assert_eq!(f.validate(), Ok(()));
        let limits = f.quota_limits().unwrap();
        assert_eq!(limits.requests.map(NonZeroU64::get), Some(10));
        assert_eq!(limits.tokens, None);
        assert_eq!(limits.window, Duration::from_secs(5));
        assert_eq!(limits.requests_used, 4);
        assert!(f.bare_errors);
        // Zero is not a limit (leave the field out for none) nor a window.
        for bad in [
            r#"{"quota_requests":0}"#,
            r#"{"quota_tokens":0}"#,
            r#"{"quota_window_s":0}"#,
            r#"{"quota_requests":-1}"#,
        ] {
            assert!(serde_json::from_str::<Faults>(bad).is_err(), "{bad}");
        }
        let too_long = Faults {
            quota_window_s: NonZeroU32::new(MAX_QUOTA_WINDOW_S + 1).unwrap(),
            ..Faults::default()
        };
        assert!(matches!(
            too_long.validate(),
            Err(FaultError::TooLarge {
                field: "quota_window_s",
                ..
            })
        ));
        let overused = Faults {
            quota_tokens: NonZeroU64::new(100),
            quota_tokens_used: 101,
            ..Faults::default()
        };
        assert_eq!(
            overused.validate(),
            Err(FaultError::TooLarge {
                field: "quota_tokens_used",
                value: 101,
                max: 100,
            })
        );
        let used_without_limit = Faults {
            quota_requests_used: 1,
            ..Faults::default()
        };
        assert!(used_without_limit.validate().is_err());
    }

    #[test]
    fn replacing_the_faults_starts_a_new_quota_window() {
        let limited = Faults {
            quota_requests: NonZeroU64::new(1),
            ..Faults::default()
        };
        let mut s = FaultState::new(limited.clone(), 3);
        let now = Instant::now();
        assert!(s.quota().unwrap().admit(now, 0).is_ok());
        assert!(s.quota().unwrap().admit(now, 0).is_err());
        s.replace(limited);
        assert!(s.quota().unwrap().admit(Instant::now(), 0).is_ok());
        s.replace(Faults::default());
        assert!(s.quota().is_none());
    }

    #[test]
    fn bare_errors_reach_the_decision_without_changing_the_draws() {
        let mut a = FaultState::new(
            Faults {
                error_rate: 0.5,
                ..Faults::default()
            },
            5,
        );
        let mut b = FaultState::new(
            Faults {
                error_rate: 0.5,
                bare_errors: true,
                ..Faults::default()
            },
            5,
        );
        for _ in 0..200 {
            let (da, db) = (a.decide(), b.decide());
            assert_eq!(da.error_status, db.error_status);
            assert!(!da.bare && db.bare);
        }
    }

    #[test]
    fn fixed_status_wins() {
        let mut s = FaultState::new(
            Faults {
                fixed_status: Some(500),
                ..Faults::default()
            },
            1,
        );
        assert!((0..100).all(|_| s.decide().error_status == Some(500)));
    }
}
