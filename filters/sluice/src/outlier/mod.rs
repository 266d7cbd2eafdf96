//! Outlier detection and endpoint picking (`[outlier]`): the engine's hooks
//! over `sluice_core::outlier` (whose module docs explain the algorithms).
//!
//! # Two instances, one state
//!
//! The module runs twice per worker: in the listener's chain (the request's
//! instance) and in each cluster's chain (the per-attempt instance, once
//! per attempt, retries included). They share the backend's records in
//! shared data:
//!
//! - the **request's instance** picks: from its copy of the records
//!   (refreshed every [`TICK`]) it names the endpoint and its fallbacks in
//!   `x-gateway-destination-endpoint`, which the cluster's `override_host`
//!   policy follows (the router's retries walk the list), and asks for the
//!   router's retries and, on streams, a first-token deadline. It counts
//!   this worker's outstanding requests per endpoint (the picker's load),
//!   and learns each stream's time per output token when it ends;
//! - the **per-attempt instance** learns: each attempt's endpoint,
//!   outcome and time to first token go into this worker's tallies; a 429
//!   benches its endpoint in shared data at once.
//!
//! Each instance folds its tallies into the shared records on its tick (one
//! compare-and-swap per backend), which also runs the detectors; whichever
//! flush ejects an endpoint logs it.
//!
//! # Endpoints
//!
//! The endpoints are the policy's (`backend.zone.endpoints`, `ip:port` as
//! Envoy reports `upstream.address`): the picker never names another, and
//! an attempt on an address the policy does not list is not judged. A
//! backend whose zones list none is left to Envoy (the capability has no
//! opinion on it).

mod metrics;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use log::{info, warn};
use sluice_core::config::{OutlierConfig, Policy};
use sluice_core::draw::unit;
use sluice_core::outlier::pick::{NO_ZONE, Rank};
use sluice_core::outlier::{
    self, BackendState, Candidate, DESTINATION_HEADER, Event, PickReason, Standing, Tally, Verdict,
    is_slow, peers, pick,
};
use sluice_core::retry::{MAX_RETRIES_HEADER, RETRIABLE_STATUS_CODES_HEADER, RETRY_ON_HEADER};
use sluice_core::time::Timestamp;
use sluice_filter_common::STATE;
use sluice_filter_common::engine::{
    Admission, Admitted, Attempt, Capability, FIRST_TOKEN_PROPERTY, Flow, Observation,
};

use metrics::BackendMetrics;

/// How often each instance flushes its tallies and refreshes its view:
/// bounds how stale a pick is (an ejection or a 429 elsewhere is seen
/// within one tick).
pub const TICK: Duration = Duration::from_millis(50);

/// Ticks between flushes when this instance learned nothing: ejections
/// still end and silent endpoints are still judged, at a quarter of the
/// pace.
const IDLE_FLUSH_TICKS: u32 = 4;

/// Request header by which a filter sets an attempt's per-try timeout
/// (honoured by Envoy 1.40's router when a filter, not a client, sets it).
const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";

/// Least time between two log lines saying an endpoint is spared by
/// `max_ejection` (the detectors flag it on every flush it stays sick).
const SPARED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Response header naming the endpoint that served a request and why.
pub const ENDPOINT_HEADER: &str = "x-sluice-endpoint";

/// The `[outlier]` capability of one policy.
pub struct Outlier {
    policy: Policy,
    /// By the policy's backend index; `None` where the section is off or
    /// the backend lists no endpoint.
    backends: Vec<Option<Rc<Guarded>>>,
    ticks: Cell<u32>,
    rng: Cell<u64>,
}

/// One backend under outlier detection, as this instance knows it.
struct Guarded {
    name: String,
    key: String,
    cfg: OutlierConfig,
    /// `(ip:port, zone)` in the policy's order; every vector below is
    /// indexed like it.
    endpoints: Vec<(String, String)>,
    /// Each endpoint's zone, by its index in the backend's zones.
    zones: Vec<usize>,
    /// The picker's copy of the shared records.
    view: RefCell<Vec<Candidate>>,
    /// This worker's outstanding requests per endpoint (request's instance).
    load: RefCell<Vec<u32>>,
    /// What this instance learned since its last flush.
    tallies: RefCell<Vec<Tally>>,
    /// This worker has a probe out (one at a time per worker).
    probing: Cell<bool>,
    /// When this instance last logged each endpoint as spared.
    spared_said: RefCell<Vec<Timestamp>>,
    metrics: BackendMetrics,
}

impl Guarded {
    fn index(&self, addr: &str) -> Option<usize> {
        self.endpoints.iter().position(|(a, _)| a == addr)
    }

