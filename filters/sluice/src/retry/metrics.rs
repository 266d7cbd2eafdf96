//! The retry capability's Envoy stats: `sluice_retry.<backend>.{deposits,
//! retries, refused, attempts_per_request}` and
//! `sluice_retry.<backend>.<zone>.balance`, bounded by the policy.

use sluice_filter_common::{Counter, Gauge, Histogram, label};

pub struct RetryMetrics {
    /// First attempts, each depositing a share of a retry.
    pub deposits: Counter,
    /// Upstream attempts per request that reached the upstream.
    pub attempts: Histogram,
    /// Retry attempts Envoy made (charged to the budget).
    pub retries: Counter,
    /// Requests the budget allowed no retry.
    pub refused: Counter,
    /// Retries the budget holds, per zone (this worker's last look).
    pub balance: Vec<Gauge>,
}

impl RetryMetrics {
    pub fn define(backend: &str, zones: &[String]) -> Self {
        let prefix = format!("sluice_retry.{}", label(backend));
        RetryMetrics {
            deposits: Counter::define(&format!("{prefix}.deposits")),
            attempts: Histogram::define(&format!("{prefix}.attempts_per_request")),
            retries: Counter::define(&format!("{prefix}.retries")),
            refused: Counter::define(&format!("{prefix}.refused")),
            balance: zones
                .iter()
                .map(|z| Gauge::define(&format!("{prefix}.{}.balance", label(z))))
                .collect(),
        }
    }
}
