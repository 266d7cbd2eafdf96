//! Retry budgets (`[retry]`): the engine's hooks over `sluice_core::retry`
//! (whose module docs explain the budget and what it guarantees).
//!
//! Envoy's router makes the retries; a filter can only tell it, per
//! request and before the first attempt, how many it may make and on what
//! (`x-envoy-max-retries`, `x-envoy-retry-on`, honoured when a filter sets
//! them). So:
//!
//! - **Admission** (the request's instance): the budget this worker sees
//!   for the zone a retry would go to (the next endpoint of the outlier
//!   capability's list, else the backend's best zone), minus the retries it
//!   already granted since its last look, becomes the request's plan. An
//!   empty budget means `x-envoy-max-retries: 0`, whatever the route says.
//!   With `[outlier]` the count is also at most the fallbacks it named, each
//!   retry going to the next one (a different endpoint: a 429 is never
//!   retried on the endpoint that sent it).
//! - **Attempts** (the per-attempt instance): a first attempt deposits into
//!   the budget of the zone that receives it; every later one is charged
//!   to the zone that receives the retry, even into debt (it has
//!   happened). Both are batched per worker and flushed every [`TICK`].
//! - **The answer**: a failure that reaches the client carries
//!   `x-should-retry: false` (sluice already retried it on other endpoints
//!   as far as the budget allows, or the budget allowed none), which the
//!   official OpenAI and Anthropic SDKs honour, so their own retries do not
//!   multiply the storm.
//!   Envoy never retries once a response has started towards the client:
//!   nothing is retried after the first streamed byte.
//!
//! Budgets are per backend × zone: a zone outage spends the budget of the
//! dead zone's retries, not the one protecting the healthy zone.

mod metrics;

use std::cell::RefCell;
use std::time::Duration;

use log::warn;
use sluice_core::config::{Policy, RetryConfig};
use sluice_core::llm::Cap;
use sluice_core::outlier::DESTINATION_HEADER;
use sluice_core::retry::{
    self, MAX_RETRIES_HEADER, RETRIABLE_STATUS_CODES_HEADER, RETRY_ON_HEADER, RetryBudget, plan,
};
use sluice_core::time::Timestamp;
use sluice_filter_common::STATE;
use sluice_filter_common::engine::{
    Admission, Admitted, Attempt, Capability, Flow, Observation, Verdict, Wake,
};

use metrics::RetryMetrics;

/// How often deposits and charges are flushed and budgets re-read.
pub const TICK: Duration = Duration::from_millis(50);

/// The zone of endpoints the policy does not list (EDS, Istio).
const OTHER_ZONE: &str = "other";

/// Stream property (Envoy filter state) carrying a request's weight to the
/// per-attempt instance, when the policy weighs requests by their tokens.
const WEIGHT_PROPERTY: &str = "sluice_retry_weight";

/// Response header telling official SDKs not to retry.
pub const SHOULD_RETRY_HEADER: &str = "x-should-retry";

/// The `[retry]` capability of one policy.
pub struct Retry {
    policy: Policy,
    backends: Vec<Budgeted>,
}

/// One backend's budgets, as this instance knows them.
struct Budgeted {
    name: String,
    cfg: RetryConfig,
    /// Zone names (the policy's, then [`OTHER_ZONE`]); vectors below are
    /// indexed like it.
    zones: Vec<String>,
    keys: Vec<String>,
    /// `ip:port` → zone index.
    endpoints: Vec<(String, usize)>,
    /// Balances as last read, less the retries granted since.
    seen: RefCell<Vec<f64>>,
    /// Deposits (requests, their weight) and charges (retry weight) not
    /// yet flushed.
    pending: RefCell<Vec<(u32, f64, f64)>>,
    metrics: RetryMetrics,
}

impl Budgeted {
    /// A request's weight in typical requests: its prompt estimate and
    /// completion cap (times its completions) over
    /// `typical_request_tokens`; 1 when weighting is off or the body was
    /// not read.
    fn weight(&self, request: &sluice_filter_common::engine::RequestContext) -> f64 {
        let typical = self.cfg.typical_request_tokens;
        let Some(info) = request.info().filter(|_| typical > 0) else {
            return 1.0;
        };
        let cap = match info.cap {
            Cap::Given { tokens, .. } => tokens,
            Cap::Absent | Cap::Invalid { .. } => u64::from(typical),
        };
        // The token limiter's estimate when it ran; else OpenAI's rule of
        // thumb, four characters a token.
        let prompt = if info.prompt_tokens > 0 {
            info.prompt_tokens
        } else {
            info.prompt_chars
                .div_ceil(4)
                .saturating_add(info.prompt_token_ids)
        };
        let tokens = prompt
            .saturating_add(cap)
            .saturating_mul(info.completions.max(1));
        (tokens as f64 / f64::from(typical)).clamp(retry::MIN_WEIGHT, retry::MAX_WEIGHT)
    }