    /// Folds the tallies into the shared records and refreshes the view.
    fn flush(&self, now: Timestamp, rng: &Cell<u64>, force: bool) {
        let tallies: Vec<(String, Tally)> = self
            .tallies
            .borrow()
            .iter()
            .zip(&self.endpoints)
            .filter(|(t, _)| !t.is_empty())
            .map(|(t, (addr, _))| (addr.clone(), t.clone()))
            .collect();
        if tallies.is_empty() && !force {
            return;
        }
        let seed = rng.get();
        let result = STATE.update(&self.key, |state: &mut BackendState| {
            let mut x = seed;
            state.align(&self.endpoints);
            let events = state.flush(&tallies, &self.cfg, now, || unit(&mut x));
            (events, outlier::candidates(state, now), x)
        });
        match result {
            Ok((events, view, x)) => {
                rng.set(x);
                for t in self.tallies.borrow_mut().iter_mut() {
                    *t = Tally::default();
                }
                self.report(&events, now);
                self.set_view(view);
            }
            // Contention or a host failure: keep the tallies for the next
            // tick and pick from the view we have.
            Err(e) => warn!(
                "sluice outlier: backend {}: state not flushed: {e}",
                self.name
            ),
        }
    }

    fn set_view(&self, view: Vec<Candidate>) {
        for (i, c) in view.iter().enumerate() {
            if let Some(m) = self.metrics.endpoints.get(i) {
                m.ejected.set(u64::from(c.standing != Standing::InRotation));
            }
        }
        *self.view.borrow_mut() = view;
    }

    fn report(&self, events: &[Event], now: Timestamp) {
        for event in events {
            match event {
                Event::Ejected {
                    addr,
                    reason,
                    length,
                } => {
                    warn!(
                        "sluice outlier: backend {}: endpoint {addr} ejected for {:.1}s ({})",
                        self.name,
                        length.as_secs_f64(),
                        reason.as_str()
                    );
                    if let Some(m) = self.index(addr).and_then(|i| self.metrics.endpoints.get(i)) {
                        m.ejections.inc();
                    }
                }
                Event::Probing { addr } => info!(
                    "sluice outlier: backend {}: endpoint {addr} ejection over, probing",
                    self.name
                ),
                Event::Returned { addr } => info!(
                    "sluice outlier: backend {}: endpoint {addr} back in rotation",
                    self.name
                ),
                Event::Spared { addr, reason } => {
                    self.metrics.spared.inc();
                    // Judged again every flush: said once per interval.
                    let Some(i) = self.index(addr) else { continue };
                    let mut said = self.spared_said.borrow_mut();
                    if said[i] != Timestamp::ZERO && now.since(said[i]) < SPARED_LOG_EVERY {
                        continue;
                    }
                    said[i] = now;
                    info!(
                        "sluice outlier: backend {}: endpoint {addr} looks sick ({}) but max_ejection keeps it",
                        self.name,
                        reason.as_str()
                    );
                }
            }
        }
    }

    /// Judges a latency sample of endpoint `i` against its peers' estimates.
    fn judge(&self, i: usize, ms: f64, first_token: bool) -> Option<bool> {
        let view = self.view.borrow();
        let (mut others, floor) = if first_token {
            (peers(&view, i, |c| c.ttft_ms), self.cfg.ttft_floor)
        } else {
            (peers(&view, i, |c| c.tpot_ms), self.cfg.tpot_floor)
        };
        is_slow(
            ms,
            &mut others,
            self.cfg.latency_factor,
            floor.as_secs_f64() * 1000.0,
            self.cfg.min_hosts,
        )
    }
}

impl Outlier {
    /// The capability, if some backend has `[outlier]` and endpoints.
    pub fn from_policy(policy: &Policy) -> Option<Self> {
        let backends: Vec<Option<Rc<Guarded>>> = policy
            .backends
            .iter()
            .map(|b| {
                let cfg = b.outlier.clone()?;
                let mut endpoints: Vec<(String, String)> = Vec::new();
                let mut zones: Vec<usize> = Vec::new();
                for (zi, z) in b.zones.iter().enumerate() {
                    for e in &z.endpoints {
                        if !endpoints.iter().any(|(a, _)| a == e) {
                            endpoints.push((e.clone(), z.name.clone()));
                            zones.push(zi);
                        }
                    }
                }
                if endpoints.is_empty() {
                    return None;
                }
                let n = endpoints.len();
                let view = endpoints
                    .iter()
                    .map(|(addr, _)| Candidate {
                        addr: addr.clone(),
                        standing: Standing::InRotation,
                        ttft_ms: None,
                        ttft_weight: 0.0,
                        tpot_ms: None,
                    })
                    .collect();
                Some(Rc::new(Guarded {
                    name: b.name.clone(),
                    key: outlier::state_key(&b.name),
                    metrics: BackendMetrics::define(&b.name, &endpoints),
                    cfg,
                    endpoints,
                    zones,
                    view: RefCell::new(view),
                    load: RefCell::new(vec![0; n]),
                    tallies: RefCell::new(vec![Tally::default(); n]),
                    probing: Cell::new(false),
                    spared_said: RefCell::new(vec![Timestamp::ZERO; n]),
                }))
            })
            .collect();
        let outlier = backends.iter().any(Option::is_some).then(|| Outlier {
            policy: policy.clone(),
            backends,
            ticks: Cell::new(0),
            rng: Cell::new(0x9e37_79b9_7f4a_7c15),
        })?;
        // A reloaded policy starts from what the shared records say (an
        // endpoint ejected before the reload stays out), not from a view
        // with everything in rotation until the first tick.
        let now = sluice_filter_common::host::now();
        for g in outlier.backends.iter().flatten() {
            g.flush(now, &outlier.rng, true);
        }
        Some(outlier)
    }

