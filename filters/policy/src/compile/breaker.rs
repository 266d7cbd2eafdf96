//! `[breaker]`, `[breaker.bulkhead]` and `[breaker.degrade]`.
//!
//! The breaker is the one section that depends on the backends (a fallback
//! model resolves to a backend), so it is compiled after them, with their
//! list passed in.

use std::num::NonZeroU32;
use std::time::Duration;

use sluice_core::config::{
    self as cfg, BreakerConfig, BulkheadConfig, DegradeAction, DegradeConfig, TenantLimit, Window,
};
use sluice_core::units::HumanDuration;

use super::{Compiler, failure_kind, loc_of, or};
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw;

impl Compiler {
    pub(super) fn breaker(
        &mut self,
        raw: &raw::Breaker,
        backends: &[cfg::Backend],
    ) -> BreakerConfig {
        let l = &raw.loc;
        let mode = match or(&raw.mode, raw::BreakerModeKind::Rate) {
            raw::BreakerModeKind::Consecutive => cfg::BreakerMode::Consecutive {
                failures: self.nonzero(
                    &raw.consecutive_failures,
                    "consecutive_failures",
                    dflt::BREAKER_CONSECUTIVE_FAILURES,
                    l,
                ),
            },
            raw::BreakerModeKind::Rate => {
                let window = match or(
                    &raw.window,
                    crate::decode::WindowSpec::Calls(dflt::BREAKER_WINDOW_CALLS),
                ) {
                    crate::decode::WindowSpec::Calls(n) => {
                        Window::Calls(NonZeroU32::new(n).unwrap_or_else(|| {
                            self.out_of_range(
                                "window",
                                "at least 1 call",
                                0,
                                &loc_of(&raw.window, l),
                            );
                            NonZeroU32::MIN
                        }))
                    }
                    crate::decode::WindowSpec::Time(d) => {
                        if d < Duration::from_secs(1) {
                            self.out_of_range(
                                "window",
                                "at least 1s",
                                HumanDuration(d),
                                &loc_of(&raw.window, l),
                            );
                        }
                        Window::Time(d)
                    }
                };
                let min_calls =
                    self.nonzero(&raw.min_calls, "min_calls", dflt::BREAKER_MIN_CALLS, l);
                if let Window::Calls(n) = window
                    && min_calls > n
                {
                    self.out_of_range(
                        "min_calls",
                        &format!("at most the window ({n} calls)"),
                        min_calls,
                        &loc_of(&raw.min_calls, l),
                    );
                }
                cfg::BreakerMode::Rate {
                    window,
                    min_calls,
                    failure_rate: self.ratio_above_zero(
                        &raw.failure_rate,
                        "failure_rate",
                        dflt::BREAKER_FAILURE_RATE,
                        l,
                    ),
                    slow_rate: self.ratio_above_zero(
                        &raw.slow_rate,
                        "slow_rate",
                        dflt::BREAKER_SLOW_RATE,
                        l,
                    ),
                }
            }
            raw::BreakerModeKind::Adaptive => {
                let k = or(&raw.k, dflt::ADAPTIVE_K);
                if !(1.0..=10.0).contains(&k) {
                    self.out_of_range("k", "between 1.0 and 10.0", k, &loc_of(&raw.k, l));
                }
                let window = match or(
                    &raw.window,
                    crate::decode::WindowSpec::Time(dflt::ADAPTIVE_WINDOW),
                ) {
                    crate::decode::WindowSpec::Time(d) if !d.is_zero() => d,
                    _ => {
                        self.invalid(
                            &loc_of(&raw.window, l),
                            "adaptive throttling needs a time window",
                            Some("write a duration, like \"2m\""),
                        );
                        dflt::ADAPTIVE_WINDOW
                    }
                };
                cfg::BreakerMode::Adaptive {
                    k,
                    window,
                    max_reject: self.ratio_above_zero(
                        &raw.max_reject,
                        "max_reject",
                        dflt::ADAPTIVE_MAX_REJECT,
                        l,
                    ),
                }
            }
        };
        let open_for = self.positive(&raw.open_for, "open_for", dflt::BREAKER_OPEN_FOR, l);
        let max_open_for = self.positive(
            &raw.max_open_for,
            "max_open_for",
            dflt::BREAKER_MAX_OPEN_FOR,
            l,
        );
        if max_open_for < open_for {
            self.out_of_range(
                "max_open_for",
                &format!("at least `open_for` ({})", HumanDuration(open_for)),
                HumanDuration(max_open_for),
                &loc_of(&raw.max_open_for, l),
            );
        }
        let backoff = or(&raw.backoff, dflt::BREAKER_BACKOFF);
        if !(1.0..=10.0).contains(&backoff) {
            self.out_of_range(
                "backoff",
                "between 1.0 and 10.0",
                backoff,
                &loc_of(&raw.backoff, l),
            );
        }
        let failure_on = or(&raw.failure_on, dflt::BREAKER_FAILURE_ON.to_vec())
            .into_iter()
            .map(failure_kind)
            .collect();
        BreakerConfig {
            mode,
            scope: match or(&raw.scope, raw::BreakerScope::BackendModel) {
                raw::BreakerScope::BackendModel => cfg::BreakerScope::BackendModel,
                raw::BreakerScope::Endpoint => cfg::BreakerScope::Endpoint,
            },
            failure_on,
            slow_ttft: self.positive(&raw.slow_ttft, "slow_ttft", dflt::SLOW_TTFT, l),
            slow_tpot: self.positive(&raw.slow_tpot, "slow_tpot", dflt::SLOW_TPOT, l),
            open_for,
            max_open_for,
            backoff,
            jitter: or(&raw.jitter, dflt::BREAKER_JITTER),
            half_open_probes: self.nonzero(
                &raw.half_open_probes,
                "half_open_probes",
                dflt::BREAKER_HALF_OPEN_PROBES,
                l,
            ),
            bulkhead: self.bulkhead(raw.bulkhead.as_ref().map(|b| &b.value), l),
            degrade: self.degrade(raw.degrade.as_ref().map(|d| &d.value), l, backends),
        }
    }

