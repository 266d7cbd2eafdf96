//! The failover capability's Envoy stats.
//!
//! `sluice_failover.<backend>.<zone>.<metric>` per zone of a backend under
//! `[failover]`, and `sluice_failover.<backend>.<metric>` per backend: the
//! series are fixed by the policy, never by traffic.

use sluice_filter_common::{Counter, Gauge, label};

/// The stats of one zone.
pub struct ZoneMetrics {
    /// Share of new requests planned for it, per mille (this worker's view).
    pub share: Gauge,
    /// Its health, per mille.
    pub health: Gauge,
    /// Requests sent to it first (probes included).
    pub requests: Counter,
    /// Times its share rose after a dwell (fail-backs).
    pub failbacks: Counter,
    /// Times it was drained.
    pub drains: Counter,
}

/// The stats of one backend.
pub struct BackendMetrics {
    /// 1 while every reachable zone is drained and requests spread over all.
    pub panic: Gauge,
    /// Probe requests sent to drained zones.
    pub probes: Counter,
    pub zones: Vec<ZoneMetrics>,
}

impl BackendMetrics {
    pub fn define(backend: &str, zones: &[String]) -> Self {
        let prefix = format!("sluice_failover.{}", label(backend));
        BackendMetrics {
            panic: Gauge::define(&format!("{prefix}.panic")),
            probes: Counter::define(&format!("{prefix}.probes")),
            zones: zones
                .iter()
                .map(|zone| {
                    let p = format!("{prefix}.{}", label(zone));
                    ZoneMetrics {
                        share: Gauge::define(&format!("{p}.share")),
                        health: Gauge::define(&format!("{p}.health")),
                        requests: Counter::define(&format!("{p}.requests")),
                        failbacks: Counter::define(&format!("{p}.failbacks")),
                        drains: Counter::define(&format!("{p}.drains")),
                    }
                })
                .collect(),
        }
    }
}
