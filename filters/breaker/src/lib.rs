//! sluice's circuit breaker, bulkhead and graceful degradation filter.
//!
//! A thin adapter between Envoy's callbacks and `sluice_core::breaker`
//! (whose module docs explain the algorithms): it finds out which circuit a
//! request belongs to, asks the shared circuit and bulkhead whether it may
//! go, does what the policy says when it may not, and tells the circuit how
//! the call went.
//!
//! # A request's way
//!
//! 1. **Request headers.** A client-sent `x-sluice-backend` is removed (the
//!    route table matches it; only sluice may set it). Requests that are not
//!    LLM calls (`ApiShape::Other`: `/v1/models`, health checks) pass
//!    untouched. The others are held until their body is complete, because
//!    the model (and so the backend and the circuit) and the stream flag
//!    (the shape of a static answer) are written in it. A body larger than
//!    `[tokens] max_body` (1 MiB without a `[tokens]` section) is not
//!    buffered: such a request is judged by its headers alone (model header
//!    or default) and cannot be rerouted (its body cannot be rewritten).
//! 2. **Judged** (body complete): the backend by `Policy::route` (explicit
//!    routes, then models, then the default), pinned with `x-sluice-backend`
//!    so Envoy routes where the circuit was asked; then the circuit (admit),
//!    then the bulkhead (a slot, a place in the queue, or full). Refused:
//!    `degrade` — a local 503, a static answer (JSON or SSE per the
//!    request's `stream`), or a reroute: `model` rewritten in the body,
//!    `x-sluice-backend` set to the fallback backend, whose own circuit and
//!    bulkhead are asked first (if they refuse too, 503).
//! 3. **Queued**: the request stays paused. The root context ticks every
//!    [`TICK`] (20 ms) and polls the queue for each waiting request on its
//!    worker: a freed slot resumes it within one tick (the wake-up bound is
//!    the tick period plus the time the slot's holder takes to release it);
//!    after `max_wait` it is answered (fail-fast or static; a fallback
//!    policy answers 503 here, see [`flow`]).
//! 4. **Response**: `:status` from the headers; time to first token from
//!    the moment the request was let go to the first body byte; on SSE
//!    responses the `data:` events are counted as they pass (nothing is held
//!    back) for the mean time per output token.
//! 5. **End** (`on_log`, which Envoy also runs after resets and local
//!    replies): Envoy's `response.flags` adds resets, timeouts and connect
//!    failures; `classify` judges the call and the circuit records it with
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
//! recorded on the circuit of the endpoint it reached (`upstream.address` at
//! `on_log`). Steering requests away from one open endpoint is the outlier
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
mod host;
mod metrics;
mod plan;
mod shared;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_core::breaker::{Bulkhead, Circuit};
use sluice_filter_common::{load_policy, now};

use flow::{Flow, Next, Phase, TickAction};
use plan::Plan;

const FILTER: &str = "sluice_breaker";

/// The root context's tick: bounds how long a queued request waits after a
/// slot frees, and paces lease renewals.
pub const TICK: Duration = Duration::from_millis(20);

/// Ticks between refreshes of the circuit state gauges (about a second), so
/// an open circuit whose time is up reads half-open without traffic.
const GAUGE_REFRESH_TICKS: u32 = 50;

proxy_wasm::main! {{
    sluice_filter_common::panic::install(FILTER);
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BreakerRoot::new()) });
}}

/// What the root context and every request of one VM share.
struct Vm {
    /// Requests the tick serves (queued, or holding leases), by context id.
    /// Kept across reconfigurations: each flow carries its own plan.
    flows: RefCell<BTreeMap<u32, Rc<RefCell<Flow>>>>,
    /// xorshift64* state: jitter and adaptive throttling draws.
    rng: Cell<u64>,
}

impl Vm {
    /// A uniform draw in `[0, 1)`. Not cryptographic: it spreads open times
    /// and sheds load, nothing more.
    fn rand(&self) -> f64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        let bits = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        bits as f64 / (1u64 << 53) as f64
    }
}

struct BreakerRoot {
    vm: Rc<Vm>,
    plan: Option<Rc<Plan>>,
    ticks: u32,
}

impl BreakerRoot {
    fn new() -> Self {
        let seed = now().as_nanos() | 1;
        Self {
            vm: Rc::new(Vm {
                flows: RefCell::new(BTreeMap::new()),
                rng: Cell::new(seed),
            }),
            plan: None,
            ticks: 0,
        }
    }

