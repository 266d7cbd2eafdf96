//! The outlier capability's Envoy stats.
//!
//! `sluice_outlier.<backend>.<endpoint>.<metric>` per endpoint the policy
//! lists (the endpoint's `ip:port` with `.` and `:` as `_`), and
//! `sluice_outlier.<backend>.<metric>` per backend: the number of series is
//! fixed by the policy, never by traffic.

use sluice_filter_common::{Counter, Gauge, label};

/// The stats of one endpoint.
pub struct EndpointMetrics {
    /// Requests it was picked for (first in the list).
    pub picked: Counter,
    /// Times it was ejected.
    pub ejections: Counter,
    /// 1 while ejected or probed, else 0 (this worker's view).
    pub ejected: Gauge,
    /// 429s that benched it.
    pub throttled: Counter,
}

/// The stats of one backend.
pub struct BackendMetrics {
    /// Requests for which no endpoint was in rotation (or none was known):
    /// Envoy's own balancing picked (panic mode).
    pub panic: Counter,
    /// Requests served by a fallback of the list, not the pick (the router
    /// retried after a failure, a 429 or a first-token timeout).
    pub served_by_fallback: Counter,
    /// Flagged endpoints kept in rotation by `max_ejection`.
    pub spared: Counter,
    pub endpoints: Vec<EndpointMetrics>,
}

impl BackendMetrics {
    pub fn define(backend: &str, endpoints: &[(String, String)]) -> Self {
        let prefix = format!("sluice_outlier.{}", label(backend));
        BackendMetrics {
            panic: Counter::define(&format!("{prefix}.panic")),
            served_by_fallback: Counter::define(&format!("{prefix}.served_by_fallback")),
            spared: Counter::define(&format!("{prefix}.spared")),
            endpoints: endpoints
                .iter()
                .map(|(addr, _)| {
                    let p = format!("{prefix}.{}", label(addr));
                    EndpointMetrics {
                        picked: Counter::define(&format!("{p}.picked")),
                        ejections: Counter::define(&format!("{p}.ejections")),
                        ejected: Gauge::define(&format!("{p}.ejected")),
                        throttled: Counter::define(&format!("{p}.throttled")),
                    }
                })
                .collect(),
        }
    }
}
