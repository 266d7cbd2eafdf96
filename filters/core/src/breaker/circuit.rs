//! One circuit: the state machine of the module docs, as a value.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RejectReason, unit_interval};
use crate::config::{BreakerConfig, BreakerMode};
use crate::outcome::Outcome;
use crate::time::{Timestamp, duration_nanos};
use crate::window::{BucketRing, OutcomeWindow, TimeBuckets};

/// How long a half-open probe holds its slot without news. A probe whose
/// request never reports back (stream never ends, worker died) frees its
/// slot after this; a filter renews the probes of live streams with
/// [`Circuit::renew_probe`] (from `on_tick`, say every 20 s).
pub const PROBE_LEASE: Duration = Duration::from_secs(60);

/// Where a circuit is, as exported in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CircuitState {
    /// Traffic flows (adaptive throttling may still shed some).
    Closed,
    /// Traffic is turned away until the open time has passed.
    Open,
    /// A few probes test whether the backend has recovered.
    HalfOpen,
}

impl CircuitState {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// A change of state, for the `transitions` counter and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: CircuitState,
    pub to: CircuitState,
}

/// A half-open probe: the right to report the outcome that decides
/// whether the circuit closes. Kept by the filter in the request's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTicket {
    /// The half-open period it belongs to; a ticket from an earlier one is
    /// ignored.
    pub generation: u32,
    /// Which slot it holds in that period.
    pub slot: u32,
}

/// Whether a request may go to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it. `probe` is set when the request is a half-open probe: pass
    /// it back to [`Circuit::record`] (or [`Circuit::abandon`]).
    Allowed { probe: Option<ProbeTicket> },
    /// Turn it away; degrade it. `retry_after` is when the circuit may admit
    /// again, when known (open circuits); otherwise use the configured one.
    Rejected {
        reason: RejectReason,
        retry_after: Option<Duration>,
    },
}

impl Admission {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Admission::Allowed { .. })
    }
}

/// What [`Circuit::admit`] decided, and the transition it made on the way
/// (an open circuit whose time is up turns half-open when asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admit {
    pub admission: Admission,
    pub transition: Option<Transition>,
}

/// A held half-open probe slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ProbeLease {
    slot: u32,
    expires: Timestamp,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
enum Phase {
    #[default]
    Closed,
    Open {
        since: Timestamp,
        /// The open time chosen at the trip (back-off and jitter applied), ns.
        length_nanos: u64,
    },
    HalfOpen {
        /// Probes that reported success in this period.
        successes: u32,
        /// Probes issued in this period (the next slot number).
        issued: u32,
        leases: Vec<ProbeLease>,
    },
}

/// Requests and accepted requests, for adaptive throttling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    pub requests: u32,
    pub accepts: u32,
}

impl std::ops::AddAssign for Throttle {
    fn add_assign(&mut self, other: Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.accepts = self.accepts.saturating_add(other.accepts);
    }
}

/// The evidence a closed circuit keeps, per mode.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
enum Evidence {
    /// Not shaped yet (a fresh default, before the first call).
    #[default]
    None,
    /// Failures in a row.
    Consecutive { run: u32 },
    /// Outcomes over the sliding window.
    Rate(OutcomeWindow),
    /// Requests and accepts per time bucket.
    Adaptive {
        width_nanos: u64,
        ring: BucketRing<Throttle>,
    },
}

impl Evidence {
    fn new(mode: &BreakerMode) -> Self {
        match mode {
            BreakerMode::Consecutive { .. } => Evidence::Consecutive { run: 0 },
            BreakerMode::Rate { window, .. } => Evidence::Rate(OutcomeWindow::new(*window)),
            BreakerMode::Adaptive { window, .. } => {
                let b = TimeBuckets::for_window(*window);
                Evidence::Adaptive {
                    width_nanos: b.width_nanos,
                    ring: BucketRing::new(b.count),
                }
            }
        }
    }

    fn fits(&self, mode: &BreakerMode) -> bool {
        match (self, mode) {
            (Evidence::Consecutive { .. }, BreakerMode::Consecutive { .. }) => true,
            (Evidence::Rate(w), BreakerMode::Rate { window, .. }) => w.fits(*window),
            (Evidence::Adaptive { width_nanos, ring }, BreakerMode::Adaptive { window, .. }) => {
                let b = TimeBuckets::for_window(*window);
                *width_nanos == b.width_nanos && ring.len() == b.count
            }
            _ => false,
        }
    }
}