    /// Sets each circuit's state gauge from the shared state.
    fn refresh_gauges(&self) {
        let Some(plan) = &self.plan else {
            return;
        };
        let now = now();
        for guarded in plan.guarded.iter().flatten() {
            for slot in &guarded.circuits {
                if let Some(key) = slot.circuit_keys.first() {
                    let circuit: Circuit = shared::read(key);
                    slot.metrics.set_state(circuit.state(now));
                }
                let bulkhead: Bulkhead = shared::read(&slot.bulkhead_key);
                slot.metrics
                    .queue_depth
                    .set(u64::from(bulkhead.queue_len()));
            }
        }
    }
}

impl Context for BreakerRoot {}

impl RootContext for BreakerRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        )
        .ok()
        .flatten();
        let Some(policy) = load_policy(FILTER, bytes.as_deref()) else {
            return false;
        };
        let plan = Plan::new(policy);
        if !plan.any_guarded() {
            log::warn!(
                "{FILTER}: no backend has a breaker ([breaker] absent or disabled): requests pass unjudged"
            );
        }
        self.plan = Some(Rc::new(plan));
        let _ = hostcalls::set_tick_period(TICK);
        true
    }

    fn on_tick(&mut self) {
        let now = now();
        let flows: Vec<Rc<RefCell<Flow>>> = self.vm.flows.borrow().values().cloned().collect();
        for flow in flows {
            // Decide with the flow borrowed; call the host with it released
            // (a resumed or answered stream may call back into its context).
            let (id, action) = {
                let mut f = flow.borrow_mut();
                (f.context_id, f.on_tick(now))
            };
            match action {
                TickAction::Nothing => {}
                TickAction::Resume => {
                    if hostcalls::set_effective_context(id).is_ok() {
                        let _ = hostcalls::resume_http_request();
                    }
                }
                TickAction::Reply(reply) => {
                    if hostcalls::set_effective_context(id).is_ok() {
                        host::send_reply(reply.status, &reply.headers, &reply.body);
                    }
                }
            }
            if !flow.borrow().needs_tick() {
                self.vm.flows.borrow_mut().remove(&id);
            }
        }
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(GAUGE_REFRESH_TICKS) {
            self.refresh_gauges();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plan = self.plan.clone()?;
        Some(Box::new(BreakerHttp {
            vm: Rc::clone(&self.vm),
            flow: Rc::new(RefCell::new(Flow::new(plan, context_id))),
        }))
    }
}

struct BreakerHttp {
    vm: Rc<Vm>,
    flow: Rc<RefCell<Flow>>,
}

impl BreakerHttp {
    /// Judges the request; registers it with the tick if it needs one.
    fn decide(&mut self, body: Option<&[u8]>) -> Action {
        let rand = self.vm.rand();
        let next = self.flow.borrow_mut().decide(body, now(), rand);
        self.track();
        match next {
            Next::Continue => Action::Continue,
            Next::Hold => Action::Pause,
        }
    }

    fn track(&self) {
        let flow = self.flow.borrow();
        if flow.needs_tick() {
            self.vm
                .flows
                .borrow_mut()
                .insert(flow.context_id, Rc::clone(&self.flow));
        }
    }

    fn finish(&mut self) {
        let rand = self.vm.rand();
        let id = {
            let mut flow = self.flow.borrow_mut();
            if flow.phase != Phase::Done {
                flow.finish(now(), rand);
            }
            flow.context_id
        };
        self.vm.flows.borrow_mut().remove(&id);
    }
}

impl Context for BreakerHttp {
    fn on_done(&mut self) -> bool {
        // Envoy runs on_log first; this only matters if it did not.
        self.finish();
        true
    }
}

impl HttpContext for BreakerHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if !self.flow.borrow_mut().on_request_headers() {
            return Action::Continue;
        }
        let max_body = self.flow.borrow().plan.max_body;
        let length =
            host::request_header("content-length").and_then(|l| l.trim().parse::<u64>().ok());
        if end_of_stream || length.is_some_and(|l| l > max_body) {
            return self.decide(None);
        }
        // Held until the body says which model and whether it streams.
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (phase, max_body) = {
            let flow = self.flow.borrow();
            (flow.phase, flow.plan.max_body)
        };
        match phase {
            Phase::Reading => {}
            // Queued or answered: the body waits with the request (Envoy
            // buffers it while the filter holds the stream).
            Phase::Queued | Phase::Replied => return Action::Pause,
            _ => return Action::Continue,
        }
        if u64::try_from(body_size).unwrap_or(u64::MAX) > max_body {
            return self.decide(None);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::request_body(body_size).unwrap_or_default();
        self.decide(Some(&body))
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.flow
            .borrow_mut()
            .on_response_headers(end_of_stream, now);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.flow.borrow_mut().on_response_body(body_size, now);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}