    fn bulkhead(&mut self, raw: Option<&raw::Bulkhead>, parent: &Loc) -> BulkheadConfig {
        let default = raw::Bulkhead {
            loc: parent.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let l = &raw.loc;
        let max_in_flight = self.nonzero(
            &raw.max_in_flight,
            "max_in_flight",
            dflt::BULKHEAD_MAX_IN_FLIGHT,
            l,
        );
        let per_tenant = raw.max_in_flight_per_tenant.as_ref().map(|_| {
            self.nonzero(
                &raw.max_in_flight_per_tenant,
                "max_in_flight_per_tenant",
                1,
                l,
            )
        });
        let tenants = raw
            .tenants
            .as_ref()
            .map(|m| {
                m.value
                    .0
                    .iter()
                    .map(|(tenant, cap)| {
                        let cap = NonZeroU32::new(cap.value).unwrap_or_else(|| {
                            self.out_of_range("tenants", "at least 1", 0, &cap.loc);
                            NonZeroU32::MIN
                        });
                        TenantLimit {
                            tenant: tenant.value.clone(),
                            max_in_flight: cap,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let queue = or(&raw.queue, dflt::BULKHEAD_QUEUE);
        let max_wait = or(&raw.max_wait, dflt::BULKHEAD_MAX_WAIT);
        if queue > 0 && max_wait.is_zero() {
            self.invalid(
                &loc_of(&raw.queue, l),
                "a queue with `max_wait = \"0s\"` never lets anyone wait",
                Some("set `max_wait`, for example \"2s\", or remove `queue`"),
            );
        }
        BulkheadConfig {
            max_in_flight,
            max_in_flight_per_tenant: per_tenant,
            tenants,
            queue,
            max_wait,
        }
    }

    fn degrade(
        &mut self,
        raw: Option<&raw::Degrade>,
        parent: &Loc,
        backends: &[cfg::Backend],
    ) -> DegradeConfig {
        let default = raw::Degrade {
            loc: parent.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let l = &raw.loc;
        let action = match or(&raw.action, raw::DegradeActionKind::FailFast) {
            raw::DegradeActionKind::FailFast => DegradeAction::FailFast,
            raw::DegradeActionKind::FallbackModel => {
                let model = self
                    .required(&raw.fallback_model, "fallback_model", l)
                    .unwrap_or_default();
                let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
                let backend = match &raw.fallback_backend {
                    Some(b) => {
                        if !names.contains(&b.value) {
                            self.unknown_name("backend", &b.value, &names, &b.loc);
                        }
                        b.value.clone()
                    }
                    None => match backends
                        .iter()
                        .find(|b| b.models.iter().any(|p| p.matches(&model)))
                    {
                        Some(b) => b.name.clone(),
                        None => {
                            if raw.fallback_model.is_some() {
                                self.invalid(&loc_of(&raw.fallback_model, l), format!("no backend serves the fallback model `{model}`"), Some("add it to a backend's `models`, or name `fallback_backend`"));
                            }
                            String::new()
                        }
                    },
                };
                DegradeAction::FallbackModel { model, backend }
            }
            raw::DegradeActionKind::Static => DegradeAction::Static {
                text: self
                    .required(&raw.static_text, "static_text", l)
                    .unwrap_or_default(),
            },
        };
        DegradeConfig {
            action,
            retry_after: or(&raw.retry_after, dflt::DEGRADE_RETRY_AFTER),
        }
    }
}
