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

use sluice_core::breaker::ClosedCache;
use sluice_core::config::{Backend, BreakerConfig, BreakerMode, BreakerScope, Policy};

use super::metrics::CircuitMetrics;

/// Shared-data key prefix; keys are scoped by vm_id already.
const PREFIX: &str = "sluice_breaker";

/// The name of the catch-all circuit of a backend.
pub const OTHER: &str = "other";

/// The configuration every request of one policy shares.
pub struct Plan {
    pub policy: Policy,
    /// Aligned with `policy.backends`; `None` where the breaker is off.
    pub guarded: Vec<Option<Guarded>>,
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
        Self { policy, guarded }
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
