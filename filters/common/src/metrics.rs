//! Envoy stats from a filter: counters, gauges and histograms.
//!
//! A metric is defined once per VM (`proxy_define_metric`) and then updated
//! by id. Envoy exposes it as `wasmcustom.<name>`; labels come from the
//! bootstrap's `stats_tags` regexes applied to the name, so names carry their
//! labels as `sluice_tokens.tenant.acme.model.gpt-4o.admitted`-style dotted
//! parts. A failure to define or update a metric is never worth failing a
//! request for: it is ignored.

use crate::host::{self, MetricKind};

/// A monotonically increasing count.
#[derive(Clone, Copy, Debug)]
pub struct Counter(Option<u32>);

/// A value that goes up and down.
#[derive(Clone, Copy, Debug)]
pub struct Gauge(Option<u32>);

/// A distribution of recorded values.
#[derive(Clone, Copy, Debug)]
pub struct Histogram(Option<u32>);

impl Counter {
    pub fn define(name: &str) -> Self {
        Self(host::define_metric(MetricKind::Counter, name))
    }

    pub fn add(self, n: u64) {
        if let Some(id) = self.0
            && n > 0
        {
            host::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn inc(self) {
        self.add(1);
    }
}

impl Gauge {
    pub fn define(name: &str) -> Self {
        Self(host::define_metric(MetricKind::Gauge, name))
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            host::record_metric(id, value);
        }
    }

    pub fn add(self, delta: i64) {
        if let Some(id) = self.0 {
            host::increment_metric(id, delta);
        }
    }
}

impl Histogram {
    pub fn define(name: &str) -> Self {
        Self(host::define_metric(MetricKind::Histogram, name))
    }

    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            host::record_metric(id, value);
        }
    }
}

/// A name part safe in a dotted stat name and in Prometheus: ASCII letters,
/// digits, `-` and `_`, at most 64 characters; anything else (dots, `*`,
/// spaces, bytes of other scripts) becomes `_`.
pub fn label(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
