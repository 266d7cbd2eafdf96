//! Adaptive circuit breaking, bulkheads and graceful degradation.
//!
//! An LLM backend fails differently from a web service: it is either down
//! (5xx, resets, refused connections), overloaded (429s, a time to first
//! token that climbs from one second to thirty) or slow to stream. Retrying
//! into it makes things worse, and every queued request holds a GPU's worth
//! of patience. This module decides, per backend × model, when to stop
//! sending, how to find out it is safe again, how many requests may be in
//! flight at once, and what a turned-away client gets instead.
//!
//! Everything here is a value: [`Circuit`] and [`Bulkhead`] serialize small
//! (MessagePack via rmp-serde) so a filter can keep one per key in
//! proxy-wasm shared data and update it with compare-and-swap
//! ([`crate::shared::SharedState::modify`], which writes only what
//! changed: most admissions only read a closed circuit); all Envoy worker
//! VMs then open and close circuits together. No method reads a clock or a random source: the
//! filter passes `now` and a uniform draw `rand ∈ [0, 1)`, so tests replay
//! any schedule exactly.
//!
//! # The circuit
//!
//! ```text
//!            trip (mode's rule)              open time up (on next admit)
//!   Closed ────────────────────────▶ Open ───────────────────────────────▶ HalfOpen
//!     ▲                               ▲                                      │
//!     │  half_open_probes successes   │        any probe fails               │
//!     └───────────────────────────────┼──────────────────────────────────────┤
//!                                     └──────────────────────────────────────┘
//! ```
//!
//! **Trip rules** (`[breaker] mode`):
//!
//! - `consecutive`: N failures in a row. Cheap and obvious; a backend that
//!   fails one call in two never trips it, which is why it is not the default.
//! - `rate` (resilience4j's model): the failure share or the slow-call share
//!   over a sliding window reaches its threshold, once the window holds at
//!   least `min_calls`. A call window of `n ≤ 1024` calls is a ring of two
//!   bits per call, exact; longer call windows use 64 buckets of `n/64`
//!   calls (exact to one bucket); a time window uses buckets of one second,
//!   or `window/60` beyond a minute, so never more than 60 buckets. See
//!   [`window`] for sizes. Slow calls count here only: in `consecutive`
//!   mode only failures do.
//! - `adaptive` (the SRE book's client-side throttling, Envoy's
//!   `admission_control`): no open state at all. Each request is rejected
//!   with probability `max(0, (requests − k·accepts) / (requests + 1))`
//!   over the window, capped at `max_reject`, so load sheds in proportion
//!   to how much the backend refuses and some traffic always passes to
//!   notice recovery. Requests count when admitted or rejected (as the book
//!   says: the client's own rejections keep the pressure up), accepts when a
//!   call ends without a listed failure.
//!
//! **Open time** grows on repeated trips: `open_for × backoff^(trips−1)`,
//! capped at `max_open_for`, then spread by ± `jitter` (the caller's draw)
//! so that many proxies do not probe in lock-step. The trip count falls
//! back to zero once the circuit has stayed closed for `max_open_for`: a
//! backend that flaps keeps its long open times, one that recovered for
//! good starts again from `open_for`.
//!
//! **Half-open** admits at most `half_open_probes` probes at a time; each
//! carries a [`ProbeTicket`] back to [`Circuit::record`]. The circuit
//! closes when `half_open_probes` probes have succeeded, and re-opens (one
//! back-off step longer) at the first failed probe (in `rate` mode a slow
//! probe fails too). All must succeed because a probe is expensive
//! evidence: an LLM call that works once in five is not a recovered
//! backend. A probe whose request never reports (a stream that never ends,
//! a worker that died) holds its slot only for [`PROBE_LEASE`] (60 s): the
//! filter renews live probes; after that the slot frees for another probe,
//! so a half-open circuit cannot wedge. Outcomes of requests admitted
//! before the circuit opened are ignored once it is open: they describe
//! the past.
//!
//! **Time** comes in as wall-clock nanoseconds and may go backwards (NTP,
//! a VM migration). Nothing panics or wraps ([`Timestamp`] saturates), and
//! nothing waits for the clock to catch up: an open circuit whose start
//! lies in the future counts its open time from "now", probe leases are
//! pulled in to at most one lease from "now", and a time window that would
//! have to rewind further than its own length starts over.
//!
//! # The bulkhead
//!
//! [`Bulkhead`] counts in-flight requests per backend × model, per tenant,
//! against `max_in_flight` and each tenant's cap (its override, else
//! `max_in_flight_per_tenant`). A tenant at its cap waits or is refused while
//! other tenants still get the slots it cannot take: that is the isolation.
//! Requests beyond the caps wait in a FIFO queue of `queue` places for at
//! most `max_wait` (the filter pauses them and polls on its tick). A waiter
//! whose tenant is at its cap does not hold up those behind it; newcomers
//! never overtake eligible waiters.
//!
//! Slots are leases rather than counters, because a request whose
//! `release` never comes (a worker crash, a stream Envoy tore down without
//! telling the filter) must not leak a slot forever. Leases live in 30 s
//! epochs ([`SLOT_EPOCH`]): a slot counts for the epoch it was taken or
//! renewed in and the next, so it expires 30–60 s after its last renewal,
//! and the state stays one small counter pair per tenant instead of one
//! entry per request. Tenants are stored by a 64-bit hash of their name.
//!
//! # Degradation
//!
//! [`degrade`] turns a rejection into what the policy asks for: a 503 with
//! `retry-after` and an error body in the client's API shape; a reroute to
//! the fallback model (the filter rewrites `model` with [`rewrite_model`]
//! and sets the backend route header); or a static answer, as JSON or as a
//! complete SSE stream. Every degraded response carries
//! `x-sluice-degraded: fail-fast | fallback-model | static` and
//! `x-sluice-degraded-reason`.
//!
//! # Metrics
//!
//! The shared state keeps no counters (they would grow the blob every
//! worker rewrites); the calls return what happened instead: [`Admit`] and
//! [`Circuit::record`] return [`Transition`]s, rejections carry a
//! [`RejectReason`], [`Poll::Granted`] the time waited. Gauges read the
//! state: [`Circuit::state`] (`code()`: 0 closed, 1 open, 2 half-open),
//! [`Circuit::throttle_probability`], [`Bulkhead::in_flight`],
//! [`Bulkhead::queue_len`].
//!
//! # A filter's use, per callback
//!
//! - `on_http_request_headers` (or body, once the model is known):
//!   `Circuit::admit` under the circuit's key; if rejected, [`degrade`].
//!   Then `Bulkhead::try_acquire`: granted → continue; queued → pause and
//!   keep the [`QueueTicket`]; full → [`degrade`].
//! - root `on_tick`: `Bulkhead::poll` each paused ticket (granted → resume,
//!   timed out → degrade); renew leases that are [`SlotLease::due`] and live
//!   probes ([`Circuit::renew_probe`]).
//! - response done (`on_log`): [`classify`] then `Circuit::record`, and
//!   `Bulkhead::release`. A client gone without an upstream verdict
//!   (`classify` gives `None`): [`Circuit::abandon`] its probe, release its
//!   slot, or [`Bulkhead::cancel`] its queue ticket.
//!
//! [`Timestamp`]: crate::time::Timestamp

