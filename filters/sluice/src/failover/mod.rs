//! Zone and region failover (`[failover]`): the engine's hooks over
//! `sluice_core::failover` (whose module docs explain the algorithm).
//!
//! # Routing: one cluster, endpoints across zones
//!
//! A request's zone is chosen here and its endpoint by `[outlier]`'s
//! picker, which names it (and its fallbacks) in the `override_host` list
//! `x-gateway-destination-endpoint` of the backend's one cluster, each
//! zone a locality of it. The alternative, a cluster per zone picked by a
//! header the route table matches, was rejected: a route's retries stay on
//! the cluster the route picked, so a retry could never leave a sick zone
//! (the "retries stuck on the first-priority pool" users of priority
//! groups report), each zone would need its own connection pools and
//! config, and a zone decision would wait for the route to be re-matched.
//! Here the first fallback of every request is the next zone's best
//! endpoint, and a zone decision applies to the next request. The price:
//! the policy must list the endpoints (or `sluice render envoy
//! --endpoints` must), and every zone of a backend is one cluster.
//!
//! # Two instances, one state
//!
//! As for `[outlier]`: the per-attempt instance tallies each attempt's
//! outcome and rate-limit headers per zone, the request's instance the
//! tokens each zone served; both fold their tallies into the backend's
//! zone records in shared data on their tick, which also judges the zones
//! from the endpoint records `[outlier]` keeps there. The request's
//! instance plans from the shares its tick brought back and claims the
//! probes of drained zones.

mod metrics;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use log::{info, warn};
use sluice_core::config::{FailoverConfig, Policy};
use sluice_core::failover::plan::draw;
use sluice_core::failover::{
    self, Event, FailoverState, Flushed, Latency, ZONE_HEADER, ZoneSpec, ZoneTally, order,
};
use sluice_core::outlier::pick::{NO_ZONE, Rank};
use sluice_core::outlier::{self, BackendState, Verdict};
use sluice_core::time::Timestamp;
use sluice_filter_common::STATE;
use sluice_filter_common::engine::{Admission, Admitted, Attempt, Capability, Flow, Observation};
use sluice_filter_common::host;

use metrics::BackendMetrics;

/// How often each instance folds its tallies in and refreshes its plan
/// (the request's instance on every tick: it claims probes and must see a
/// drained zone at once).
pub const TICK: Duration = Duration::from_millis(50);

/// Least time between two flushes a failed attempt triggers.
const EARLY_FLUSH_GAP: Duration = Duration::from_millis(1);

/// Ticks between flushes of a per-attempt instance that learned nothing.
const IDLE_FLUSH_TICKS: u32 = 4;

/// Why a request went to its zone (`x-sluice-zone: <zone>; reason=…`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The best zone the plan gives traffic to (normally the local one).
    Preferred,
    /// A lower-ranked zone, drawn by the plan's spill-over.
    Spill,
    /// A probe of a drained zone.
    Probe,
    /// Every zone is drained: spread over all.
    Panic,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Preferred => "preferred",
            Why::Spill => "spill",
            Why::Probe => "probe",
            Why::Panic => "panic",
        }
    }
}

/// The `[failover]` capability of one policy.
pub struct Failover {
    policy: Policy,
    /// By the policy's backend index; `None` for a backend failover has
    /// nothing to do for (one zone, no endpoints, no `[outlier]`).
    backends: Vec<Option<Rc<Zoned>>>,
    ticks: Cell<u32>,
}

/// The plan a request's instance draws from, as of its last tick.
struct View {
    /// Share of new requests by rank (`Zoned::ranked`).
    shares: Vec<f64>,
    /// By zone.
    drained: Vec<bool>,
    /// By zone: the time to first token its attempts are judged against.
    references: Vec<Option<f64>>,
    panic: bool,
}

/// One backend under failover, as this instance knows it.
struct Zoned {
    name: String,
    key: String,
    outlier_key: String,
    cfg: FailoverConfig,
    latency: Latency,
    /// The backend's zones in the policy's order; every vector by zone is
    /// indexed like it.
    specs: Vec<ZoneSpec>,
    /// Zones requests may go to, best first.
    ranked: Vec<usize>,
    /// `(ip:port, zone)` of every endpoint the policy lists.
    endpoints: Vec<(String, usize)>,
    view: RefCell<View>,
    tallies: RefCell<Vec<ZoneTally>>,
    /// Probes this worker may send: `(zone, granted at)`.
    probes: RefCell<Vec<(usize, Timestamp)>>,
    /// This instance's last flush.
    flushed_at: Cell<Timestamp>,
    /// Requests admitted since the last tick.
    admitted: Cell<u32>,
    metrics: BackendMetrics,
}

