//! What a request tells Envoy's router about retrying it.
//!
//! The router makes retries, not the filter: all a filter can do is bound
//! them before the first attempt, with request headers the router reads
//! (and removes before the request goes upstream). [`plan`] turns the
//! policy's `[retry]` section and the budget's balance into those headers.
//!
//! # `retry_on` in Envoy's words
//!
//! | policy            | `x-envoy-retry-on`                                   |
//! |-------------------|------------------------------------------------------|
//! | `5xx`             | `5xx`                                                |
//! | `gateway-error`   | `gateway-error` (502, 503, 504)                      |
//! | `reset`           | `reset`                                              |
//! | `connect-failure` | `connect-failure`                                    |
//! | `429`             | `retriable-status-codes`, with `x-envoy-retriable-status-codes: 429` |
//! | `timeout`         | `reset` on streams; nothing otherwise                |
//!
//! Envoy has no condition for timeouts alone. Its route timeout spans every
//! attempt and is never retried; a per-try timeout (sluice sets one on
//! streams: the first-token deadline) resets the attempt, and the router
//! retries that reset under `reset`, `5xx` or `gateway-error`
//! (`Filter::onPerTryTimeoutCommon` → `maybeRetryReset(LocalReset)` →
//! `RetryStateImpl::wouldRetryFromReset`). `reset` is the narrowest of the
//! three: it adds resets of the connection (no answer at all), where the
//! others add answered 5xx. On a stream, the attempt that missed its
//! deadline has produced nothing yet, so retrying it is cheap. On a request
//! that is not streamed, a timeout means a long generation, which a retry
//! would repeat from the start: `timeout` adds nothing there (though a
//! `reset`, `5xx` or `gateway-error` the policy lists still retries any
//! per-try timeout a route sets: Envoy cannot tell them apart).
//!
//! Back-off (`backoff_base`, `backoff_max`) and `retry-after`
//! (`honor_retry_after`) have no request header: they belong to the
//! route's retry policy.

use crate::config::{FailureKind, RetryConfig};

/// Most retries the router may make for this request; overrides a route's
/// `num_retries`, so 0 also stops retries the route would make.
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// Conditions the router retries on, comma-separated.
pub const RETRY_ON_HEADER: &str = "x-envoy-retry-on";
/// Statuses `retriable-status-codes` retries, comma-separated.
pub const RETRIABLE_STATUS_CODES_HEADER: &str = "x-envoy-retriable-status-codes";

/// The router's instructions for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPlan {
    /// Retries the router may make; 0 when the budget or the conditions
    /// allow none.
    pub max_retries: u32,
    /// `x-envoy-retry-on`: Envoy's conditions, comma-separated, in the
    /// policy's order, each once; empty when nothing is retried.
    pub retry_on: String,
    /// `x-envoy-retriable-status-codes`, when `retry_on` names
    /// `retriable-status-codes` (`"429"`).
    pub retriable_status_codes: Option<String>,
}

impl RetryPlan {
    /// The request headers to set: always the retry count (so that a
    /// route's own retry policy cannot retry past an empty budget), and
    /// the conditions when there is a retry to make.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![(MAX_RETRIES_HEADER, self.max_retries.to_string())];
        if self.max_retries > 0 {
            headers.push((RETRY_ON_HEADER, self.retry_on.clone()));
            if let Some(codes) = &self.retriable_status_codes {
                headers.push((RETRIABLE_STATUS_CODES_HEADER, codes.clone()));
            }
        }
        headers
    }
}

/// The retry headers for a request.
///
/// - `available`: retries of this request's weight the budget holds (its
///   balance over the request's weight, as the worker sees it); rounded
///   down, anything not a positive number allows none.
/// - `stream`: the client asked for a streamed answer (see the module docs
///   on `timeout`).
/// - `fallbacks`: endpoints named after the first in the
///   `override_host` list (each retry takes the next; past the list the
///   cluster's fallback policy picks, possibly the failed host again); 0
///   when the request names no endpoints.
///
/// `max_retries` is the least of `cfg.max_retries`, `available` and, when
/// there are any, `fallbacks`; 0 when no condition is left to retry on.
pub fn plan(cfg: &RetryConfig, available: f64, stream: bool, fallbacks: usize) -> RetryPlan {
    let mut retry_on: Vec<&'static str> = Vec::new();
    let mut codes = None;
    for kind in &cfg.retry_on {
        let condition = match kind {
            FailureKind::Status5xx => "5xx",
            FailureKind::GatewayError => "gateway-error",
            FailureKind::Reset => "reset",
            FailureKind::ConnectFailure => "connect-failure",
            FailureKind::Status429 => {
                codes = Some("429".to_owned());
                "retriable-status-codes"
            }
            FailureKind::Timeout if stream => "reset",
            FailureKind::Timeout => continue,
        };
        if !retry_on.contains(&condition) {
            retry_on.push(condition);
        }
    }
    let mut max_retries = cfg.max_retries.min(whole(available));
    if fallbacks > 0 {
        max_retries = max_retries.min(u32::try_from(fallbacks).unwrap_or(u32::MAX));
    }
    if retry_on.is_empty() {
        max_retries = 0;
    }
    RetryPlan {
        max_retries,
        retry_on: retry_on.join(","),
        retriable_status_codes: codes,
    }
}