    /// The zones attempts can land in: those the policy lists endpoints
    /// for, else ([`OTHER_ZONE`]) wherever Envoy's endpoints are.
    fn served_zones(&self) -> std::ops::Range<usize> {
        if self.endpoints.is_empty() {
            self.zones.len() - 1..self.zones.len()
        } else {
            0..self.zones.len() - 1
        }
    }

    fn zone_of(&self, addr: &str) -> usize {
        self.endpoints
            .iter()
            .find(|(a, _)| a == addr)
            .map_or(self.zones.len() - 1, |(_, z)| *z)
    }

    /// Flushes this instance's deposits and charges and re-reads every
    /// zone's balance.
    fn flush(&self, now: Timestamp) {
        for (z, key) in self.keys.iter().enumerate() {
            let (deposits, weight, charges) = self.pending.borrow()[z];
            let result = if deposits == 0 && charges <= 0.0 {
                STATE
                    .read::<RetryBudget>(key)
                    .map(|b| b.balance(now, &self.cfg))
            } else {
                STATE.update(key, |b: &mut RetryBudget| {
                    b.deposit_many(now, &self.cfg, deposits, weight);
                    if charges > 0.0 {
                        b.charge(now, &self.cfg, charges);
                    }
                    b.balance(now, &self.cfg)
                })
            };
            match result {
                Ok(balance) => {
                    self.pending.borrow_mut()[z] = (0, 0.0, 0.0);
                    self.seen.borrow_mut()[z] = balance;
                    if let Some(g) = self.metrics.balance.get(z) {
                        g.set(balance.max(0.0) as u64);
                    }
                }
                Err(e) => warn!(
                    "sluice retry: backend {} zone {}: budget not flushed: {e}",
                    self.name, self.zones[z]
                ),
            }
        }
    }
}

impl Retry {
    /// The capability, if some backend has `[retry]`.
    pub fn from_policy(policy: &Policy) -> Option<Self> {
        let backends: Vec<Budgeted> = policy
            .backends
            .iter()
            .filter_map(|b| {
                let cfg = b.retry.clone()?;
                let mut zones: Vec<String> = b.zones.iter().map(|z| z.name.clone()).collect();
                zones.dedup();
                zones.push(OTHER_ZONE.to_owned());
                let endpoints = b
                    .zones
                    .iter()
                    .flat_map(|z| {
                        let i = zones.iter().position(|n| *n == z.name).unwrap_or(0);
                        z.endpoints.iter().map(move |e| (e.clone(), i))
                    })
                    .collect();
                let n = zones.len();
                Some(Budgeted {
                    name: b.name.clone(),
                    keys: zones.iter().map(|z| retry::state_key(&b.name, z)).collect(),
                    metrics: RetryMetrics::define(&b.name, &zones),
                    seen: RefCell::new(vec![retry::reserve(&cfg); n]),
                    pending: RefCell::new(vec![(0, 0.0, 0.0); n]),
                    cfg,
                    zones,
                    endpoints,
                })
            })
            .collect();
        (!backends.is_empty()).then(|| Retry {
            policy: policy.clone(),
            backends,
        })
    }

    fn budgeted(&self, backend: &str) -> Option<&Budgeted> {
        self.backends.iter().find(|b| b.name == backend)
    }

    fn by_endpoint(&self, addr: &str) -> Option<(&Budgeted, usize)> {
        self.backends
            .iter()
            .find(|b| b.endpoints.iter().any(|(a, _)| a == addr))
            .map(|b| (b, b.zone_of(addr)))
    }

    fn flush_all(&self, now: Timestamp) {
        for b in &self.backends {
            b.flush(now);
        }
    }
}

