//! `[outlier]`: the ranges of endpoint ejection.
//!
//! Only ranges: nothing here refers to another section, so the same code
//! compiles the global section and each backend's overridden copy.

use sluice_core::config::OutlierConfig;
use sluice_core::units::HumanDuration;

use super::{Compiler, loc_of, or};
use crate::defaults as dflt;
use crate::raw;

impl Compiler {
    pub(super) fn outlier(&mut self, raw: &raw::Outlier) -> OutlierConfig {
        let l = &raw.loc;
        let base = self.positive(
            &raw.base_ejection_time,
            "base_ejection_time",
            dflt::OUTLIER_BASE_EJECTION,
            l,
        );
        let max = self.positive(
            &raw.max_ejection_time,
            "max_ejection_time",
            dflt::OUTLIER_MAX_EJECTION,
            l,
        );
        if max < base {
            self.out_of_range(
                "max_ejection_time",
                &format!("at least `base_ejection_time` ({})", HumanDuration(base)),
                HumanDuration(max),
                &loc_of(&raw.max_ejection_time, l),
            );
        }
        OutlierConfig {
            interval: self.positive(&raw.interval, "interval", dflt::OUTLIER_INTERVAL, l),
            consecutive_errors: or(&raw.consecutive_errors, dflt::OUTLIER_CONSECUTIVE_ERRORS),
            consecutive_429: or(&raw.consecutive_429, dflt::OUTLIER_CONSECUTIVE_429),
            failure_rate: self.ratio_above_zero(
                &raw.failure_rate,
                "failure_rate",
                dflt::OUTLIER_FAILURE_RATE,
                l,
            ),
            min_requests: or(&raw.min_requests, dflt::OUTLIER_MIN_REQUESTS),
            slow_ttft: self.positive(&raw.slow_ttft, "slow_ttft", dflt::SLOW_TTFT, l),
            slow_tpot: self.positive(&raw.slow_tpot, "slow_tpot", dflt::SLOW_TPOT, l),
            slow_rate: self.ratio_above_zero(
                &raw.slow_rate,
                "slow_rate",
                dflt::OUTLIER_SLOW_RATE,
                l,
            ),
            base_ejection_time: base,
            max_ejection_time: max,
            max_ejection: or(&raw.max_ejection, dflt::OUTLIER_MAX_EJECTION_SHARE),
        }
    }
}
