//! Zone and region failover that reads more than ejections.
//!
//! LLM capacity is zonal and scarce, and a zone fails in ways `/health`
//! does not show: every inference answers 503, the GPUs slow down, the
//! account's quota in that region runs out. Envoy's priorities move
//! traffic only when outlier detection ejects hosts; here each zone of a
//! backend gets a health in [0, 1] ([`zone`]), the product of
//!
//! - its endpoints in rotation ([`crate::outlier`]'s ejections and 429
//!   benches),
//! - one minus the failure share of its recent attempts (5xx, resets,
//!   timeouts and 429s, over [`zone::ERROR_WINDOW`]),
//! - its quota headroom: the provider's own rate-limit headers
//!   ([`quota`]) and this proxy's use of the zone's `requests_per_minute`
//!   / `tokens_per_minute`, each full up to `max_utilization` and falling to
//!   0 at 100%, so traffic moves *before* the provider refuses,
//! - its latency: 0 when its time to first token is an outlier against the
//!   best other zone's over [`zone::REFERENCE_WINDOW`] (the backend's
//!   `[outlier]` factor and floor).
//!
//! The share a zone is granted follows its health down at once and back up
//! only to a level it held for `failback_after`, at most once per
//! `failback_after` (hysteresis, a minimum dwell). New requests split over
//! the zones in preference order ([`order::rank`]) like Envoy's priority
//! load ([`plan::shares`]); a drained zone gets one probe request per
//! `probe_interval` (per proxy), and when every reachable zone is drained,
//! requests spread over all of them (panic).
//!
//! # Where the state lives
//!
//! Like the outlier records: each worker tallies its attempts per zone
//! ([`ZoneTally`]) and folds them into the backend's [`FailoverState`] in
//! shared data on its tick, with one compare-and-swap that also judges the
//! zones and moves the shares. Requests are planned from the copy the tick
//! returned: no shared-data call on the request path.

pub mod order;
pub mod plan;
pub mod quota;
pub mod zone;

pub use quota::{Headroom, headroom};
pub use zone::{
    Cause, DRAINED, Event, FailoverState, Flushed, LEVELS, Latency, ZoneInputs, ZoneRecord,
    ZoneSpec, ZoneTally, inputs,
};

/// Response header naming the zone that served a request and why.
pub const ZONE_HEADER: &str = "x-sluice-zone";

/// The shared-data key of a backend's zone records.
pub fn state_key(backend: &str) -> String {
    format!("failover/{backend}")
}

#[cfg(test)]
mod tests;
