//! One request's way through the breaker: judged, then forwarded, queued,
//! rerouted or answered; its outcome recorded when it ends.
//!
//! A [`BreakerFlow`] is shared between the engine (which shows it the
//! request and, when it is done, the observation) and the capability's
//! tick (which polls it while it waits in the bulkhead queue and renews
//! its leases while it streams). It only touches shared data; what the
//! host must do (resume, answer) goes back to the engine as a verdict or a
//! wake.

use std::rc::Rc;
use std::time::Duration;

use log::warn;
use sluice_core::breaker::{
    Acquire, Admission as CircuitAdmission, BACKEND_HEADER, Bulkhead, Circuit, CircuitState,
    ClientRequest, DEGRADED_HEADER, Degradation, Poll, ProbeFate, ProbeTicket, QueueTicket,
    Refusals, RejectReason, Reroute, SlotLease, classify, degrade, fail_fast, probe_fate,
    rewrite_model,
};
use sluice_core::config::{Api, ModelFrom};
use sluice_core::llm::LocalReply;
use sluice_core::time::Timestamp;
use sluice_filter_common::STATE;
use sluice_filter_common::engine::{Edits, Observation, RequestContext, Verdict, Wake};

use super::plan::{CircuitSlot, Plan, Target};

/// How often a live half-open probe renews its lease (a third of it).
const PROBE_RENEW_EVERY: Duration = Duration::from_secs(20);

/// Where the request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not the breaker's business (no breaker on its backend).
    Passthrough,
    /// Paused, waiting for a bulkhead slot.
    Queued,
    /// Sent upstream; its outcome will be recorded.
    Forwarded,
    /// Answered by sluice.
    Replied,
    /// Outcome recorded, slots released.
    Done,
}

/// The breaker's state of one request.
pub struct BreakerFlow {
    pub plan: Rc<Plan>,
    pub context_id: u32,
    pub phase: Phase,
    tenant: String,
    /// The API shape of sluice's own answers.
    api: Api,
    stream: bool,
    model: String,
    /// The circuit the request is judged by (the fallback's after a reroute).
    target: Option<Target>,
    /// Which of the target's circuit keys admitted it (scope `endpoint`).
    circuit_index: usize,
    probe: Option<ProbeTicket>,
    probe_renewed: Timestamp,
    lease: Option<SlotLease>,
    ticket: Option<QueueTicket>,
}

/// The circuit's and bulkhead's verdict on one target.
enum Judged {
    Go,
    Queued,
    Rejected {
        reason: RejectReason,
        retry_after: Option<Duration>,
    },
}

impl BreakerFlow {
    pub fn new(plan: Rc<Plan>, context_id: u32, request: &RequestContext) -> Self {
        Self {
            plan,
            context_id,
            phase: Phase::Passthrough,
            tenant: request.tenant.clone(),
            api: request.api,
            stream: request.stream,
            model: request.model.clone(),
            target: None,
            circuit_index: 0,
            probe: None,
            probe_renewed: Timestamp::ZERO,
            lease: None,
            ticket: None,
        }
    }

    /// Whether the capability's tick has something to do for this flow.
    pub fn needs_tick(&self) -> bool {
        match self.phase {
            Phase::Queued => true,
            Phase::Forwarded => self.lease.is_some() || self.probe.is_some(),
            _ => false,
        }
    }

    // --- admission ---

    /// Judges the request by the circuit of its backend × model; turned
    /// away, it is degraded as the policy says.
    pub fn admit(
        &mut self,
        request: &RequestContext,
        edits: &mut Edits,
        now: Timestamp,
        rand: f64,
    ) -> Verdict {
        let plan = Rc::clone(&self.plan);
        let Some(backend) = request.backend_name(&plan.policy) else {
            return Verdict::Go;
        };
        let Some(target) = plan.target(backend, &self.model) else {
            return Verdict::Go;
        };
        match self.judge(target, now, rand) {
            Judged::Go => self.forward(),
            Judged::Queued => {
                self.phase = Phase::Queued;
                Verdict::Wait
            }
            Judged::Rejected {
                reason,
                retry_after,
            } => self.degrade(reason, retry_after, request, edits, now, rand),
        }
    }