/// One circuit (backend × model, or × endpoint): serializable, small, and
/// driven only by its caller's clock and randomness. `Default` is a closed
/// circuit that shapes itself to the configuration on first use, so it can
/// start from an absent shared-data key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    phase: Phase,
    evidence: Evidence,
    /// Trips since the circuit last stayed closed for `max_open_for`; the
    /// open time is `open_for × backoff^(trips − 1)`.
    trips: u32,
    /// When the circuit last closed.
    closed_at: Timestamp,
    /// Half-open periods so far; names the current one in probe tickets.
    generation: u32,
}

impl Circuit {
    /// A closed circuit with no history, shaped for `cfg`.
    pub fn new(cfg: &BreakerConfig) -> Self {
        Self {
            evidence: Evidence::new(&cfg.mode),
            ..Self::default()
        }
    }

    /// The state at `now`, for the state gauge. An open circuit whose time
    /// is up reads as half-open (it turns so on the next admission).
    pub fn state(&self, now: Timestamp) -> CircuitState {
        match &self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open {
                since,
                length_nanos,
            } => {
                if now >= *since && now.as_nanos() - since.as_nanos() >= *length_nanos {
                    CircuitState::HalfOpen
                } else {
                    CircuitState::Open
                }
            }
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Trips in the current back-off sequence (0 after a long closed spell).
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// The adaptive rejection probability at `now`, in `[0, max_reject]`;
    /// 0 in the other modes.
    pub fn throttle_probability(&self, cfg: &BreakerConfig, now: Timestamp) -> f64 {
        match (&self.evidence, &cfg.mode) {
            (
                Evidence::Adaptive { width_nanos, ring },
                BreakerMode::Adaptive { k, max_reject, .. },
            ) if self.evidence.fits(&cfg.mode) => {
                let t = ring.sum(now.as_nanos() / (*width_nanos).max(1));
                reject_probability(t.requests, t.accepts, *k, max_reject.get())
            }
            _ => 0.0,
        }
    }

    /// Decides whether a request may go upstream. `rand` is a uniform draw
    /// in `[0, 1)` from the caller, used by adaptive throttling.
    ///
    /// Changes the state (half-open probe slots, adaptive request counts,
    /// open → half-open), so the filter writes it back (CAS) after calling.
    pub fn admit(&mut self, cfg: &BreakerConfig, now: Timestamp, rand: f64) -> Admit {
        self.conform(cfg);
        let mut transition = None;
        if let Phase::Open {
            since,
            length_nanos,
        } = &mut self.phase
        {
            // The clock went back: the open time counts from the new "now",
            // so it ends at most one open time later, never much later.
            if now < *since {
                *since = now;
            }
            let elapsed = duration_nanos(now.since(*since));
            if elapsed < *length_nanos {
                return Admit {
                    admission: Admission::Rejected {
                        reason: RejectReason::CircuitOpen,
                        retry_after: Some(Duration::from_nanos(*length_nanos - elapsed)),
                    },
                    transition: None,
                };
            }
            self.generation = self.generation.wrapping_add(1);
            self.phase = Phase::HalfOpen {
                successes: 0,
                issued: 0,
                leases: Vec::new(),
            };
            transition = Some(Transition {
                from: CircuitState::Open,
                to: CircuitState::HalfOpen,
            });
        }
        let admission = match &mut self.phase {
            Phase::HalfOpen {
                successes,
                issued,
                leases,
            } => {
                expire_leases(leases, now);
                let allowed = cfg.half_open_probes.get();
                let busy = u32::try_from(leases.len()).unwrap_or(u32::MAX);
                if busy.saturating_add(*successes) < allowed {
                    let slot = *issued;
                    *issued = issued.wrapping_add(1);
                    leases.push(ProbeLease {
                        slot,
                        expires: now + PROBE_LEASE,
                    });
                    Admission::Allowed {
                        probe: Some(ProbeTicket {
                            generation: self.generation,
                            slot,
                        }),
                    }
                } else {
                    Admission::Rejected {
                        reason: RejectReason::CircuitOpen,
                        retry_after: None,
                    }
                }
            }
            Phase::Closed => self.admit_closed(cfg, now, rand),
            // Left above, either by returning or by turning half-open.
            Phase::Open { .. } => Admission::Rejected {
                reason: RejectReason::CircuitOpen,
                retry_after: None,
            },
        };
        Admit {
            admission,
            transition,
        }
    }

    fn admit_closed(&mut self, cfg: &BreakerConfig, now: Timestamp, rand: f64) -> Admission {
        let p = self.throttle_probability(cfg, now);
        if let Evidence::Adaptive { width_nanos, ring } = &mut self.evidence {
            ring.add(
                now.as_nanos() / (*width_nanos).max(1),
                Throttle {
                    requests: 1,
                    accepts: 0,
                },
            );
        }
        if unit_interval(rand) < p {
            Admission::Rejected {
                reason: RejectReason::Throttled,
                retry_after: None,
            }
        } else {
            Admission::Allowed { probe: None }
        }
    }

    /// Records the outcome of a call that [`Circuit::admit`] let through,
    /// with its probe ticket if it was a probe. `rand` (uniform in `[0, 1)`)
    /// draws the jitter if the circuit trips. Returns the transition made.
    ///
    /// Outcomes of calls admitted before the circuit opened, arriving while
    /// it is open or half-open, are ignored: they describe the past.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        now: Timestamp,
        outcome: Outcome,
        probe: Option<ProbeTicket>,
        rand: f64,
    ) -> Option<Transition> {
        self.conform(cfg);
        match &mut self.phase {
            Phase::Closed => self.record_closed(cfg, now, outcome, rand),
            Phase::Open { .. } => None,
            Phase::HalfOpen {
                successes, leases, ..
            } => {
                let ticket = probe.filter(|t| t.generation == self.generation)?;
                leases.retain(|l| l.slot != ticket.slot);
                let bad = outcome.is_failure()
                    || (outcome.slow && matches!(cfg.mode, BreakerMode::Rate { .. }));
                if bad {
                    self.trip(cfg, now, rand);
                    Some(Transition {
                        from: CircuitState::HalfOpen,
                        to: CircuitState::Open,
                    })
                } else {
                    *successes = successes.saturating_add(1);
                    if *successes >= cfg.half_open_probes.get() {
                        self.close(cfg, now);
                        Some(Transition {
                            from: CircuitState::HalfOpen,
                            to: CircuitState::Closed,
                        })
                    } else {
                        None
                    }
                }
            }
        }
    }

