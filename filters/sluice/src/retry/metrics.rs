//! The retry capability's Envoy stats: `sluice_retry.<backend>.<metric>`
//! and `sluice_retry.<backend>.<zone>.balance`, bounded by the policy.

use sluice_filter_common::{Counter, Gauge, label};

pub struct RetryMetrics {
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
            retries: Counter::define(&format!("{prefix}.retries")),
            refused: Counter::define(&format!("{prefix}.refused")),
            balance: zones
                .iter()
                .map(|z| Gauge::define(&format!("{prefix}.{}.balance", label(z))))
                .collect(),
        }
    }
}
