//! Outlier detection and endpoint picking that understand LLM servers.
//!
//! An LLM endpoint rarely dies cleanly: it stays up while its GPU stalls,
//! its KV cache fills (429s) or it streams five times slower than its
//! peers. Envoy ejects on errors only. Here every attempt on an endpoint
//! (retries included, seen by the engine's per-attempt instance) feeds:
//!
//! - its outcome ([`Verdict`]: success, failure, throttled by a 429, or
//!   unjudged when the client left first), its time to first token, and on
//!   streams its time per output token (the stream's length after the first
//!   token over its output tokens, so a long completion is not a slow host);
//! - decaying estimates ([`estimate`]) rather than bucketed windows or
//!   histograms: small, mergeable by addition, and the detectors need
//!   means and counts, not quantiles;
//! - detectors ([`detect`]), each optional: consecutive failures, failure
//!   share, success rate against peers (mean − k·σ, as Envoy), latency
//!   against the peers' median (first token and per token, above a floor),
//!   and phi accrual on a busy endpoint's gaps between successes;
//! - a 429 benches its endpoint until the reset time it names
//!   ([`reset::cooldown`]);
//! - ejection ([`EndpointRecord::eject`]) for `base × recent ejections`,
//!   capped and jittered, at most `max_ejection` of the endpoints and never
//!   the last; return through a bounded number of probe requests.
//!
//! Picking ([`pick`]) is the other half: a request goes to the cheaper of
//! two random endpoints in rotation (latency × load), followed by the rest
//! as fallbacks for the router's retries.
//!
//! # Where the state lives
//!
//! A worker records attempts in its own [`Tally`] per endpoint (no shared
//! call on the request path); its tick folds them into the backend's
//! [`BackendState`] in shared data, with one compare-and-swap, runs the
//! detectors there, and keeps a copy to pick from until the next tick. A
//! 429 is written at once. The key set is one key per backend, its
//! records bounded by the policy's endpoints.

pub mod backend;
pub mod detect;
pub mod estimate;
pub mod pick;
pub mod record;
pub mod reset;
pub mod tally;

pub use backend::{BackendState, Event, ZoneHealth};
pub use detect::Reason;
pub use pick::{Candidate, Choice, PickReason, Standing, peers, pick};
pub use record::{EndpointRecord, Health};
pub use tally::{Run, Tally, Verdict, is_slow};

use crate::time::Timestamp;

/// The request header an `override_host` cluster reads the endpoints from
/// (the Gateway API Inference Extension's name).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// The shared-data key of a backend's endpoint records.
pub fn state_key(backend: &str) -> String {
    format!("outlier/{backend}")
}

/// What the picker sees of a backend at `now`.
pub fn candidates(state: &BackendState, now: Timestamp) -> Vec<Candidate> {
    state
        .endpoints
        .iter()
        .map(|r| Candidate {
            addr: r.addr.clone(),
            standing: match r.health {
                _ if now < r.throttled_until => Standing::Out,
                Health::Healthy => Standing::InRotation,
                Health::Probing { .. } => Standing::Probe,
                Health::Ejected { .. } => Standing::Out,
            },
            ttft_ms: r.ttft.mean(),
            ttft_weight: r.ttft.weight,
            tpot_ms: r.tpot.mean(),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