    fn record_closed(
        &mut self,
        cfg: &BreakerConfig,
        now: Timestamp,
        outcome: Outcome,
        rand: f64,
    ) -> Option<Transition> {
        let trip = match (&mut self.evidence, &cfg.mode) {
            (Evidence::Consecutive { run }, BreakerMode::Consecutive { failures }) => {
                *run = if outcome.is_failure() {
                    run.saturating_add(1)
                } else {
                    0
                };
                *run >= failures.get()
            }
            (
                Evidence::Rate(window),
                BreakerMode::Rate {
                    min_calls,
                    failure_rate,
                    slow_rate,
                    ..
                },
            ) => {
                window.record(now, outcome.is_failure(), outcome.slow);
                let t = window.tally(now);
                t.calls >= min_calls.get()
                    && (t.failure_rate() >= failure_rate.get() || t.slow_rate() >= slow_rate.get())
            }
            (Evidence::Adaptive { width_nanos, ring }, BreakerMode::Adaptive { .. }) => {
                if !outcome.is_failure() {
                    ring.add(
                        now.as_nanos() / (*width_nanos).max(1),
                        Throttle {
                            requests: 0,
                            accepts: 1,
                        },
                    );
                }
                false
            }
            _ => false,
        };
        if !trip {
            return None;
        }
        if now.since(self.closed_at) >= cfg.max_open_for {
            self.trips = 0;
        }
        self.trip(cfg, now, rand);
        Some(Transition {
            from: CircuitState::Closed,
            to: CircuitState::Open,
        })
    }

    /// Gives back a probe slot without an outcome (the client went away,
    /// the call said nothing about the upstream).
    pub fn abandon(&mut self, probe: ProbeTicket) {
        if let Phase::HalfOpen { leases, .. } = &mut self.phase
            && probe.generation == self.generation
        {
            leases.retain(|l| l.slot != probe.slot);
        }
    }

