//! `[retry]`: retry budget and per-request retries.
//!
//! Only ranges: nothing here refers to another section, so the same code
//! compiles the global section and each backend's overridden copy.

use sluice_core::config::{self as cfg, RetryConfig};
use sluice_core::units::HumanDuration;

use super::{Compiler, failure_kind, loc_of, or};
use crate::defaults as dflt;
use crate::raw;

impl Compiler {
    pub(super) fn retry(&mut self, raw: &raw::Retry) -> RetryConfig {
        let l = &raw.loc;
        let base = self.positive(
            &raw.backoff_base,
            "backoff_base",
            dflt::RETRY_BACKOFF_BASE,
            l,
        );
        let max = or(&raw.backoff_max, base * 10);
        if max < base {
            self.out_of_range(
                "backoff_max",
                &format!("at least `backoff_base` ({})", HumanDuration(base)),
                HumanDuration(max),
                &loc_of(&raw.backoff_max, l),
            );
        }
        let max_retries = or(&raw.max_retries, dflt::RETRY_MAX_RETRIES);
        if max_retries > 10 {
            self.out_of_range(
                "max_retries",
                "at most 10",
                max_retries,
                &loc_of(&raw.max_retries, l),
            );
        }
        let retry_on: Vec<cfg::FailureKind> = or(&raw.retry_on, dflt::RETRY_ON.to_vec())
            .into_iter()
            .map(failure_kind)
            .collect();
        if retry_on.is_empty() && max_retries > 0 {
            self.invalid(&loc_of(&raw.retry_on, l), "`retry_on` is empty, so nothing is ever retried", Some("list conditions such as \"5xx\", \"reset\", \"connect-failure\", or set `max_retries = 0`"));
        }
        RetryConfig {
            budget: or(&raw.budget, dflt::RETRY_BUDGET),
            min_retries_per_second: or(&raw.min_retries_per_second, dflt::RETRY_MIN_PER_SECOND),
            ttl: self.positive(&raw.ttl, "ttl", dflt::RETRY_TTL, l),
            max_retries,
            retry_on,
            backoff_base: base,
            backoff_max: max,
            honor_retry_after: or(&raw.honor_retry_after, true),
            typical_request_tokens: or(&raw.typical_request_tokens, 0),
        }
    }
}