    /// The guarded backend an attempt's endpoint belongs to, and its index.
    fn locate(&self, addr: &str) -> Option<(&Rc<Guarded>, usize)> {
        self.backends
            .iter()
            .flatten()
            .find_map(|g| g.index(addr).map(|i| (g, i)))
    }

    fn flush_all(&self, now: Timestamp) {
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        let force = ticks.is_multiple_of(IDLE_FLUSH_TICKS);
        for g in self.backends.iter().flatten() {
            g.flush(now, &self.rng, force);
        }
    }
}

impl Capability for Outlier {
    fn name(&self) -> &'static str {
        "outlier"
    }

    fn reads_endpoint(&self) -> bool {
        true
    }

    fn reads_quota(&self) -> bool {
        self.backends
            .iter()
            .flatten()
            .any(|g| !g.cfg.cooldown_429.is_zero())
    }

    fn holds_first_token(&self) -> bool {
        self.backends
            .iter()
            .flatten()
            .any(|g| !g.cfg.first_token_timeout.is_zero())
    }

    fn needs_attempts(&self) -> bool {
        true
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(TICK)
    }

    fn attempt_tick_period(&self) -> Option<Duration> {
        Some(TICK)
    }

    fn tick(&self, now: Timestamp, _wake: &mut dyn FnMut(u32, sluice_filter_common::engine::Wake)) {
        self.flush_all(now);
    }

    fn attempt_tick(&self, now: Timestamp) {
        self.flush_all(now);
    }

    fn admit(&self, admission: &mut Admission<'_>) -> Admitted {
        // The backend the request goes to, after a reroute by the breaker.
        let guarded = admission
            .backend(&self.policy)
            .and_then(|b| self.backends.iter().flatten().find(|g| g.name == b.name));
        let Some(g) = guarded else {
            return Admitted::pass();
        };
        let mut x = admission.rand.to_bits() | 1;
        let draws = (admission.rand, unit(&mut x));
        // The zone order `[failover]` chose for this request, by endpoint.
        let rank: Vec<Rank> = admission
            .edits
            .zone_ranks
            .as_ref()
            .map_or_else(Vec::new, |ranks| {
                g.zones
                    .iter()
                    .map(|&z| ranks.get(z).copied().unwrap_or(NO_ZONE))
                    .collect()
            });
        let choice = {
            let view = g.view.borrow();
            let load = g.load.borrow();
            pick(
                &view,
                &load,
                draws,
                !g.probing.get(),
                g.cfg.retries as usize,
                &rank,
            )
        };
        let Some(choice) = choice else {
            g.metrics.panic.inc();
            return Admitted {
                verdict: sluice_filter_common::engine::Verdict::Go,
                flow: Some(Box::new(OutlierFlow {
                    guarded: Rc::clone(g),
                    picked: None,
                    reason: None,
                })),
            };
        };
        let first = choice.order[0];
        let list: Vec<&str> = choice
            .order
            .iter()
            .map(|&i| g.endpoints[i].0.as_str())
            .collect();
        let edits = &mut *admission.edits;
        edits.set_request_header(DESTINATION_HEADER, Some(list.join(",")));
        if list.len() > 1 {
            // The router retries before anything reached the client, on the
            // next endpoint of the list each time (`[retry]`, after this,
            // bounds the count by its budget).
            edits.set_request_header(
                RETRY_ON_HEADER,
                Some("5xx,reset,connect-failure,retriable-status-codes".to_owned()),
            );
            edits.set_request_header(RETRIABLE_STATUS_CODES_HEADER, Some("429".to_owned()));
            edits.set_request_header(MAX_RETRIES_HEADER, Some((list.len() - 1).to_string()));
        }
        if admission.request.stream && !g.cfg.first_token_timeout.is_zero() {
            edits.set_request_header(
                PER_TRY_TIMEOUT_HEADER,
                Some(g.cfg.first_token_timeout.as_millis().to_string()),
            );
            edits.properties.push((FIRST_TOKEN_PROPERTY, b"1".to_vec()));
        }
        if let Some(n) = g.load.borrow_mut().get_mut(first) {
            *n = n.saturating_add(1);
        }
        if choice.reason == PickReason::Probe {
            g.probing.set(true);
        }
        if let Some(m) = g.metrics.endpoints.get(first) {
            m.picked.inc();
        }
        Admitted {
            verdict: sluice_filter_common::engine::Verdict::Go,
            flow: Some(Box::new(OutlierFlow {
                guarded: Rc::clone(g),
                picked: Some(first),
                reason: Some(choice.reason),
            })),
        }
    }

    fn attempt_started(&self, attempt: &Attempt) {
        if let Some((g, i)) = attempt.endpoint.as_deref().and_then(|a| self.locate(a)) {
            g.tallies.borrow_mut()[i].start();
        }
    }

    fn attempt(&self, attempt: &Attempt) {
        let Some((g, i)) = attempt.endpoint.as_deref().and_then(|a| self.locate(a)) else {
            return;
        };
        let now = sluice_filter_common::host::now();
        let verdict = Verdict::of(attempt.status, attempt.flags);
        let ttft = attempt.first_byte.map(|t| t.since(attempt.started));
        let slow = ttft.and_then(|t| g.judge(i, t.as_secs_f64() * 1000.0, true));
        g.tallies.borrow_mut()[i].end(verdict, ttft, slow, now);
        if let Some(until) = benched_until(attempt, verdict, &g.cfg, now) {
            g.tallies.borrow_mut()[i].throttle(until);
            if let Some(c) = g.view.borrow_mut().get_mut(i) {
                c.standing = Standing::Out;
            }
            if let Some(m) = g.metrics.endpoints.get(i) {
                m.throttled.inc();
            }
            // Written at once: every worker's next tick must see it.
            let addr = &g.endpoints[i].0;
            let endpoints = &g.endpoints;
            if let Err(e) = STATE.modify(&g.key, |state: &mut BackendState| {
                state.align(endpoints);
                state.throttle(addr, until)
            }) {
                warn!("sluice outlier: backend {}: 429 not shared: {e}", g.name);
            }
        }
    }
}

