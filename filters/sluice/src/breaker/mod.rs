//! Circuit breaking, bulkheads and graceful degradation (`[breaker]`): the
//! engine's hooks over `sluice_core::breaker` (whose module docs explain the
//! algorithms). It asks the shared circuit and bulkhead of the request's
//! backend × model whether it may go, does what the policy says when it may
//! not, and tells the circuit how the call went.
//!
//! # A request's way
//!
//! 1. **Admitted** (the engine has read the body and routed the request;
//!    a body larger than `max_body` is judged by its headers alone and
//!    cannot be rerouted): the circuit of its backend × model pattern
//!    (admit), then the bulkhead (a slot, a place in the queue, or full).
//!    Refused:
//!    `degrade` — a local 503, a static answer (JSON or SSE per the
//!    request's `stream`), or a reroute: `model` rewritten in the body,
//!    `x-sluice-backend` set to the fallback backend, whose own circuit and
//!    bulkhead are asked first (if they refuse too, 503).
//! 2. **Queued**: the request stays paused ([`Verdict::Wait`](sluice_filter_common::engine::Verdict::Wait)). The
//!    capability ticks every [`TICK`] (20 ms) and polls the queue for each
//!    waiting request on its worker: a freed slot resumes it within one tick (the wake-up bound is
//!    the tick period plus the time the slot's holder takes to release it);
//!    after `max_wait` it is answered (fail-fast or static; a fallback
//!    policy answers 503 here, see [`flow`]).
//! 3. **Done** (the engine's observation: status, `response.flags`, time
//!    to first byte and per streamed event, upstream address):
//!    `classify` judges the call and the circuit records it with
//!    its probe ticket; the bulkhead slot is released. A stream holds its
//!    slot until then; the tick renews slot and probe leases of long
//!    streams, and a stream that never ends (or a worker that dies) loses
//!    them when the leases run out, so nothing stays stuck.
//!
//! # Scope `endpoint`
//!
//! With `scope = "endpoint"` each endpoint of a backend has its own circuit
//! (its static endpoints from the policy, plus one `other` for endpoints the
//! policy does not list). The endpoint is picked by Envoy's load balancer
//! *after* this filter, so admission cannot ask the right circuit: a request
//! is let through when any endpoint's circuit admits it and turned away when
//! all of them refuse (the backend as a whole is down), and its outcome is
//! recorded on the circuit of the endpoint it reached (`upstream.address`
//! when done). Steering requests away from one open endpoint is the outlier
//! filter's job (`override_host`), not the breaker's.
//!
//! # State and metrics
//!
//! Circuits and bulkheads live in proxy-wasm shared data (one state for all
//! worker VMs), keyed `sluice_breaker/<backend>/<model pattern>/...`: the
//! key set is fixed by the policy, never by what clients send. When shared
//! data fails (host error, persistent contention) the request is admitted:
//! the breaker protects nothing rather than refuse everything. Metrics are
//! described in [`metrics`].

mod flow;
mod metrics;
mod plan;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use sluice_core::breaker::{Bulkhead, Circuit};
use sluice_core::config::{BreakerScope, Policy};
use sluice_core::draw::unit;
use sluice_core::time::Timestamp;
use sluice_filter_common::STATE;
use sluice_filter_common::engine::{Admission, Admitted, Capability, Flow, Observation, Wake};

use flow::BreakerFlow;
use plan::Plan;

/// The capability's tick: bounds how long a queued request waits after a
/// slot frees, and paces lease renewals.
pub const TICK: Duration = Duration::from_millis(20);

/// Ticks between refreshes of the circuit state gauges (about a second), so
/// an open circuit whose time is up reads half-open without traffic.
const GAUGE_REFRESH_TICKS: u32 = 50;

/// Flows the tick serves (queued, or holding leases), by context id.
type Registry = RefCell<BTreeMap<u32, Rc<RefCell<BreakerFlow>>>>;

