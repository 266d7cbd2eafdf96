//! Decisions over several circuits of one backend, and a worker's cache of
//! a closed circuit.
//!
//! With `scope = "endpoint"` each endpoint of a backend has its own circuit,
//! but Envoy picks the endpoint after the filter has judged the request: the
//! request is let through when any endpoint's circuit admits it, turned
//! away when all refuse ([`Refusals`]), and its outcome is recorded on the
//! circuit of the endpoint it reached, which may not be the one that
//! admitted it ([`probe_fate`]).

use std::cell::Cell;
use std::time::Duration;

use super::{ProbeTicket, RejectReason};
use crate::time::Timestamp;

/// The refusals of every circuit asked, merged into one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    merged: Option<(RejectReason, Option<Duration>)>,
}

impl Refusals {
    /// Adds one circuit's refusal.
    pub fn add(&mut self, reason: RejectReason, retry_after: Option<Duration>) {
        let sooner = match (self.merged.and_then(|(_, r)| r), retry_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.merged = Some((reason, sooner));
    }

    /// The answer to give: the last reason, and the soonest time any of the
    /// circuits said it could admit again (the client may retry then: one
    /// endpoint's circuit will let it through). No refusal at all reads as
    /// an open circuit without a known time.
    pub fn verdict(&self) -> (RejectReason, Option<Duration>) {
        self.merged.unwrap_or((RejectReason::CircuitOpen, None))
    }
}

/// What to do with a half-open probe once the request's endpoint is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFate {
    /// No probe was carried.
    None,
    /// The request reached the circuit that admitted it: its outcome is the
    /// probe's result.
    Record(ProbeTicket),
    /// It reached another endpoint: the outcome proves nothing about the
    /// admitting circuit, whose probe slot is given back.
    Abandon(ProbeTicket),
}

/// The fate of `probe`, admitted by circuit `admitted_on`, for a request
/// whose outcome belongs to circuit `reached`.
pub fn probe_fate(admitted_on: usize, reached: usize, probe: Option<ProbeTicket>) -> ProbeFate {
    match probe {
        None => ProbeFate::None,
        Some(p) if admitted_on == reached => ProbeFate::Record(p),
        Some(p) => ProbeFate::Abandon(p),
    }
}

/// How long a worker trusts its last reading of a circuit as closed: within
/// this, an admission on that circuit reads no shared data (see
/// [`ClosedCache`]).
pub const CLOSED_FRESH_FOR: Duration = Duration::from_millis(20);

/// This worker's last reading of one circuit as closed, so that admissions
/// on a healthy circuit skip the shared-data read and decode.
///
/// # Why the staleness is safe
///
/// In `consecutive` and `rate` mode a closed circuit's admission changes
/// nothing: it only reads the state, to learn whether the circuit is still
/// closed. The state a worker relies on is at most [`CLOSED_FRESH_FOR`]
/// (20 ms) old, and is refreshed for free by every outcome the worker
/// records. Opening is never cached: the worker that sees the failure that
/// trips the circuit writes the open state to shared data at once, and is
/// itself told by that write; every other worker reads it within 20 ms or
/// at its next completion, whichever is first. So after a trip, at most
/// 20 ms of admissions on other workers go through (the same order as the
/// requests already in flight when it tripped, which the circuit never
/// stopped either). A worker that records a failure forgets its reading, so
/// its next admission reads shared data. Only `Closed` is cached: open and
/// half-open admissions (probe slots, open-time ends) always go through
/// shared data, and so does every admission in `adaptive` mode, which
/// counts requests.
#[derive(Debug, Default)]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn refusals_keep_the_soonest_retry_and_the_last_reason() {
        let mut r = Refusals::default();
        assert_eq!(r.verdict(), (RejectReason::CircuitOpen, None));
        r.add(RejectReason::CircuitOpen, secs(30));
        r.add(RejectReason::Throttled, None);
        assert_eq!(r.verdict(), (RejectReason::Throttled, secs(30)));
        r.add(RejectReason::CircuitOpen, secs(5));
        r.add(RejectReason::CircuitOpen, secs(9));
        assert_eq!(r.verdict(), (RejectReason::CircuitOpen, secs(5)));
    }

    #[test]
    fn a_probe_counts_only_on_the_circuit_that_admitted_it() {
        let probe = ProbeTicket {
            generation: 3,
            slot: 0,
        };
        assert_eq!(probe_fate(1, 1, Some(probe)), ProbeFate::Record(probe));
        assert_eq!(probe_fate(1, 2, Some(probe)), ProbeFate::Abandon(probe));
        assert_eq!(probe_fate(0, 2, None), ProbeFate::None);
    }

    #[test]
    fn closed_readings_expire_and_never_survive_a_clock_jump_back() {
        let cache = ClosedCache::default();
        let t0 = Timestamp::from_millis(1_000);
        assert!(!cache.is_fresh(t0));
        cache.observe(true, t0);
        assert!(cache.is_fresh(Timestamp::from_millis(1_019)));
        assert!(!cache.is_fresh(Timestamp::from_millis(1_020)));
        assert!(
            !cache.is_fresh(Timestamp::from_millis(999)),
            "clock went back"
        );
        cache.observe(false, t0);
        assert!(!cache.is_fresh(t0));
        cache.observe(true, t0);
        cache.forget();
        assert!(!cache.is_fresh(t0));
    }
}
