//! `[outlier]`: the ranges of endpoint ejection and picking.
//!
//! Only ranges: nothing here refers to another section, so the same code
//! compiles the global section and each backend's overridden copy.

use sluice_core::config::OutlierConfig;
use sluice_core::units::HumanDuration;

use super::{Compiler, loc_of, or};
use crate::decode::Spanned;
use crate::defaults as dflt;
use crate::raw;

/// Attempts on other endpoints a request may make: Envoy's
/// `x-envoy-max-retries` takes any number, a backend rarely has more.
const MAX_RETRIES: u32 = 10;

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
        let retries = or(&raw.retries, dflt::OUTLIER_RETRIES);
        if retries > MAX_RETRIES {
            self.out_of_range(
                "retries",
                &format!("at most {MAX_RETRIES}"),
                retries,
                &loc_of(&raw.retries, l),
            );
        }
        OutlierConfig {
            interval: self.positive(&raw.interval, "interval", dflt::OUTLIER_INTERVAL, l),
            latency_window: self.positive(
                &raw.latency_window,
                "latency_window",
                dflt::OUTLIER_LATENCY_WINDOW,
                l,
            ),
            consecutive_errors: or(&raw.consecutive_errors, dflt::OUTLIER_CONSECUTIVE_ERRORS),
            failure_rate: or(&raw.failure_rate, dflt::OUTLIER_FAILURE_RATE),
            min_requests: or(&raw.min_requests, dflt::OUTLIER_MIN_REQUESTS),
            success_rate_stdev: self.factor(
                &raw.success_rate_stdev,
                "success_rate_stdev",
                dflt::OUTLIER_SUCCESS_RATE_STDEV,
                l,
            ),
            min_hosts: self
                .nonzero(&raw.min_hosts, "min_hosts", dflt::OUTLIER_MIN_HOSTS, l)
                .get()
                .max(2),
            latency_factor: self.latency_factor(raw, l),
            min_samples: self
                .nonzero(
                    &raw.min_samples,
                    "min_samples",
                    dflt::OUTLIER_MIN_SAMPLES,
                    l,
                )
                .get(),
            ttft_floor: or(&raw.ttft_floor, dflt::OUTLIER_TTFT_FLOOR),
            tpot_floor: or(&raw.tpot_floor, dflt::OUTLIER_TPOT_FLOOR),
            phi_threshold: self.factor(
                &raw.phi_threshold,
                "phi_threshold",
                dflt::OUTLIER_PHI_THRESHOLD,
                l,
            ),
            cooldown_429: or(&raw.cooldown_429, dflt::OUTLIER_COOLDOWN_429),
            max_cooldown: self.positive(
                &raw.max_cooldown,
                "max_cooldown",
                dflt::OUTLIER_MAX_COOLDOWN,
                l,
            ),
            first_token_timeout: or(&raw.first_token_timeout, dflt::OUTLIER_FIRST_TOKEN_TIMEOUT),
            retries: retries.min(MAX_RETRIES),
            base_ejection_time: base,
            max_ejection_time: max,
            jitter: or(&raw.jitter, dflt::OUTLIER_JITTER),
            max_ejection: or(&raw.max_ejection, dflt::OUTLIER_MAX_EJECTION_SHARE),
            probes: self.nonzero(&raw.probes, "probes", dflt::OUTLIER_PROBES, l),
        }
    }

    /// A threshold that is 0 (off) or a finite positive number up to 100.
    fn factor(
        &mut self,
        field: &Option<Spanned<f64>>,
        key: &'static str,
        default: f64,
        table: &crate::diagnostic::Loc,
    ) -> f64 {
        let value = or(field, default);
        if !(0.0..=100.0).contains(&value) {
            self.out_of_range(
                key,
                "0 (off) or a number up to 100",
                value,
                &loc_of(field, table),
            );
            return default;
        }
        value
    }

    /// `latency_factor`: 0 (off) or above 1 (a factor of 1 or less would
    /// call half the endpoints outliers).
    fn latency_factor(&mut self, raw: &raw::Outlier, l: &crate::diagnostic::Loc) -> f64 {
        let value = self.factor(
            &raw.latency_factor,
            "latency_factor",
            dflt::OUTLIER_LATENCY_FACTOR,
            l,
        );
        if value != 0.0 && value <= 1.0 {
            self.out_of_range(
                "latency_factor",
                "0 (off) or above 1",
                value,
                &loc_of(&raw.latency_factor, l),
            );
            return dflt::OUTLIER_LATENCY_FACTOR;
        }
        value
    }
}