mod bulkhead;
mod circuit;
mod degrade;
mod verdict;

pub use crate::llm::{RewriteError, rewrite_model};
pub use crate::outcome::{Judge, Outcome, ResponseFlags, classify};
pub use crate::window;
pub use bulkhead::{
    Acquire, Bulkhead, Poll, QueueTicket, SLOT_EPOCH, SlotLease, tenant_cap, tenant_key,
};
pub use circuit::{
    Admission, Admit, Circuit, CircuitState, PROBE_LEASE, ProbeTicket, Throttle, Transition,
    open_time, reject_probability,
};
pub use degrade::{
    BACKEND_HEADER, ClientRequest, DEGRADED_HEADER, Degradation, LocalReply, REASON_HEADER,
    Reroute, degrade, fail_fast, static_answer,
};
pub use verdict::{CLOSED_FRESH_FOR, ClosedCache, ProbeFate, Refusals, probe_fate};

/// Why a request was turned away, for degradation and the rejection counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The circuit is open, or half-open with every probe slot taken.
    CircuitOpen,
    /// Adaptive throttling drew a rejection.
    Throttled,
    /// No free slot and no room in the queue.
    BulkheadFull,
    /// The request waited `max_wait` in the queue without getting a slot.
    QueueTimeout,
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        RejectReason::CircuitOpen,
        RejectReason::Throttled,
        RejectReason::BulkheadFull,
        RejectReason::QueueTimeout,
    ];

    /// The reason's spelling in headers, error codes and metric names.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::CircuitOpen => "circuit-open",
            RejectReason::Throttled => "throttled",
            RejectReason::BulkheadFull => "bulkhead-full",
            RejectReason::QueueTimeout => "queue-timeout",
        }
    }

    /// The reason in a sentence fragment, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            RejectReason::CircuitOpen => "circuit open after upstream failures",
            RejectReason::Throttled => "load shed by adaptive throttling",
            RejectReason::BulkheadFull => "too many requests in flight",
            RejectReason::QueueTimeout => "timed out waiting for a free slot",
        }
    }
}

/// A caller's random draw clamped into `[0, 1)`; NaN counts as 0.5 (no
/// jitter, no bias).
pub(crate) fn unit_interval(rand: f64) -> f64 {
    if rand.is_nan() {
        0.5
    } else {
        rand.clamp(0.0, 1.0 - f64::EPSILON)
    }
}