/// Until when an attempt's answer benches its endpoint, if it does: a
/// 429 for the time it names (or `cooldown_429`), and a success whose
/// rate-limit headers say a quota is spent until its reset, since the
/// endpoint's next answer would be a 429 (one refusal fewer per endpoint
/// and window). Both capped at `max_cooldown`; off with `cooldown_429 = 0`.
fn benched_until(
    attempt: &Attempt,
    verdict: Verdict,
    cfg: &OutlierConfig,
    now: Timestamp,
) -> Option<Timestamp> {
    if cfg.cooldown_429.is_zero() {
        return None;
    }
    match verdict {
        Verdict::Throttled => {
            let wait = attempt.cooldown.unwrap_or(cfg.cooldown_429);
            Some(now + wait.min(cfg.max_cooldown))
        }
        Verdict::Success => attempt
            .headroom
            .filter(|h| h.left <= 0.0 && h.until > now)
            .map(|h| h.until.min(now + cfg.max_cooldown)),
        _ => None,
    }
}

/// One request's pick, followed to its end.
struct OutlierFlow {
    guarded: Rc<Guarded>,
    /// The endpoint picked first, when the capability had an opinion.
    picked: Option<usize>,
    reason: Option<PickReason>,
}

impl Flow for OutlierFlow {
    fn response_headers(
        &mut self,
        observation: &Observation,
        add: &mut Vec<(&'static str, String)>,
    ) {
        let g = &self.guarded;
        let Some(addr) = observation.upstream_address.as_deref() else {
            return;
        };
        let served = g.index(addr);
        let why = match (self.picked, self.reason) {
            (Some(p), Some(reason)) if served == Some(p) => reason.as_str(),
            (Some(_), _) => {
                g.metrics.served_by_fallback.inc();
                "fallback"
            }
            _ => "envoy",
        };
        add.push((ENDPOINT_HEADER, format!("{addr}; reason={why}")));
    }

    fn done(&mut self, observation: &mut Observation, _now: Timestamp) {
        let g = &self.guarded;
        if let Some(p) = self.picked {
            if let Some(n) = g.load.borrow_mut().get_mut(p) {
                *n = n.saturating_sub(1);
            }
            if self.reason == Some(PickReason::Probe) {
                g.probing.set(false);
            }
        }
        // A stream's time per output token, on the endpoint that served it.
        if let (Some(tpot), Some(i)) = (
            observation.tpot(),
            observation
                .upstream_address
                .as_deref()
                .and_then(|a| g.index(a)),
        ) {
            let slow = g.judge(i, tpot.as_secs_f64() * 1000.0, false);
            g.tallies.borrow_mut()[i].per_token(tpot, slow);
        }
    }
}
