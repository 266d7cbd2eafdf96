//! The breaker's Envoy stats, one set per circuit (backend × model).
//!
//! Names carry their labels as dotted parts,
//! `sluice_breaker.<backend>.<model>.<metric>`, where `<model>` is the
//! policy's model pattern the request matched (or `other`): never a name a
//! client sent, so the number of series is fixed by the policy (backends ×
//! their model patterns + 1, times the metrics below). Every metric is
//! defined in `on_configure`, so a request never defines one.

use std::cell::Cell;

use sluice_core::breaker::{CircuitState, RejectReason, Transition};
use sluice_filter_common::{Counter, Gauge, Histogram, label};

/// The stats of one circuit.
pub struct CircuitMetrics {
    /// 0 closed, 1 open, 2 half-open.
    pub state: Gauge,
    /// The state this worker last saw (and set), so that a request that
    /// finds the state unchanged makes no host call for the gauge.
    seen_state: Cell<Option<u8>>,
    to_open: Counter,
    to_half_open: Counter,
    to_closed: Counter,
    rejected: [Counter; 4],
    /// Requests sent to the fallback model instead.
    pub fallback: Counter,
    /// Requests answered with the static answer.
    pub static_answer: Counter,
    /// Requests answered 503 by sluice.
    pub fail_fast: Counter,
    /// Requests waiting for a bulkhead slot (this worker's view of the
    /// shared queue, refreshed as it changes).
    pub queue_depth: Gauge,
    /// Time spent queued by requests that got a slot, ms.
    pub queue_wait_ms: Histogram,
}

impl CircuitMetrics {
    pub fn define(backend: &str, model: &str) -> Self {
        let prefix = format!("sluice_breaker.{}.{}", label(backend), label(model));
        let counter = |name: &str| Counter::define(&format!("{prefix}.{name}"));
        Self {
            state: Gauge::define(&format!("{prefix}.state")),
            seen_state: Cell::new(None),
            to_open: counter("transition.open"),
            to_half_open: counter("transition.half_open"),
            to_closed: counter("transition.closed"),
            rejected: RejectReason::ALL.map(|r| counter(&format!("rejected.{}", r.as_str()))),
            fallback: counter("degraded.fallback_model"),
            static_answer: counter("degraded.static"),
            fail_fast: counter("degraded.fail_fast"),
            queue_depth: Gauge::define(&format!("{prefix}.queue_depth")),
            queue_wait_ms: Histogram::define(&format!("{prefix}.queue_wait_ms")),
        }
    }

    pub fn transition(&self, t: Transition) {
        match t.to {
            CircuitState::Open => self.to_open.inc(),
            CircuitState::HalfOpen => self.to_half_open.inc(),
            CircuitState::Closed => self.to_closed.inc(),
        }
        self.set_state(t.to);
    }

    /// Sets the state gauge (the root's periodic refresh, a transition).
    pub fn set_state(&self, state: CircuitState) {
        self.seen_state.set(Some(state.code()));
        self.state.set(u64::from(state.code()));
    }

    /// Sets the state gauge if this worker last saw another state. The
    /// gauge is one for all workers; a change another worker made is set by
    /// that worker (with its transition), and the root refreshes the gauge
    /// from shared data about every second, which bounds any disagreement.
    pub fn observe_state(&self, state: CircuitState) {
        if self.seen_state.get() != Some(state.code()) {
            self.set_state(state);
        }
    }

    pub fn rejected(&self, reason: RejectReason) {
        let index = RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(counter) = self.rejected.get(index) {
            counter.inc();
        }
    }
}