/// `available` rounded down to a count (forgiving rounding errors of the
/// sums behind it); 0 for anything that is not a positive number.
fn whole(available: f64) -> u32 {
    let n = (available + 1e-9).floor();
    if n.is_nan() || n < 1.0 {
        0
    } else if n >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range and whole: exact.
        n as u32
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::units::Ratio;

    fn cfg(max_retries: u32, retry_on: &[FailureKind]) -> RetryConfig {
        RetryConfig {
            budget: Ratio::percent(20),
            min_retries_per_second: 10,
            ttl: Duration::from_secs(10),
            max_retries,
            retry_on: retry_on.to_vec(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            honor_retry_after: true,
            typical_request_tokens: 0,
        }
    }

    use FailureKind::*;

    #[test]
    fn the_default_conditions_in_envoys_words() {
        let p = plan(
            &cfg(1, &[GatewayError, Reset, ConnectFailure]),
            50.0,
            false,
            0,
        );
        assert_eq!(
            p,
            RetryPlan {
                max_retries: 1,
                retry_on: "gateway-error,reset,connect-failure".into(),
                retriable_status_codes: None,
            }
        );
        assert_eq!(
            p.headers(),
            vec![
                (MAX_RETRIES_HEADER, "1".to_owned()),
                (
                    RETRY_ON_HEADER,
                    "gateway-error,reset,connect-failure".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn a_429_is_a_retriable_status_code() {
        let p = plan(&cfg(2, &[Status5xx, Status429]), 50.0, false, 0);
        assert_eq!(p.retry_on, "5xx,retriable-status-codes");
        assert_eq!(p.retriable_status_codes.as_deref(), Some("429"));
        assert_eq!(
            p.headers(),
            vec![
                (MAX_RETRIES_HEADER, "2".to_owned()),
                (RETRY_ON_HEADER, "5xx,retriable-status-codes".to_owned()),
                (RETRIABLE_STATUS_CODES_HEADER, "429".to_owned()),
            ]
        );
    }

    #[test]
    fn a_timeout_is_retried_as_a_reset_on_streams_only() {
        let c = cfg(1, &[Timeout, ConnectFailure, Reset]);
        assert_eq!(plan(&c, 5.0, true, 0).retry_on, "reset,connect-failure");
        assert_eq!(plan(&c, 5.0, false, 0).retry_on, "connect-failure,reset");
        let only = cfg(3, &[Timeout]);
        assert_eq!(plan(&only, 5.0, true, 0).max_retries, 3);
        let p = plan(&only, 5.0, false, 0);
        assert_eq!((p.max_retries, p.retry_on.as_str()), (0, ""));
        assert_eq!(p.headers(), vec![(MAX_RETRIES_HEADER, "0".to_owned())]);
    }

    #[test]
    fn retries_are_the_least_of_the_policy_the_budget_and_the_fallbacks() {
        let c = cfg(3, &[Status5xx]);
        let max = |available, fallbacks| plan(&c, available, false, fallbacks).max_retries;
        assert_eq!(max(50.0, 0), 3);
        assert_eq!(max(2.7, 0), 2);
        assert_eq!(max(50.0, 1), 1);
        assert_eq!(max(50.0, 5), 3);
        assert_eq!(max(0.99, 5), 0);
        assert_eq!(
            max(0.999_999_999_9, 5),
            1,
            "rounding of the sums is forgiven"
        );
        for nonsense in [0.0, -4.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(max(nonsense, 0), 0, "{nonsense}");
        }
        assert_eq!(max(f64::INFINITY, 0), 3);
        assert_eq!(max(1e300, usize::MAX), 3);
        let empty = plan(&c, 0.5, false, 2);
        assert_eq!(empty.headers(), vec![(MAX_RETRIES_HEADER, "0".to_owned())]);
    }
}