impl Zoned {
    fn zone_of(&self, addr: &str) -> Option<usize> {
        self.endpoints
            .iter()
            .find(|(a, _)| a == addr)
            .map(|&(_, z)| z)
    }

    /// Folds the tallies in, judges the zones, refreshes the plan.
    fn flush(&self, now: Timestamp, may_probe: bool) {
        let tallies: Vec<ZoneTally> = self.tallies.borrow().clone();
        let endpoints: BackendState = STATE.read(&self.outlier_key).unwrap_or_default();
        let inputs = failover::inputs(&endpoints, &self.specs, now);
        let result = STATE.update(&self.key, |state: &mut FailoverState| {
            let flushed = state.flush(
                &self.specs,
                &tallies,
                &inputs,
                &self.ranked,
                &self.cfg,
                &self.latency,
                now,
                may_probe,
            );
            let zones: Vec<(f64, bool)> = state
                .zones
                .iter()
                .map(|r| (r.health, r.is_drained()))
                .collect();
            (flushed, zones, state.panic)
        });
        self.flushed_at.set(now);
        match result {
            Ok((flushed, zones, panic)) => {
                for t in self.tallies.borrow_mut().iter_mut() {
                    *t = ZoneTally::default();
                }
                self.report(&flushed.events);
                self.probes
                    .borrow_mut()
                    .extend(flushed.probes.iter().map(|&z| (z, now)));
                self.set_view(&zones, panic, flushed);
            }
            Err(e) => warn!(
                "sluice failover: backend {}: zones not flushed: {e}",
                self.name
            ),
        }
    }

    /// The plan and references a flush brought back; `zones` is each
    /// zone's `(health, drained)`.
    fn set_view(&self, zones: &[(f64, bool)], panic: bool, flushed: Flushed) {
        for (z, m) in self.metrics.zones.iter().enumerate() {
            let share = self
                .ranked
                .iter()
                .position(|&r| r == z)
                .and_then(|r| flushed.shares.get(r).copied())
                .unwrap_or(0.0);
            m.share.set((share * 1000.0).round() as u64);
            if let Some(&(health, _)) = zones.get(z) {
                m.health.set((health * 1000.0).round() as u64);
            }
        }
        self.metrics.panic.set(u64::from(panic));
        let mut view = self.view.borrow_mut();
        view.shares = flushed.shares;
        view.references = flushed.references;
        view.drained = (0..self.specs.len())
            .map(|z| zones.get(z).is_some_and(|&(_, drained)| drained))
            .collect();
        view.panic = panic;
    }

    fn report(&self, events: &[Event]) {
        let zone = |z: usize| self.specs.get(z).map_or("?", |s| s.name.as_str());
        for event in events {
            match *event {
                Event::Spilling {
                    zone: z,
                    cause,
                    share,
                } => info!(
                    "sluice failover: backend {}: zone {} at {:.0}% health ({}): spilling",
                    self.name,
                    zone(z),
                    share * 100.0,
                    cause.as_str()
                ),
                Event::Drained { zone: z, cause } => {
                    if let Some(m) = self.metrics.zones.get(z) {
                        m.drains.inc();
                    }
                    warn!(
                        "sluice failover: backend {}: zone {} drained ({}): probes only",
                        self.name,
                        zone(z),
                        cause.as_str()
                    );
                }
                Event::Raised { zone: z, from, to } => {
                    if let Some(m) = self.metrics.zones.get(z) {
                        m.failbacks.inc();
                    }
                    info!(
                        "sluice failover: backend {}: zone {} back from {:.0}% to {:.0}% after {}s healthy",
                        self.name,
                        zone(z),
                        from * 100.0,
                        to * 100.0,
                        self.cfg.failback_after.as_secs()
                    );
                }
                Event::Panic(true) => warn!(
                    "sluice failover: backend {}: every zone drained: panic, spreading requests over all",
                    self.name
                ),
                Event::Panic(false) => {
                    info!("sluice failover: backend {}: panic over", self.name)
                }
            }
        }
    }

    /// A probe this worker may send now, if any (an old grant lapses).
    fn take_probe(&self, now: Timestamp) -> Option<usize> {
        let mut probes = self.probes.borrow_mut();
        let lapse = self.cfg.probe_interval;
        probes.retain(|&(_, at)| now.since(at) < lapse);
        (!probes.is_empty()).then(|| probes.remove(0).0)
    }
}

