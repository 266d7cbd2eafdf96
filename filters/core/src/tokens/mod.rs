//! Token-aware rate limiting: quotas in tokens, requests and concurrent
//! streams per tenant × model, enforced before the upstream is called and
//! settled with the real usage afterwards.
//!
//! # The flow
//!
//! 1. [`Limiter::quota_for`] finds the first `[[tokens.quota]]` matching the
//!    request; [`Limiter::plan`] turns the parsed request
//!    ([`RequestInfo`](crate::llm::RequestInfo)) into a [`Reservation`]
//!    (estimated prompt + completion cap) or a 400.
//! 2. [`Limiter::reserve`] takes the reservation from every bucket of the
//!    quota, all or nothing, or says which limit refused and when to retry.
//! 3. When the response's usage is known, [`Limiter::reconcile`] refunds what
//!    was reserved and not used, or charges what was used beyond it.
//!
//! # Why a bucket per limit, stored as one instant
//!
//! Each limit (`200k/min`, `5M/day`, `600/min` requests) is a token bucket
//! refilling continuously at its rate, with a capacity of its own amount
//! (the shortest token period's capacity is `burst` when set). Refilling
//! continuously rather than resetting fixed windows avoids the double burst
//! at a window edge, and needs no timer.
//!
//! The bucket is stored as the instant it will be full again (the
//! *theoretical arrival time* of GCRA, the algorithm governor implements):
//! one `u64` per limit, integer nanoseconds, no fractional refill to lose
//! between updates. governor itself does not fit: its state lives in an
//! atomic inside its own limiter object (not a value that can be encoded
//! into proxy-wasm shared data and compare-and-swapped across worker VMs),
//! it has no way to give tokens back or to charge them after the fact, and a
//! quota here has several limits that must admit or refuse together.
//!
//! The state of one key ([`KeyState`]) is a plain serde struct: a few `u64`s
//! per key (the `bytes_per_key` test in `tests/tokens_limiter.rs` measures
//! it). Every operation is a deterministic function of (state, now,
//! request), so the filter's read → change → compare-and-swap loop simply
//! re-applies it when another worker wrote first: there is nothing to merge, and nothing is
//! counted twice. A clock that goes backwards refills nothing; it never
//! admits more.
//!
//! # The overshoot bound
//!
//! For every token limit of `L` tokens per period `P`, with bucket capacity
//! `C` (`L`, or `burst`), and every time window of length `T`:
//!
//! > tokens charged in the window ≤ `C + L·T/P + O`
//!
//! where *charged* is reservations admitted plus excess charged by
//! [`Limiter::reconcile`] minus refunds, all within the window, and `O` is
//! the excess charged within the window: the sum of `actual − reserved` over
//! reconciliations where the upstream used more than was reserved.
//! Over one period (`T = P`, `C = L`): at most `2L + O` (a full bucket plus
//! one period of refill; the long-run rate is `L` per `P`). Every rounding
//! is in the limit's favour (reservations round their refill time up,
//! refunds down), so the bound holds exactly, up to a fraction of a token
//! per operation for rates above one token per nanosecond.
//!
//! When the completion is capped (by the client, or by sluice writing
//! `default_max_tokens` into the body under `over_cap = "clamp"`), a correct
//! upstream never uses more than was reserved, so `O = 0` save for the prompt
//! estimate falling short of the real prompt: that shortfall is the only
//! overshoot, it is charged as debt, and later requests wait until it is
//! paid back. Proven by `tests/tokens_overshoot.rs` over arbitrary
//! interleavings of reservations, settlements and time steps.
//!
//! # Bounded memory, and floods of new keys
//!
//! Proxy-wasm shared data cannot delete a key. Keys therefore live in a
//! fixed table of slots ([`probe_slots`]), and a new key may take only the
//! slot of a key at rest ([`KeyState::at_rest`]: its buckets full again, no
//! stream in flight), which loses nothing. A key whose places are all busy
//! shares its rule's overflow state ([`KeyId::overflow`]). The state module
//! explains why this keeps a flood of identities from resetting anyone.

mod bucket;
mod headers;
mod limiter;
mod state;

pub use headers::{LimitStatus, QuotaStatus, go_duration};
pub use limiter::{
    Decision, Limited, Limiter, Plan, QuotaId, Reconciliation, Rejection, Reservation,
    STREAM_LEASE, Ticket,
};
pub use state::{Claim, KeyId, KeyState, PROBES, SlotChoice, choose_slot, probe_slots};
