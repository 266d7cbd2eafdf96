//! The policy, compiled once per configuration into what a request needs:
//! for each backend with a breaker, its circuits (one per model pattern of
//! the backend, plus `other`), their shared-data keys and their metrics.
//!
//! Circuits are keyed by the backend's model *pattern*, not by the model a
//! client names: `gpt-4o-2024-*` is one circuit however many dated names
//! match it, and a model no pattern matches (a request routed to the backend
//! by an explicit route or as the default) shares the backend's `other`
//! circuit. Shared data has no delete, so the key set must be bounded by the
//! policy, never by clients.

use std::cell::Cell;
use std::time::Duration;

use sluice_core::config::{Backend, BreakerConfig, BreakerMode, BreakerScope, Policy};
use sluice_core::time::Timestamp;

use crate::metrics::CircuitMetrics;

/// Bodies are buffered up to this when the policy has no `[tokens] max_body`
/// (the same 1 MiB default); a larger body is judged by its headers alone.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// Shared-data key prefix; keys are scoped by vm_id already.
const PREFIX: &str = "sluice_breaker";

/// The name of the catch-all circuit of a backend.
pub const OTHER: &str = "other";

/// How long a worker trusts its last reading of a circuit as closed: within
/// this, an admission on that circuit reads no shared data (see
/// [`ClosedCache`]).
pub const CLOSED_FRESH_FOR: Duration = Duration::from_millis(20);

/// The configuration every request of one policy shares.
pub struct Plan {
    pub policy: Policy,
    /// Aligned with `policy.backends`; `None` where the breaker is off.
    pub guarded: Vec<Option<Guarded>>,
    pub max_body: u64,
}

/// A backend the breaker protects.
pub struct Guarded {
    pub cfg: BreakerConfig,
    pub circuits: Vec<CircuitSlot>,
    /// With `scope = "endpoint"`: the backend's static endpoints, then
    /// `other` for any endpoint the policy does not list (EDS, Istio).
    pub endpoints: Vec<String>,
    /// Whether a closed circuit's admission leaves its state unchanged (not
    /// `adaptive`, which counts requests), so [`ClosedCache`] may skip it.
    pub cacheable: bool,
}

/// One backend × model: its circuit(s), bulkhead and metrics.
pub struct CircuitSlot {
    /// The circuit's key (scope `backend-model`), or one key per entry of
    /// [`Guarded::endpoints`] (scope `endpoint`).
    pub circuit_keys: Vec<String>,
    pub bulkhead_key: String,
    pub metrics: CircuitMetrics,
    /// Aligned with `circuit_keys`: when this worker last read each circuit
    /// as closed.
    pub closed: Vec<ClosedCache>,
}

/// This worker's last reading of one circuit as closed, so that admissions
/// on a healthy circuit skip the shared-data read and decode.
///
/// # Why the staleness is safe
///
/// In `consecutive` and `rate` mode a closed circuit's admission changes
/// nothing: it only reads the state, to learn whether the circuit is still
/// closed. The state a worker relies on is at most [`CLOSED_FRESH_FOR`]
/// (20 ms) old, and is refreshed for free by every outcome the worker
/// records (`on_log` reads and writes the shared circuit anyway). Opening is
/// never cached: the worker that sees the failure that trips the circuit
/// writes the open state to shared data at once, and is itself told by
/// that write; every other worker reads it within 20 ms or at its next
/// completion, whichever is first. So after a trip, at most 20 ms of
/// admissions on other workers go through (the same order as the requests
/// already in flight when it tripped, which the circuit never stopped
/// either). A worker that records a failure forgets its reading, so its next
/// admission reads shared data. Only `Closed` is cached: open and half-open
/// admissions (probe slots, open-time ends) always go through shared data,
/// and so does every admission in `adaptive` mode, which counts requests.
#[derive(Default)]
pub struct ClosedCache {
    read_at: Cell<Option<Timestamp>>,
}

impl ClosedCache {
    /// Whether the circuit was read as closed less than [`CLOSED_FRESH_FOR`]
    /// ago (a clock that went back invalidates the reading).
    pub fn is_fresh(&self, now: Timestamp) -> bool {
        self.read_at
            .get()
            .is_some_and(|at| now >= at && now.since(at) < CLOSED_FRESH_FOR)
    }