/// The `[breaker]` capability of one policy.
pub struct Breaker {
    plan: Rc<Plan>,
    flows: Rc<Registry>,
    ticks: Cell<u32>,
}

impl Breaker {
    /// The capability, if some backend of the policy has a breaker.
    pub fn from_policy(policy: &Policy) -> Option<Self> {
        let plan = Plan::new(policy.clone());
        plan.any_guarded().then(|| Breaker {
            plan: Rc::new(plan),
            flows: Rc::new(RefCell::new(BTreeMap::new())),
            ticks: Cell::new(0),
        })
    }

    /// Sets each circuit's state gauge from the shared state.
    fn refresh_gauges(&self, now: Timestamp) {
        for guarded in self.plan.guarded.iter().flatten() {
            for slot in &guarded.circuits {
                if let Some(key) = slot.circuit_keys.first() {
                    let circuit: Circuit = STATE.read(key).unwrap_or_default();
                    slot.metrics.set_state(circuit.state(now));
                }
                let bulkhead: Bulkhead = STATE.read(&slot.bulkhead_key).unwrap_or_default();
                slot.metrics
                    .queue_depth
                    .set(u64::from(bulkhead.queue_len()));
            }
        }
    }
}

impl Capability for Breaker {
    fn name(&self) -> &'static str {
        "breaker"
    }

    fn reads_flags(&self) -> bool {
        true
    }

    fn reads_endpoint(&self) -> bool {
        self.plan
            .policy
            .backends
            .iter()
            .filter_map(|b| b.breaker.as_ref())
            .any(|b| b.scope == BreakerScope::Endpoint)
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(TICK)
    }

    fn admit(&self, admission: &mut Admission<'_>) -> Admitted {
        let mut flow = BreakerFlow::new(
            Rc::clone(&self.plan),
            admission.context_id,
            admission.request,
        );
        let verdict = flow.admit(
            admission.request,
            admission.edits,
            admission.now,
            admission.rand,
        );
        if flow.phase == flow::Phase::Passthrough {
            return Admitted {
                verdict,
                flow: None,
            };
        }
        let needs_tick = flow.needs_tick();
        let shared = Rc::new(RefCell::new(flow));
        if needs_tick {
            self.flows
                .borrow_mut()
                .insert(admission.context_id, Rc::clone(&shared));
        }
        Admitted {
            verdict,
            flow: Some(Box::new(Handle {
                flow: shared,
                flows: Rc::clone(&self.flows),
                // Seeded from the engine's draw (its VM's generator, seeded
                // by the clock), so proxies do not share open-time jitter.
                rng: admission.rand.to_bits() | 1,
            })),
        }
    }

    fn tick(&self, now: Timestamp, wake: &mut dyn FnMut(u32, Wake)) {
        let flows: Vec<Rc<RefCell<BreakerFlow>>> = self.flows.borrow().values().cloned().collect();
        for shared in flows {
            let mut flow = shared.borrow_mut();
            if let Some(w) = flow.on_tick(now) {
                wake(flow.context_id, w);
            }
            if !flow.needs_tick() {
                self.flows.borrow_mut().remove(&flow.context_id);
            }
        }
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        if ticks.is_multiple_of(GAUGE_REFRESH_TICKS) {
            self.refresh_gauges(now);
        }
    }

    fn forget(&self, context_id: u32) {
        self.flows.borrow_mut().remove(&context_id);
    }
}

/// The engine's view of one request's breaker flow.
struct Handle {
    flow: Rc<RefCell<BreakerFlow>>,
    flows: Rc<Registry>,
    rng: u64,
}

impl Flow for Handle {
    fn done(&mut self, observation: &mut Observation, now: Timestamp) {
        let rand = unit(&mut self.rng);
        let mut flow = self.flow.borrow_mut();
        self.flows.borrow_mut().remove(&flow.context_id);
        if flow.phase != flow::Phase::Done {
            flow.finish(observation, now, rand);
        }
    }
}
