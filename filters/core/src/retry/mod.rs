//! Retry budgets: retries are allowed while they stay a small share of the
//! traffic.
//!
//! # Why a budget, not a number of retries per request
//!
//! "Retry each request up to 3 times" is harmless while failures are rare
//! and ruinous when they are not. When an upstream fails every attempt,
//! each request becomes four; when it fails *because* it is overloaded
//! (an LLM server out of KV cache, a GPU pool at capacity), it is handed
//! four times the load that broke it, fails more, and never recovers while
//! clients keep asking: a retry storm, multiplied again by every layer
//! that retries. A budget caps retries as a share of the requests recently
//! sent, plus a small floor so that a quiet service can retry at all
//! (Finagle's `RetryBudget`, which Linkerd and tower's `TpsBudget` follow,
//! and Gateway API GEP-3388: 20% over 10 s, at least 10 per second).
//! However the upstream fails, what it sees is at most the traffic plus
//! that share plus the floor. `max_retries` stays, as the cap of one
//! request within the budget.
//!
//! For LLM traffic the share is better counted in work than in requests:
//! retrying a 100k-token prompt costs the upstream what a hundred small
//! ones do. So a request deposits `budget × weight` and a retry withdraws
//! its own weight, weights being in typical requests (a reservation's
//! tokens over a typical one's, say), bounded by [`MAX_WEIGHT`] and
//! [`MIN_WEIGHT`]. With every weight 1 it is Finagle's budget.
//!
//! # The arithmetic, and what it guarantees
//!
//! > balance = `min_retries_per_second × ttl`
//! > \+ Σ over the last `ttl` of (`budget ×` each request's weight − each
//! > retry's weight)
//!
//! A retry is allowed when the balance covers its weight. Withdrawals
//! expire like deposits (Finagle files them as negative deposits in the
//! same window): a burst of retries is paid back when it ages out, which
//! is also how the floor refills, so there is no second bucket to keep.
//! Over any stretch of time `T` the budget sees pass:
//!
//! > retried weight ≤ `budget ×` requested weight
//! > \+ `min_retries_per_second × (T + ttl + ttl/10)`
//!
//! Take the last retry allowed, then the last one before its window, and so
//! on: the windows are disjoint and cover every retry, each window's
//! retries are at most its deposits plus the reserve, and windows start at
//! least a `ttl` apart (one slice more for the slice the first starts in).
//! With weights of 1: attempts ≤ requests × (1 + `budget`) + that floor
//! share, whatever fails and however often (property tests in
//! `tests.rs`; the storm scenario there shows 3 retries per request
//! quadrupling the load on an upstream that fails more the more it is
//! asked, and keeping it down after a brief dip in its capacity, while
//! under the budget it sees 1.06× the traffic over the run and recovers).
//!
//! # Why ten slices, not a decaying sum
//!
//! The outlier detector's estimates ([`crate::outlier::estimate`]) decay:
//! two numbers, smooth, mergeable by addition, and right for judging means.
//! A budget is a threshold on a count that the policy states exactly ("20%
//! of the requests of the last 10 s"), and the bound above rests on a
//! request counting fully for `ttl` and then not at all. A sum decaying at
//! `ttl` still holds 37% of a burst one `ttl` later and 5% three later, so
//! what a burst leaves behind is spent long after the policy says it
//! expired, and the guarantee holds only on average. Slices give exact
//! expiry, to a tenth of `ttl` (Finagle and tower cut theirs in ten too),
//! for ten numbers instead of two (about 110 bytes of MessagePack), and
//! they merge just as well: every operation adds to the newest slice.
//!
//! # Time
//!
//! Time is passed in. Slices are numbered by absolute time
//! (`now / (ttl/10)`), so every worker files what happens at one instant in
//! the same slice. A clock that jumps forward by `ttl` expires everything;
//! one stepped back re-anchors the ring with every slice keeping its age,
//! so nothing is minted and nothing piles up ([`RetryBudget`]'s `advance`
//! says how; no arithmetic can panic or wrap).
//!
//! # Where the state lives
//!
//! One [`RetryBudget`] per backend × zone ([`state_key`]: bounded by the
//! policy), in shared data, MessagePack, updated with
//! [`crate::shared::update`]. Every request deposits, so workers count
//! their requests and weights locally and flush them with
//! [`RetryBudget::deposit_many`] on their tick (a deposit is filed up to a
//! tick late and lives that much longer). Retries are rare by
//! construction and written at once.
//!
//! Envoy's router makes the retries, not the filter, which can only bound
//! them before the first attempt. So at admission [`plan()`] turns the
//! balance the worker sees into `x-envoy-max-retries` and
//! `x-envoy-retry-on`; each retry attempt the per-attempt instance sees
//! (`upstream.request_attempt_count` > 1) is [`RetryBudget::charge`]d at
//! once, since it has happened, even into debt, which later plans see. A
//! worker's view is its last copy of the shared budget plus its own
//! deposits and charges since; what it cannot see is the other workers'
//! retries since its last tick, so the overshoot is at most one tick of
//! them, after which the debt holds retries back (scenario in `tests.rs`).
//! [`RetryBudget::try_withdraw`] is Finagle's form, for a caller that
//! decides each retry itself.

pub mod budget;
pub mod plan;

pub use budget::{BUCKETS, MAX_WEIGHT, MIN_WEIGHT, RetryBudget, reserve};
pub use plan::{
    MAX_RETRIES_HEADER, RETRIABLE_STATUS_CODES_HEADER, RETRY_ON_HEADER, RetryPlan, plan,
};

/// The shared-data key of a backend × zone's budget. Names are
/// length-prefixed: a `/` in one cannot make two pairs share a key.
pub fn state_key(backend: &str, zone: &str) -> String {
    format!("retry/{}/{backend}/{zone}", backend.len())
}

#[cfg(test)]
mod tests;
