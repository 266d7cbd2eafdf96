//! The token filter's Envoy stats, with bounded cardinality.
//!
//! Per tenant × model counters are labelled only with tenants and models the
//! policy names exactly; every other value is counted as `other`, so a client
//! inventing tenant ids or model names cannot grow Envoy's stats without
//! bound. Names are `sluice_tokens.tenant.<t>.model.<m>.<counter>`, which a
//! `stats_tags` regex turns into Prometheus labels.

use std::cell::RefCell;
use std::collections::HashMap;

use sluice_core::config::TokensConfig;
use sluice_filter_common::{Counter, label};

/// Counters of one tenant × model.
#[derive(Clone, Copy)]
pub struct Labels {
    pub admitted: Counter,
    pub rejected: Counter,
    pub reserved: Counter,
    pub charged: Counter,
    pub refunded: Counter,
    /// What the buckets were charged in the end: reserved + charged −
    /// refunded, per settled request.
    pub billed: Counter,
}

/// (tenant, model) as indices into the policy's exact names; `None` is `other`.
type LabelKey = (Option<usize>, Option<usize>);

pub struct Metrics {
    pub invalid: Counter,
    pub too_large: Counter,
    pub state_errors: Counter,
    /// Requests served by their rule's overflow state (no slot of their own).
    pub overflowed: Counter,
    /// Answers compressed against sluice's request: charged in full.
    pub compressed: Counter,
    pub absurd_usage: Counter,
    pub estimated_usage: Counter,
    pub framing_errors: Counter,
    tenants: Vec<String>,
    models: Vec<String>,
    /// Defined counters by (tenant, model) index into `tenants`/`models`,
    /// `None` for `other`: a lookup compares the names the policy lists and
    /// allocates nothing (it runs on every request).
    labelled: RefCell<HashMap<LabelKey, Labels>>,
}

impl Metrics {
    pub fn define(tokens: &TokensConfig) -> Self {
        let exact = |p: &sluice_core::config::Pattern| {
            (!p.as_str().ends_with('*')).then(|| p.as_str().to_string())
        };
        let mut tenants: Vec<String> = tokens
            .quotas
            .iter()
            .flat_map(|q| q.matcher.tenants.iter().filter_map(exact))
            .collect();
        let mut models: Vec<String> = tokens
            .quotas
            .iter()
            .flat_map(|q| q.matcher.models.iter().filter_map(exact))
            .collect();
        tenants.sort();
        tenants.dedup();
        models.sort();
        models.dedup();
        let c = |name: &str| Counter::define(&format!("sluice_tokens.{name}"));
        Self {
            invalid: c("invalid_requests"),
            too_large: c("too_large"),
            state_errors: c("state_errors"),
            overflowed: c("overflowed"),
            compressed: c("compressed_responses"),
            absurd_usage: c("absurd_usage"),
            estimated_usage: c("estimated_usage"),
            framing_errors: c("framing_errors"),
            tenants,
            models,
            labelled: RefCell::new(HashMap::new()),
        }
    }

    /// The counters of `tenant` × `model`, defined on first use.
    pub fn labels(&self, tenant: &str, model: &str) -> Labels {
        let key = (
            self.tenants.iter().position(|k| k == tenant),
            self.models.iter().position(|k| k == model),
        );
        if let Some(labels) = self.labelled.borrow().get(&key) {
            return *labels;
        }
        let name = |index: Option<usize>, known: &[String]| {
            index
                .and_then(|i| known.get(i))
                .map_or_else(|| "other".to_string(), |v| label(v))
        };
        let prefix = format!(
            "sluice_tokens.tenant.{}.model.{}",
            name(key.0, &self.tenants),
            name(key.1, &self.models)
        );
        let c = |name: &str| Counter::define(&format!("{prefix}.{name}"));
        let labels = Labels {
            admitted: c("admitted"),
            rejected: c("rejected"),
            reserved: c("tokens_reserved"),
            charged: c("tokens_charged"),
            refunded: c("tokens_refunded"),
            billed: c("tokens_billed"),
        };
        self.labelled.borrow_mut().insert(key, labels);
        labels
    }
}