    /// Circuit, then bulkhead, for `target`. Leaves the probe, lease or
    /// queue ticket in the flow.
    fn judge(&mut self, target: Target, now: Timestamp, rand: f64) -> Judged {
        let plan = Rc::clone(&self.plan);
        let (Some(guarded), Some(slot)) = (plan.guarded(target), plan.slot(target)) else {
            return Judged::Go;
        };
        self.target = Some(target);
        let cfg = &guarded.cfg;
        // The circuit(s): with scope `endpoint` the endpoint is picked by
        // Envoy after this filter, so the request is let through when any
        // endpoint's circuit admits it, and turned away when all refuse.
        let mut refusals = Refusals::default();
        let mut admitted = false;
        for (index, key) in slot.circuit_keys.iter().enumerate() {
            let cache = slot.closed.get(index);
            if guarded.cacheable && cache.is_some_and(|c| c.is_fresh(now)) {
                // Read as closed within `CLOSED_FRESH_FOR`: a closed
                // admission changes nothing (see `ClosedCache`).
                self.probe = None;
                self.probe_renewed = now;
                self.circuit_index = index;
                admitted = true;
                break;
            }
            match STATE.modify(key, |c: &mut Circuit| {
                let admit = c.admit(cfg, now, rand);
                (admit, c.state(now))
            }) {
                Ok((admit, state)) => {
                    if let Some(c) = cache {
                        c.observe(state == CircuitState::Closed, now);
                    }
                    if let Some(t) = admit.transition {
                        slot.metrics.transition(t);
                    } else if index == 0 {
                        slot.metrics.observe_state(state);
                    }
                    match admit.admission {
                        CircuitAdmission::Allowed { probe } => {
                            self.probe = probe;
                            self.probe_renewed = now;
                            self.circuit_index = index;
                            admitted = true;
                            break;
                        }
                        CircuitAdmission::Rejected {
                            reason,
                            retry_after,
                        } => refusals.add(reason, retry_after),
                    }
                }
                Err(e) => {
                    // Shared data failed us: protect nothing rather than
                    // refuse everything.
                    warn!("sluice breaker: circuit state unavailable ({e}); request admitted");
                    self.circuit_index = index;
                    admitted = true;
                    break;
                }
            }
        }
        if !admitted {
            let (reason, retry_after) = refusals.verdict();
            return Judged::Rejected {
                reason,
                retry_after,
            };
        }
        let tenant = self.tenant.clone();
        let acquired = STATE.modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
            let acquired = b.try_acquire(&cfg.bulkhead, &tenant, now);
            (acquired, b.queue_len())
        });
        match acquired {
            Ok((Acquire::Granted(lease), _)) => {
                self.lease = Some(lease);
                Judged::Go
            }
            Ok((Acquire::Queued(ticket), depth)) => {
                slot.metrics.queue_depth.set(u64::from(depth));
                self.ticket = Some(ticket);
                Judged::Queued
            }
            Ok((Acquire::Full, _)) => {
                self.abandon_probe(slot);
                Judged::Rejected {
                    reason: RejectReason::BulkheadFull,
                    retry_after: None,
                }
            }
            Err(e) => {
                warn!("sluice breaker: bulkhead state unavailable ({e}); request admitted");
                Judged::Go
            }
        }
    }

    fn forward(&mut self) -> Verdict {
        self.phase = Phase::Forwarded;
        Verdict::Go
    }

    /// Applies the policy's degradation to a turned-away request.
    fn degrade(
        &mut self,
        reason: RejectReason,
        retry_after: Option<Duration>,
        request: &RequestContext,
        edits: &mut Edits,
        now: Timestamp,
        rand: f64,
    ) -> Verdict {
        let plan = Rc::clone(&self.plan);
        let Some(target) = self.target else {
            return self.forward();
        };
        let (Some(guarded), Some(slot)) = (plan.guarded(target), plan.slot(target)) else {
            return self.forward();
        };
        slot.metrics.rejected(reason);
        let client = ClientRequest {
            api: self.api,
            stream: self.stream,
            model: &self.model,
        };
        match degrade(&guarded.cfg.degrade, reason, retry_after, &client, now) {
            Degradation::Reply(reply) => self.reply(slot, reply),
            Degradation::Reroute(reroute) => {
                let retry_after = retry_after.unwrap_or(guarded.cfg.degrade.retry_after);
                if self.reroute(&reroute, request, edits, now, rand) {
                    slot.metrics.fallback.inc();
                    self.forward()
                } else {
                    self.reply(slot, fail_fast(reason, retry_after, self.api))
                }
            }
        }
    }

    /// Sends the request to the fallback model's backend, if that one
    /// admits it; false when it cannot (no body to rewrite, the fallback's
    /// own circuit or bulkhead refuses): the caller fails fast.
    fn reroute(
        &mut self,
        reroute: &Reroute,
        request: &RequestContext,
        edits: &mut Edits,
        now: Timestamp,
        rand: f64,
    ) -> bool {
        let from_header = self.plan.policy.model.from == ModelFrom::Header;
        let new_body = match request.bytes() {
            Some(b) => match rewrite_model(b, &reroute.model) {
                Ok(new) => Some(new),
                Err(_) if from_header => None,
                Err(_) => return false,
            },
            None if from_header => None,
            None => return false,
        };
        let backend = reroute
            .request_headers
            .iter()
            .find(|(name, _)| *name == BACKEND_HEADER)
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        let plan = Rc::clone(&self.plan);
        if let Some(target) = plan.target(&backend, &reroute.model) {
            match self.judge(target, now, rand) {
                Judged::Go => {}
                Judged::Queued => {
                    // Not worth a wait on top of the refusal: give the place back.
                    self.cancel_ticket();
                    return false;
                }
                Judged::Rejected { .. } => return false,
            }
        } else {
            self.target = None;
        }
        for (name, value) in &reroute.request_headers {
            edits
                .request_headers
                .push(((*name).to_string(), Some(value.clone())));
        }
        if from_header {
            edits.request_headers.push((
                plan.policy.model.header.clone(),
                Some(reroute.model.clone()),
            ));
        }
        edits.body = new_body;
        edits
            .response_headers
            .extend(reroute.response_headers.iter().cloned());
        self.model = reroute.model.clone();
        true
    }

    fn reply(&mut self, slot: &CircuitSlot, reply: LocalReply) -> Verdict {
        count_reply(slot, &reply);
        self.phase = Phase::Replied;
        Verdict::Reply(reply)
    }

    // --- tick ---

    /// The capability's tick: poll the queue while waiting; renew leases
    /// while streaming. Acts on shared data only; returns what the engine
    /// must do with the request, if anything.
    pub fn on_tick(&mut self, now: Timestamp) -> Option<Wake> {
        let plan = Rc::clone(&self.plan);
        let target = self.target?;
        let (guarded, slot) = (plan.guarded(target)?, plan.slot(target)?);
        let cfg = &guarded.cfg;
        match self.phase {
            Phase::Queued => {
                let ticket = self.ticket?;
                let polled = STATE.modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                    (b.poll(&cfg.bulkhead, ticket, now), b.queue_len())
                });
                // On an error, try again on the next tick; `max_wait` still bounds it.
                let (polled, depth) = polled.ok()?;
                slot.metrics.queue_depth.set(u64::from(depth));
                match polled {
                    Poll::Waiting { .. } => None,
                    Poll::Granted { lease, waited } => {
                        self.ticket = None;
                        self.lease = Some(lease);
                        slot.metrics
                            .queue_wait_ms
                            .record(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
                        self.forward();
                        Some(Wake::Resume)
                    }
                    Poll::TimedOut => {
                        self.ticket = None;
                        self.abandon_probe(slot);
                        let reason = RejectReason::QueueTimeout;
                        slot.metrics.rejected(reason);
                        let client = ClientRequest {
                            api: self.api,
                            stream: self.stream,
                            model: &self.model,
                        };
                        // A request that waited `max_wait` is answered, not
                        // rerouted: its body was handed to Envoy when it
                        // paused and is not rewritten from a tick.
                        let reply = match degrade(&cfg.degrade, reason, None, &client, now) {
                            Degradation::Reply(reply) => reply,
                            Degradation::Reroute(_) => {
                                fail_fast(reason, cfg.degrade.retry_after, self.api)
                            }
                        };
                        count_reply(slot, &reply);
                        self.phase = Phase::Replied;
                        Some(Wake::Reply(reply))
                    }
                }
            }
            Phase::Forwarded => {
                if let Some(lease) = self.lease
                    && lease.due(now)
                {
                    let tenant = self.tenant.clone();
                    if let Ok(renewed) = STATE.modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                        b.renew(&cfg.bulkhead, &tenant, lease, now)
                    }) {
                        self.lease = renewed;
                    }
                }
                if let Some(probe) = self.probe
                    && now.since(self.probe_renewed) >= PROBE_RENEW_EVERY
                    && let Some(key) = slot.circuit_keys.get(self.circuit_index)
                {
                    // Renewed or not (its period may have ended), the
                    // outcome may still count; try again in a period.
                    self.probe_renewed = now;
                    let _ = STATE.modify(key, |c: &mut Circuit| c.renew_probe(probe, now));
                }
                None
            }
            _ => None,
        }
    }

    // --- done ---

    /// The end of the request (also after resets and local replies):
    /// record the outcome, give back the slot, the probe or the place in
    /// the queue. Runs once.
    pub fn finish(&mut self, observation: &Observation, now: Timestamp, rand: f64) {
        let phase = self.phase;
        self.phase = Phase::Done;
        let plan = Rc::clone(&self.plan);
        let Some(target) = self.target else {
            return;
        };
        let (Some(guarded), Some(slot)) = (plan.guarded(target), plan.slot(target)) else {
            return;
        };
        let cfg = &guarded.cfg;
        match phase {
            Phase::Queued => {
                self.cancel_ticket();
                self.abandon_probe(slot);
            }
            Phase::Forwarded if observation.sent_at.is_some() => {
                let reached = if guarded.endpoints.is_empty() {
                    0
                } else {
                    guarded.endpoint_index(observation.upstream_address.as_deref())
                };
                let probe = match probe_fate(self.circuit_index, reached, self.probe.take()) {
                    ProbeFate::None => None,
                    ProbeFate::Record(p) => Some(p),
                    ProbeFate::Abandon(p) => {
                        if let Some(key) = slot.circuit_keys.get(self.circuit_index) {
                            let _ = STATE.modify(key, |c: &mut Circuit| c.abandon(p));
                        }
                        None
                    }
                };
                let outcome = classify(
                    observation.status,
                    observation.flags,
                    observation.ttft(),
                    observation.tpot(),
                    cfg,
                );
                if let Some(key) = slot.circuit_keys.get(reached) {
                    let recorded = STATE.modify(key, |c: &mut Circuit| match outcome {
                        Some(o) => (c.record(cfg, now, o, probe, rand), c.state(now)),
                        None => {
                            if let Some(p) = probe {
                                c.abandon(p);
                            }
                            (None, c.state(now))
                        }
                    });
                    if let Some(cache) = slot.closed.get(reached) {
                        match &recorded {
                            // A failure here: read shared data on the next
                            // admission (whatever other workers add to it).
                            _ if outcome.is_some_and(|o| o.is_failure()) => cache.forget(),
                            // A fresh reading, made anyway to record.
                            Ok((_, state)) => cache.observe(*state == CircuitState::Closed, now),
                            Err(_) => cache.forget(),
                        }
                    }
                    if let Ok((transition, state)) = recorded {
                        match transition {
                            Some(t) => slot.metrics.transition(t),
                            None if reached == 0 => slot.metrics.observe_state(state),
                            None => {}
                        }
                    }
                }
                self.release_lease(slot, now);
            }
            _ => {
                // Answered by sluice, or forwarded by this capability but
                // turned away by a later one: no outcome, nothing held.
                self.release_lease(slot, now);
                self.abandon_probe(slot);
            }
        }
    }

    fn release_lease(&mut self, slot: &CircuitSlot, now: Timestamp) {
        if let Some(lease) = self.lease.take() {
            let _ = STATE.modify(&slot.bulkhead_key, |b: &mut Bulkhead| b.release(lease, now));
        }
    }

    fn abandon_probe(&mut self, slot: &CircuitSlot) {
        if let (Some(probe), Some(key)) =
            (self.probe.take(), slot.circuit_keys.get(self.circuit_index))
        {
            let _ = STATE.modify(key, |c: &mut Circuit| c.abandon(probe));
        }
    }

    fn cancel_ticket(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let plan = Rc::clone(&self.plan);
        if let Some(slot) = self.target.and_then(|t| plan.slot(t)) {
            let _ = STATE.modify(&slot.bulkhead_key, |b: &mut Bulkhead| b.cancel(ticket));
        }
    }
}

/// Counts a reply sluice gives as a static answer or a fail-fast.
fn count_reply(slot: &CircuitSlot, reply: &LocalReply) {
    match reply.header(DEGRADED_HEADER) {
        Some("static") => slot.metrics.static_answer.inc(),
        _ => slot.metrics.fail_fast.inc(),
    }
}