    /// Extends a live probe's lease to `now + PROBE_LEASE`. Returns false
    /// when the probe no longer holds a slot (its period ended, or its lease
    /// had run out): its outcome still counts if its period is current.
    pub fn renew_probe(&mut self, probe: ProbeTicket, now: Timestamp) -> bool {
        if let Phase::HalfOpen { leases, .. } = &mut self.phase
            && probe.generation == self.generation
        {
            expire_leases(leases, now);
            if let Some(lease) = leases.iter_mut().find(|l| l.slot == probe.slot) {
                lease.expires = now + PROBE_LEASE;
                return true;
            }
        }
        false
    }

    /// Probes holding a slot at `now`.
    pub fn probes_in_flight(&self, now: Timestamp) -> u32 {
        match &self.phase {
            Phase::HalfOpen { leases, .. } => {
                let live = leases.iter().filter(|l| lease_live(l, now)).count();
                u32::try_from(live).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }

    /// Opens the circuit for the next back-off step.
    fn trip(&mut self, cfg: &BreakerConfig, now: Timestamp, rand: f64) {
        self.trips = self.trips.saturating_add(1);
        self.phase = Phase::Open {
            since: now,
            length_nanos: duration_nanos(open_time(cfg, self.trips, rand)),
        };
        self.evidence = Evidence::new(&cfg.mode);
    }

    fn close(&mut self, cfg: &BreakerConfig, now: Timestamp) {
        self.phase = Phase::Closed;
        self.closed_at = now;
        self.evidence = Evidence::new(&cfg.mode);
    }

    /// Reshapes the evidence when the configuration's mode or window
    /// changed (a policy reload): the old evidence cannot be read under the
    /// new rules, so it starts over. An adaptive circuit is never open.
    fn conform(&mut self, cfg: &BreakerConfig) {
        if !self.evidence.fits(&cfg.mode) {
            self.evidence = Evidence::new(&cfg.mode);
            if matches!(cfg.mode, BreakerMode::Adaptive { .. }) {
                self.phase = Phase::Closed;
            }
        }
    }
}

/// The open time of the `trips`-th trip in a row:
/// `min(open_for × backoff^(trips − 1), max_open_for) × (1 + jitter × (2·rand − 1))`.
///
/// Hence within `[open_for·(1 − jitter), max_open_for·(1 + jitter)]`.
pub fn open_time(cfg: &BreakerConfig, trips: u32, rand: f64) -> Duration {
    let exponent = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
    let backoff = if cfg.backoff.is_finite() {
        cfg.backoff.max(1.0)
    } else {
        1.0
    };
    let max = cfg.max_open_for.max(cfg.open_for).as_secs_f64();
    let grown = cfg.open_for.as_secs_f64() * backoff.powi(exponent);
    let base = if grown.is_finite() {
        grown.min(max)
    } else {
        max
    };
    let spread = cfg.jitter.get() * (2.0 * unit_interval(rand) - 1.0);
    let secs = (base * (1.0 + spread)).max(0.0);
    Duration::try_from_secs_f64(secs).unwrap_or(cfg.max_open_for)
}

/// The SRE book's client-side throttling probability,
/// `max(0, (requests − k·accepts) / (requests + 1))`, capped at `max_reject`.
pub fn reject_probability(requests: u32, accepts: u32, k: f64, max_reject: f64) -> f64 {
    let requests = f64::from(requests);
    let p = (requests - k * f64::from(accepts)) / (requests + 1.0);
    if p.is_nan() {
        return 0.0;
    }
    p.clamp(0.0, max_reject.clamp(0.0, 1.0))
}

fn lease_live(lease: &ProbeLease, now: Timestamp) -> bool {
    lease.expires > now
}

/// Drops expired leases; pulls leases that expire suspiciously far ahead
/// (the clock went back) in to `now + PROBE_LEASE`.
fn expire_leases(leases: &mut Vec<ProbeLease>, now: Timestamp) {
    let latest = now + PROBE_LEASE;
    leases.retain(|l| lease_live(l, now));
    for lease in leases.iter_mut() {
        lease.expires = lease.expires.min(latest);
    }
}