impl Failover {
    /// The capability, if some backend has failover on (its effective
    /// `[failover]`, the global section with its `[backend.failover]`) and
    /// zones to fail over between (more than one, with endpoints, under
    /// `[outlier]`).
    pub fn from_policy(policy: &Policy) -> Option<Self> {
        if policy.backends.iter().all(|b| b.failover.is_none()) {
            return None;
        }
        let node_zone = host::property_string(&["xds", "node", "locality", "zone"]);
        let backends: Vec<Option<Rc<Zoned>>> = policy
            .backends
            .iter()
            .map(|b| {
                let cfg = b.failover.as_ref()?;
                let outlier = b.outlier.as_ref()?;
                if b.zones.len() < 2 {
                    return None;
                }
                let mut endpoints: Vec<(String, usize)> = Vec::new();
                for (z, zone) in b.zones.iter().enumerate() {
                    for e in &zone.endpoints {
                        if !endpoints.iter().any(|(a, _)| a == e) {
                            endpoints.push((e.clone(), z));
                        }
                    }
                }
                if endpoints.is_empty() {
                    return None;
                }
                let specs: Vec<ZoneSpec> = b.zones.iter().map(ZoneSpec::from).collect();
                let ranked = order::rank(&b.zones, cfg, node_zone.as_deref());
                let names: Vec<&str> = ranked.iter().map(|&z| b.zones[z].name.as_str()).collect();
                info!(
                    "sluice failover: backend {}: zones in order {} (proxy zone {})",
                    b.name,
                    names.join(", "),
                    node_zone.as_deref().unwrap_or("unknown")
                );
                let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
                let n = specs.len();
                let mut shares = vec![0.0; ranked.len()];
                if let Some(first) = shares.first_mut() {
                    *first = 1.0;
                }
                Some(Rc::new(Zoned {
                    name: b.name.clone(),
                    key: failover::state_key(&b.name),
                    outlier_key: outlier::state_key(&b.name),
                    cfg: cfg.clone(),
                    latency: Latency::of(outlier),
                    metrics: BackendMetrics::define(&b.name, &names),
                    specs,
                    ranked,
                    endpoints,
                    view: RefCell::new(View {
                        shares,
                        drained: vec![false; n],
                        references: vec![None; n],
                        panic: false,
                    }),
                    tallies: RefCell::new(vec![ZoneTally::default(); n]),
                    probes: RefCell::new(Vec::new()),
                    flushed_at: Cell::new(Timestamp::ZERO),
                    admitted: Cell::new(0),
                }))
            })
            .collect();
        // A reloaded policy starts from the shared zone records (a zone
        // drained before the reload stays drained), not from a plan with
        // everything on the first zone until the first tick.
        let now = host::now();
        for z in backends.iter().flatten() {
            z.flush(now, false);
        }
        backends.iter().any(Option::is_some).then(|| Failover {
            policy: policy.clone(),
            backends,
            ticks: Cell::new(0),
        })
    }

    fn locate(&self, addr: &str) -> Option<(&Rc<Zoned>, usize)> {
        self.backends
            .iter()
            .flatten()
            .find_map(|z| z.zone_of(addr).map(|i| (z, i)))
    }
}