impl Capability for Retry {
    fn name(&self) -> &'static str {
        "retry"
    }

    fn needs_attempts(&self) -> bool {
        true
    }

    fn reads_attempts(&self) -> bool {
        true
    }

    fn reads_prompt(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.cfg.typical_request_tokens > 0)
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(TICK)
    }

    fn attempt_tick_period(&self) -> Option<Duration> {
        Some(TICK)
    }

    fn tick(&self, now: Timestamp, _wake: &mut dyn FnMut(u32, Wake)) {
        self.flush_all(now);
    }

    fn attempt_tick(&self, now: Timestamp) {
        self.flush_all(now);
    }

    fn admit(&self, admission: &mut Admission<'_>) -> Admitted {
        let Some(b) = admission
            .backend(&self.policy)
            .and_then(|backend| self.budgeted(&backend.name))
        else {
            return Admitted::pass();
        };
        // Where a retry would go: the next endpoint the outlier capability
        // named. Without it Envoy's balancer picks, in any zone: the
        // backend's zones then count as one budget (their sum), and the
        // grant is taken from the richest.
        let (fallbacks, next) = match admission.edits.request_header(DESTINATION_HEADER).flatten() {
            Some(list) => {
                let mut entries = list.split(',');
                let _first = entries.next();
                let next = entries.next();
                (usize::from(next.is_some()) + entries.count(), next)
            }
            None => (0, None),
        };
        let (zone, available) = {
            let seen = b.seen.borrow();
            match next {
                Some(next) => {
                    let z = b.zone_of(next);
                    (z, seen[z])
                }
                None => {
                    let zones = b.served_zones();
                    let richest = zones
                        .clone()
                        .max_by(|&x, &y| seen[x].total_cmp(&seen[y]))
                        .unwrap_or(0);
                    (richest, zones.map(|z| seen[z]).sum())
                }
            }
        };
        let weight = b.weight(admission.request);
        if weight != 1.0 {
            // The per-attempt instance deposits and charges this weight.
            admission
                .edits
                .properties
                .push((WEIGHT_PROPERTY, weight.to_string().into_bytes()));
        }
        let p = plan(
            &b.cfg,
            available / weight,
            admission.request.stream,
            fallbacks,
        );
        let refused = p.max_retries == 0 && b.cfg.max_retries > 0 && available < 1.0;
        if refused {
            b.metrics.refused.inc();
        }
        b.seen.borrow_mut()[zone] -= f64::from(p.max_retries) * weight;
        for name in [
            MAX_RETRIES_HEADER,
            RETRY_ON_HEADER,
            RETRIABLE_STATUS_CODES_HEADER,
        ] {
            admission.edits.set_request_header(name, None);
        }
        for (name, value) in p.headers() {
            admission.edits.set_request_header(name, Some(value));
        }
        Admitted {
            verdict: Verdict::Go,
            // A failure that reaches the client has either been retried
            // already, on other endpoints, within the budget, or the budget
            // allowed none: a client retrying on top only multiplies the
            // load (the SDKs' own two retries made a total outage 1.8-2.4
            // attempts per call where the budget alone allows 1.2).
            flow: Some(Box::new(RetryFlow {
                tell: refused || p.max_retries > 0,
                attempts: b.metrics.attempts,
            })),
        }
    }

    fn attempt_started(&self, attempt: &Attempt) {
        let Some((b, zone)) = attempt
            .endpoint
            .as_deref()
            .and_then(|a| self.by_endpoint(a))
        else {
            return;
        };
        let weight = if b.cfg.typical_request_tokens > 0 {
            sluice_filter_common::host::property(&[WEIGHT_PROPERTY])
                .and_then(|v| String::from_utf8(v).ok()?.parse::<f64>().ok())
                .filter(|w| w.is_finite())
                .map_or(1.0, |w| w.clamp(retry::MIN_WEIGHT, retry::MAX_WEIGHT))
        } else {
            1.0
        };
        let mut pending = b.pending.borrow_mut();
        if attempt.number <= 1 {
            pending[zone].0 = pending[zone].0.saturating_add(1);
            pending[zone].1 += weight;
            b.metrics.deposits.inc();
        } else {
            pending[zone].2 += weight;
            b.metrics.retries.inc();
        }
    }
}

/// One request's plan, followed to its answer.
struct RetryFlow {
    /// A failure reaching the client says `x-should-retry: false`: sluice
    /// retried it as far as the budget allows (perhaps not at all).
    tell: bool,
    attempts: sluice_filter_common::Histogram,
}

impl Flow for RetryFlow {
    fn response_headers(
        &mut self,
        observation: &Observation,
        add: &mut Vec<(&'static str, String)>,
    ) {
        let failed = observation
            .status
            .is_some_and(|s| s == 429 || (500..600).contains(&s));
        if failed && self.tell {
            add.push((SHOULD_RETRY_HEADER, "false".to_owned()));
        }
    }

    fn done(&mut self, observation: &mut Observation, _now: Timestamp) {
        if let Some(n) = observation.attempts.filter(|&n| n > 0) {
            self.attempts.record(u64::from(n));
        }
    }
}