    /// Records a shared-data reading: closed (at `now`) or not.
    pub fn observe(&self, closed: bool, now: Timestamp) {
        self.read_at.set(closed.then_some(now));
    }

    /// Forgets the reading: the next admission reads shared data.
    pub fn forget(&self) {
        self.read_at.set(None);
    }
}

/// Where a request is judged: backend index × circuit index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub backend: usize,
    pub circuit: usize,
}

impl Plan {
    pub fn new(policy: Policy) -> Self {
        let guarded = policy
            .backends
            .iter()
            .map(|b| b.breaker.clone().map(|cfg| Guarded::new(b, cfg)))
            .collect();
        let max_body = policy
            .tokens
            .as_ref()
            .map_or(DEFAULT_MAX_BODY, |t| t.max_body.0);
        Self {
            policy,
            guarded,
            max_body,
        }
    }

    /// Whether a request judged for `backend` must name it in
    /// `x-sluice-backend` for Envoy to route it there. Without the header
    /// Envoy's table (as `sluice render` writes it) tries the policy's
    /// explicit routes, then the default backend; only when there are no
    /// explicit routes and the backend is the default is the header moot.
    pub fn needs_pin(&self, backend: &str) -> bool {
        !self.policy.routes.is_empty() || backend != self.policy.default_backend
    }

    /// Whether any backend has a breaker.
    pub fn any_guarded(&self) -> bool {
        self.guarded.iter().any(Option::is_some)
    }

    /// The circuit a request to `backend` (by name) for `model` is judged
    /// by; `None` when that backend has no breaker.
    pub fn target(&self, backend: &str, model: &str) -> Option<Target> {
        let index = self
            .policy
            .backends
            .iter()
            .position(|b| b.name == backend)?;
        let b = self.policy.backends.get(index)?;
        let guarded = self.guarded.get(index)?.as_ref()?;
        let circuit = b
            .models
            .iter()
            .position(|p| p.matches(model))
            .unwrap_or(guarded.circuits.len().saturating_sub(1));
        Some(Target {
            backend: index,
            circuit,
        })
    }

    pub fn guarded(&self, target: Target) -> Option<&Guarded> {
        self.guarded.get(target.backend)?.as_ref()
    }

    pub fn slot(&self, target: Target) -> Option<&CircuitSlot> {
        self.guarded(target)?.circuits.get(target.circuit)
    }
}

impl Guarded {
    fn new(backend: &Backend, cfg: BreakerConfig) -> Self {
        let mut endpoints = Vec::new();
        if cfg.scope == BreakerScope::Endpoint {
            for zone in &backend.zones {
                for e in &zone.endpoints {
                    if !endpoints.contains(e) {
                        endpoints.push(e.clone());
                    }
                }
            }
            endpoints.push(OTHER.to_string());
        }
        let models = backend
            .models
            .iter()
            .map(|p| p.as_str().to_string())
            .chain(std::iter::once(OTHER.to_string()));
        let circuits = models
            .map(|model| {
                let base = format!("{PREFIX}/{}/{model}", backend.name);
                let circuit_keys = if endpoints.is_empty() {
                    vec![format!("{base}/circuit")]
                } else {
                    endpoints
                        .iter()
                        .map(|e| format!("{base}/circuit/{e}"))
                        .collect()
                };
                CircuitSlot {
                    metrics: CircuitMetrics::define(&backend.name, &model),
                    bulkhead_key: format!("{base}/bulkhead"),
                    closed: circuit_keys
                        .iter()
                        .map(|_| ClosedCache::default())
                        .collect(),
                    circuit_keys,
                }
            })
            .collect();
        Self {
            cacheable: !matches!(cfg.mode, BreakerMode::Adaptive { .. }),
            cfg,
            circuits,
            endpoints,
        }
    }

    /// The index of `address` among the endpoints (`other` when unlisted);
    /// 0 with scope `backend-model` (one circuit).
    pub fn endpoint_index(&self, address: Option<&str>) -> usize {
        if self.endpoints.is_empty() {
            return 0;
        }
        address
            .and_then(|a| self.endpoints.iter().position(|e| e == a))
            .unwrap_or(self.endpoints.len().saturating_sub(1))
    }
}