impl Capability for Failover {
    fn name(&self) -> &'static str {
        "failover"
    }

    fn reads_endpoint(&self) -> bool {
        true
    }

    fn reads_quota(&self) -> bool {
        true
    }

    fn reads_usage(&self) -> bool {
        self.backends
            .iter()
            .flatten()
            .any(|z| z.specs.iter().any(|s| s.tokens_per_minute.is_some()))
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
        for z in self.backends.iter().flatten() {
            // Only a worker that has requests claims probes: one granted to
            // an idle worker would lapse unsent.
            let busy = z.admitted.replace(0) > 0;
            z.flush(now, busy);
        }
    }

    fn attempt_tick(&self, now: Timestamp) {
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        let force = ticks.is_multiple_of(IDLE_FLUSH_TICKS);
        for z in self.backends.iter().flatten() {
            if force || z.tallies.borrow().iter().any(|t| !t.is_empty()) {
                z.flush(now, false);
            }
        }
    }

    fn admit(&self, admission: &mut Admission<'_>) -> Admitted {
        let zoned = admission
            .backend(&self.policy)
            .and_then(|b| self.policy.backends.iter().position(|p| p.name == b.name))
            .and_then(|i| self.backends.get(i))
            .and_then(Option::as_ref);
        let Some(z) = zoned else {
            return Admitted::pass();
        };
        z.admitted.set(z.admitted.get().saturating_add(1));
        let view = z.view.borrow();
        let (chosen, why) = match z.take_probe(admission.now) {
            Some(p) => (p, Why::Probe),
            None => match draw(&view.shares, admission.rand) {
                Some(r) => (
                    z.ranked[r],
                    if view.panic {
                        Why::Panic
                    } else if r == 0 {
                        Why::Preferred
                    } else {
                        Why::Spill
                    },
                ),
                None => return Admitted::pass(),
            },
        };
        // The chosen zone first, then every other zone the plan still
        // serves, best first (all of them in panic).
        let mut ranks: Vec<Rank> = vec![NO_ZONE; z.specs.len()];
        ranks[chosen] = 0;
        let mut next: Rank = 1;
        for &other in &z.ranked {
            if other != chosen && (view.panic || !view.drained.get(other).copied().unwrap_or(false))
            {
                ranks[other] = next;
                next = next.saturating_add(1).min(NO_ZONE - 1);
            }
        }
        admission.edits.zone_ranks = Some(ranks);
        if let Some(m) = z.metrics.zones.get(chosen) {
            m.requests.inc();
        }
        if why == Why::Probe {
            z.metrics.probes.inc();
        }
        Admitted {
            verdict: sluice_filter_common::engine::Verdict::Go,
            flow: Some(Box::new(FailoverFlow {
                zoned: Rc::clone(z),
                chosen,
                why,
            })),
        }
    }

    fn attempt(&self, attempt: &Attempt) {
        let Some((z, zone)) = attempt.endpoint.as_deref().and_then(|a| self.locate(a)) else {
            return;
        };
        let verdict = Verdict::of(attempt.status, attempt.flags);
        let ttft = attempt
            .first_byte
            .filter(|_| verdict == Verdict::Success)
            .map(|first| first.since(attempt.started).as_secs_f64() * 1000.0);
        let slow = ttft.and_then(|ms| {
            let reference = z.view.borrow().references.get(zone).copied().flatten();
            z.latency.judge(ms, reference)
        });
        let mut tallies = z.tallies.borrow_mut();
        let t = &mut tallies[zone];
        t.requests = t.requests.saturating_add(1);
        t.slow.push(slow);
        if let Some(ms) = ttft {
            t.first_token(ms);
        }
        match verdict {
            Verdict::Success => t.judge(attempt.started, false),
            Verdict::Failure | Verdict::Throttled => t.judge(attempt.started, true),
            Verdict::Unjudged => {}
        }
        t.reading = failover::Headroom::newer(t.reading, attempt.headroom);
        let failed = t.ends_in_failure();
        drop(tallies);
        // A failure on a zone in service is news for every worker now, not
        // at the next tick: a zone that starts failing every attempt is
        // drained as soon as the failures in a row (over all workers) add
        // up. At most one early flush per millisecond; a drained zone's
        // failed probes wait for the tick.
        let now = host::now();
        if failed
            && !z.view.borrow().drained.get(zone).copied().unwrap_or(true)
            && now.since(z.flushed_at.get()) >= EARLY_FLUSH_GAP
        {
            z.flush(now, false);
        }
    }
}

/// One request's zone, followed to its end.
struct FailoverFlow {
    zoned: Rc<Zoned>,
    chosen: usize,
    why: Why,
}

impl Flow for FailoverFlow {
    fn response_headers(
        &mut self,
        observation: &Observation,
        add: &mut Vec<(&'static str, String)>,
    ) {
        let z = &self.zoned;
        let Some(served) = observation
            .upstream_address
            .as_deref()
            .and_then(|a| z.zone_of(a))
        else {
            return;
        };
        let value = if served == self.chosen {
            format!("{}; reason={}", z.specs[served].name, self.why.as_str())
        } else {
            // The router's retry left the zone first chosen.
            format!(
                "{}; reason=retry; first={}/{}",
                z.specs[served].name,
                z.specs[self.chosen].name,
                self.why.as_str()
            )
        };
        add.push((ZONE_HEADER, value));
    }

    fn done(&mut self, observation: &mut Observation, _now: Timestamp) {
        let z = &self.zoned;
        if !z.specs.iter().any(|s| s.tokens_per_minute.is_some()) {
            return;
        }
        let served = observation
            .upstream_address
            .as_deref()
            .and_then(|a| z.zone_of(a));
        if let (Some(zone), Some(tokens)) = (served, observation.tokens_used()) {
            let mut tallies = z.tallies.borrow_mut();
            tallies[zone].tokens = tallies[zone].tokens.saturating_add(tokens);
        }
    }
}
