//! One request's way through the breaker: judged, then forwarded, queued,
//! rerouted or answered; its outcome recorded when it ends.
//!
//! A [`Flow`] is shared between the request's HTTP context (which drives it
//! from the stream's callbacks) and the root context's tick (which polls it
//! while it waits in the bulkhead queue and renews its leases while it
//! streams). Every method that calls the host acts on the *current*
//! context: the tick makes the flow's context effective first.

use std::rc::Rc;
use std::time::Duration;

use log::warn;
use sluice_core::breaker::{
    Acquire, Admission, Bulkhead, Circuit, CircuitState, ClientRequest, DEGRADED_HEADER,
    Degradation, LocalReply, Poll, ProbeTicket, QueueTicket, RejectReason, Reroute, ResponseFlags,
    SlotLease, classify, degrade, fail_fast, rewrite_model,
};
use sluice_core::config::{Api, ModelFrom};
use sluice_core::llm::{ApiShape, RouteFields, SseLineReader};
use sluice_core::time::Timestamp;

use crate::plan::{CircuitSlot, Plan, Target};
use crate::{FILTER, host, shared};

/// How often a live half-open probe renews its lease (a third of it).
const PROBE_RENEW_EVERY: Duration = Duration::from_secs(20);

/// Longest SSE line the token counter keeps across chunks; longer lines
/// are skipped (they still count as nothing, never as an error).
const MAX_SSE_LINE: usize = 64 * 1024;

/// Where the request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the body (model and stream flag).
    Reading,
    /// Not the breaker's business (not an LLM call, or no breaker on its
    /// backend): nothing to record.
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

/// What the stream callback should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Held: a local reply was sent, or the request waits in the queue.
    Hold,
}

/// What the tick asks the host to do for a queued flow.
pub enum TickAction {
    Nothing,
    Resume,
    Reply(LocalReply),
}

/// The state of one request.
pub struct Flow {
    pub plan: Rc<Plan>,
    pub context_id: u32,
    pub phase: Phase,
    path: String,
    authority: String,
    pub tenant: String,
    /// The API shape of sluice's own answers.
    api: Api,
    shape: ApiShape,
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
    /// Headers to add to the upstream's response (a fallback's labels).
    response_headers: Vec<(&'static str, String)>,
    sent_at: Option<Timestamp>,
    status: Option<u16>,
    first_byte: Option<Timestamp>,
    sse: Option<SseLineReader>,
    events: u32,
    first_event: Option<Timestamp>,
    last_event: Option<Timestamp>,
}

impl Flow {
    pub fn new(plan: Rc<Plan>, context_id: u32) -> Self {
        Self {
            plan,
            context_id,
            phase: Phase::Passthrough,
            path: String::new(),
            authority: String::new(),
            tenant: String::new(),
            api: Api::Openai,
            shape: ApiShape::Other,
            stream: false,
            model: String::new(),
            target: None,
            circuit_index: 0,
            probe: None,
            probe_renewed: Timestamp::ZERO,
            lease: None,
            ticket: None,
            response_headers: Vec::new(),
            sent_at: None,
            status: None,
            first_byte: None,
            sse: None,
            events: 0,
            first_event: None,
            last_event: None,
        }
    }

    /// Whether the root's tick has something to do for this flow.
    pub fn needs_tick(&self) -> bool {
        match self.phase {
            Phase::Queued => true,
            Phase::Forwarded => self.lease.is_some() || self.probe.is_some(),
            _ => false,
        }
    }

    // --- request ---

    /// Request headers: strips the client's route header, and says whether
    /// the request is an LLM call the breaker judges.
    pub fn on_request_headers(&mut self) -> bool {
        // Clients must not pick a backend themselves (the route table
        // matches this header): only sluice sets it.
        host::set_request_header(sluice_core::breaker::BACKEND_HEADER, None);
        if !self.plan.any_guarded() {
            return false;
        }
        self.path = host::request_header(":path").unwrap_or_default();
        self.shape = ApiShape::from_path(&self.path);
        if self.shape == ApiShape::Other {
            return false;
        }
        self.authority = host::request_header(":authority").unwrap_or_default();
        self.tenant = sluice_filter_common::identity::tenant(&self.plan.policy.tenant);
        self.phase = Phase::Reading;
        true
    }

    /// Judges the request once its body is known (`body`), or without it
    /// (no body, or larger than the buffer cap: judged by headers alone).
    pub fn decide(&mut self, body: Option<&[u8]>, now: Timestamp, rand: f64) -> Next {
        // Only `model` and `stream` matter here: a typed two-field read,
        // not a `Value` tree of the whole body.
        let fields = body.map(RouteFields::read);
        self.stream = fields.as_ref().is_some_and(|f| f.stream);
        self.model = self.model_of(fields);
        let Some(backend) =
            self.plan
                .policy
                .route(&self.path, &self.authority, &self.model, &self.tenant)
        else {
            self.phase = Phase::Passthrough;
            return Next::Continue;
        };
        self.api = self.shape.vendor(backend.api);
        let backend_name = backend.name.clone();
        // Pin the route to the backend judged here, so Envoy sends the
        // request where its circuit says (model routes need the body, which
        // Envoy's route table cannot read). Envoy's own default route goes
        // to the default backend already: setting a header there would only
        // make it select the same route again.
        if self.plan.needs_pin(&backend_name) {
            host::set_request_header(sluice_core::breaker::BACKEND_HEADER, Some(&backend_name));
        }
        let Some(target) = self.plan.target(&backend_name, &self.model) else {
            self.phase = Phase::Passthrough;
            return Next::Continue;
        };
        match self.judge(target, now, rand) {
            Judged::Go => self.forward(now),
            Judged::Queued => {
                self.phase = Phase::Queued;
                Next::Hold
            }
            Judged::Rejected {
                reason,
                retry_after,
            } => self.degrade(reason, retry_after, body, now, rand),
        }
    }

    /// The model: the body's (or the header's, when the policy reads the
    /// header), else the other, else the policy's default, else `unknown`.
    fn model_of(&self, fields: Option<RouteFields>) -> String {
        let source = &self.plan.policy.model;
        let body_model = fields.and_then(|f| f.model);
        let from_body = || body_model.clone();
        let from_header = || host::request_header(&source.header).filter(|m| !m.is_empty());
        let chosen = match source.from {
            ModelFrom::Body => from_body().or_else(from_header),
            ModelFrom::Header => from_header().or_else(from_body),
        };
        chosen
            .or_else(|| source.default.clone())
            .unwrap_or_else(|| "unknown".to_string())
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
        let mut refusal: Option<(RejectReason, Option<Duration>)> = None;
        let mut admitted = false;
        for (index, key) in slot.circuit_keys.iter().enumerate() {
            let cache = slot.closed.get(index);
            if guarded.cacheable && cache.is_some_and(|c| c.is_fresh(now)) {
                // Read as closed within `CLOSED_FRESH_FOR`: a closed
                // admission changes nothing (see `plan::ClosedCache`).
                self.probe = None;
                self.probe_renewed = now;
                self.circuit_index = index;
                admitted = true;
                break;
            }
            match shared::modify(key, |c: &mut Circuit| {
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
                        Admission::Allowed { probe } => {
                            self.probe = probe;
                            self.probe_renewed = now;
                            self.circuit_index = index;
                            admitted = true;
                            break;
                        }
                        Admission::Rejected {
                            reason,
                            retry_after,
                        } => {
                            let sooner = match refusal {
                                Some((_, Some(prev))) => {
                                    retry_after.map(|r| r.min(prev)).or(Some(prev))
                                }
                                _ => retry_after,
                            };
                            refusal = Some((reason, sooner));
                        }
                    }
                }
                Err(e) => {
                    // Shared data failed us: protect nothing rather than
                    // refuse everything.
                    warn!("{FILTER}: circuit state unavailable ({e}); request admitted");
                    self.circuit_index = index;
                    admitted = true;
                    break;
                }
            }
        }
        if !admitted {
            let (reason, retry_after) = refusal.unwrap_or((RejectReason::CircuitOpen, None));
            return Judged::Rejected {
                reason,
                retry_after,
            };
        }
        let tenant = self.tenant.clone();
        let acquired = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
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
                warn!("{FILTER}: bulkhead state unavailable ({e}); request admitted");
                Judged::Go
            }
        }
    }

    fn forward(&mut self, now: Timestamp) -> Next {
        self.phase = Phase::Forwarded;
        self.sent_at = Some(now);
        Next::Continue
    }

    /// Applies the policy's degradation to a turned-away request.
    fn degrade(
        &mut self,
        reason: RejectReason,
        retry_after: Option<Duration>,
        body: Option<&[u8]>,
        now: Timestamp,
        rand: f64,
    ) -> Next {
        let plan = Rc::clone(&self.plan);
        let Some(target) = self.target else {
            return self.forward(now);
        };
        let (Some(guarded), Some(slot)) = (plan.guarded(target), plan.slot(target)) else {
            return self.forward(now);
        };
        slot.metrics.rejected(reason);
        let request = ClientRequest {
            api: self.api,
            stream: self.stream,
            model: &self.model,
        };
        match degrade(&guarded.cfg.degrade, reason, retry_after, &request, now) {
            Degradation::Reply(reply) => {
                self.reply(slot, &reply);
                Next::Hold
            }
            Degradation::Reroute(reroute) => {
                let retry_after = retry_after.unwrap_or(guarded.cfg.degrade.retry_after);
                if self.reroute(&reroute, body, now, rand) {
                    slot.metrics.fallback.inc();
                    self.forward(now)
                } else {
                    self.reply(slot, &fail_fast(reason, retry_after, self.api));
                    Next::Hold
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
        body: Option<&[u8]>,
        now: Timestamp,
        rand: f64,
    ) -> bool {
        let from_header = self.plan.policy.model.from == ModelFrom::Header;
        let new_body = match body {
            Some(b) => match rewrite_model(b, &reroute.model) {
                Ok(new) => Some((b.len(), new)),
                Err(_) if from_header => None,
                Err(_) => return false,
            },
            None if from_header => None,
            None => return false,
        };
        let backend = reroute
            .request_headers
            .iter()
            .find(|(name, _)| *name == sluice_core::breaker::BACKEND_HEADER)
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
            host::set_request_header(name, Some(value));
        }
        if from_header {
            host::set_request_header(&plan.policy.model.header, Some(&reroute.model));
        }
        if let Some((old_len, new)) = new_body {
            host::replace_request_body(old_len, &new);
            // The length changed; Envoy recomputes it when it is absent.
            host::set_request_header("content-length", None);
        }
        self.response_headers = reroute.response_headers.clone();
        self.model = reroute.model.clone();
        true
    }

    fn reply(&mut self, slot: &CircuitSlot, reply: &LocalReply) {
        let kind = reply
            .headers
            .iter()
            .find(|(name, _)| *name == DEGRADED_HEADER)
            .map(|(_, v)| v.as_str());
        match kind {
            Some("static") => slot.metrics.static_answer.inc(),
            _ => slot.metrics.fail_fast.inc(),
        }
        host::send_reply(reply.status, &reply.headers, &reply.body);
        self.phase = Phase::Replied;
    }

    // --- tick ---

    /// The root's tick: poll the queue while waiting; renew leases while
    /// streaming. Acts on shared data only; the caller does what it returns
    /// with this flow's context made effective.
    pub fn on_tick(&mut self, now: Timestamp) -> TickAction {
        let plan = Rc::clone(&self.plan);
        let Some(target) = self.target else {
            return TickAction::Nothing;
        };
        let (Some(guarded), Some(slot)) = (plan.guarded(target), plan.slot(target)) else {
            return TickAction::Nothing;
        };
        let cfg = &guarded.cfg;
        match self.phase {
            Phase::Queued => {
                let Some(ticket) = self.ticket else {
                    return TickAction::Nothing;
                };
                let polled = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                    (b.poll(&cfg.bulkhead, ticket, now), b.queue_len())
                });
                let polled = match polled {
                    Ok((poll, depth)) => {
                        slot.metrics.queue_depth.set(u64::from(depth));
                        poll
                    }
                    // Try again on the next tick; `max_wait` still bounds it.
                    Err(_) => return TickAction::Nothing,
                };
                match polled {
                    Poll::Waiting { .. } => TickAction::Nothing,
                    Poll::Granted { lease, waited } => {
                        self.ticket = None;
                        self.lease = Some(lease);
                        slot.metrics
                            .queue_wait_ms
                            .record(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
                        self.forward(now);
                        TickAction::Resume
                    }
                    Poll::TimedOut => {
                        self.ticket = None;
                        self.abandon_probe(slot);
                        let reason = RejectReason::QueueTimeout;
                        slot.metrics.rejected(reason);
                        let request = ClientRequest {
                            api: self.api,
                            stream: self.stream,
                            model: &self.model,
                        };
                        // A request that waited `max_wait` is answered, not
                        // rerouted: its body was handed to Envoy when it
                        // paused and is not rewritten from a tick.
                        let reply = match degrade(&cfg.degrade, reason, None, &request, now) {
                            Degradation::Reply(reply) => reply,
                            Degradation::Reroute(_) => {
                                fail_fast(reason, cfg.degrade.retry_after, self.api)
                            }
                        };
                        match reply
                            .headers
                            .iter()
                            .find(|(n, _)| *n == DEGRADED_HEADER)
                            .map(|(_, v)| v.as_str())
                        {
                            Some("static") => slot.metrics.static_answer.inc(),
                            _ => slot.metrics.fail_fast.inc(),
                        }
                        self.phase = Phase::Replied;
                        TickAction::Reply(reply)
                    }
                }
            }
            Phase::Forwarded => {
                if let Some(lease) = self.lease
                    && lease.due(now)
                {
                    let tenant = self.tenant.clone();
                    if let Ok(renewed) = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                        b.renew(&cfg.bulkhead, &tenant, lease, now)
                    }) {
                        self.lease = renewed;
                    }
                }
                if let Some(probe) = self.probe
                    && now.since(self.probe_renewed) >= PROBE_RENEW_EVERY
                    && let Some(key) = slot.circuit_keys.get(self.circuit_index)
                {
                    self.probe_renewed = now;
                    if let Ok(false) =
                        shared::modify(key, |c: &mut Circuit| c.renew_probe(probe, now))
                    {
                        // Its period ended; the outcome may still count.
                        self.probe_renewed = now;
                    }
                }
                TickAction::Nothing
            }
            _ => TickAction::Nothing,
        }
    }

    // --- response ---

    /// `now` is the host's clock, asked only when the time is needed (each
    /// ask is a call out of the VM).
    pub fn on_response_headers(&mut self, end_of_stream: bool, now: impl Fn() -> Timestamp) {
        if self.phase != Phase::Forwarded {
            return;
        }
        self.status = host::response_header(":status").and_then(|s| s.trim().parse().ok());
        for (name, value) in &self.response_headers {
            host::set_response_header(name, value);
        }
        if end_of_stream {
            self.first_byte.get_or_insert_with(now);
        }
        let sse = host::response_header("content-type")
            .is_some_and(|t| t.trim_start().starts_with("text/event-stream"));
        if sse {
            self.sse = Some(SseLineReader::new(MAX_SSE_LINE));
        }
    }

    /// `now` as in [`Flow::on_response_headers`]: a JSON answer's later
    /// chunks need no time.
    pub fn on_response_body(&mut self, size: usize, now: impl Fn() -> Timestamp) {
        if self.phase != Phase::Forwarded || size == 0 {
            return;
        }
        self.first_byte.get_or_insert_with(&now);
        let Some(reader) = self.sse.as_mut() else {
            return;
        };
        let Some(chunk) = host::response_body(size) else {
            return;
        };
        // Output tokens, approximately: one streamed `data:` event each
        // (OpenAI sends a chunk per token or few; Anthropic a delta).
        let mut events = 0u32;
        reader.feed(&chunk, |line| {
            if line.starts_with(b"data:") && !line.ends_with(b"[DONE]") {
                events = events.saturating_add(1);
            }
        });
        if events > 0 {
            let now = now();
            self.events = self.events.saturating_add(events);
            self.first_event.get_or_insert(now);
            self.last_event = Some(now);
        }
    }

    /// The end of the stream (`on_log`, also after resets and local
    /// replies): record the outcome, give back the slot, the probe or the
    /// place in the queue. Runs once.
    pub fn finish(&mut self, now: Timestamp, rand: f64) {
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
            Phase::Forwarded => {
                let flags = ResponseFlags::from_envoy_bits(
                    host::property_u64(&["response", "flags"]).unwrap_or(0),
                );
                let ttft = match (self.sent_at, self.first_byte) {
                    (Some(sent), Some(first)) => Some(first.since(sent)),
                    _ => None,
                };
                let tpot = match (self.first_event, self.last_event) {
                    (Some(first), Some(last)) if self.events >= 2 => {
                        Some(last.since(first) / (self.events - 1))
                    }
                    _ => None,
                };
                let endpoint = if guarded.endpoints.is_empty() {
                    0
                } else {
                    let address = host::property_string(&["upstream", "address"]);
                    guarded.endpoint_index(address.as_deref())
                };
                let mut probe = self.probe.take();
                if endpoint != self.circuit_index {
                    // Admitted by another endpoint's circuit than the one it
                    // reached: the probe proves nothing about that one.
                    if let (Some(p), Some(key)) = (probe, slot.circuit_keys.get(self.circuit_index))
                    {
                        let _ = shared::modify(key, |c: &mut Circuit| c.abandon(p));
                    }
                    probe = None;
                }
                let outcome = classify(self.status, flags, ttft, tpot, cfg);
                if let Some(key) = slot.circuit_keys.get(endpoint) {
                    let recorded = shared::modify(key, |c: &mut Circuit| match outcome {
                        Some(o) => (c.record(cfg, now, o, probe, rand), c.state(now)),
                        None => {
                            if let Some(p) = probe {
                                c.abandon(p);
                            }
                            (None, c.state(now))
                        }
                    });
                    if let Some(cache) = slot.closed.get(endpoint) {
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
                            None if endpoint == 0 => slot.metrics.observe_state(state),
                            None => {}
                        }
                    }
                }
                if let Some(lease) = self.lease.take() {
                    let _ = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                        b.release(lease, now)
                    });
                }
            }
            _ => {
                if let Some(lease) = self.lease.take() {
                    let _ = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| {
                        b.release(lease, now)
                    });
                }
                self.abandon_probe(slot);
            }
        }
    }

    fn abandon_probe(&mut self, slot: &CircuitSlot) {
        if let (Some(probe), Some(key)) =
            (self.probe.take(), slot.circuit_keys.get(self.circuit_index))
        {
            let _ = shared::modify(key, |c: &mut Circuit| c.abandon(probe));
        }
    }

    fn cancel_ticket(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let plan = Rc::clone(&self.plan);
        if let Some(slot) = self.target.and_then(|t| plan.slot(t)) {
            let _ = shared::modify(&slot.bulkhead_key, |b: &mut Bulkhead| b.cancel(ticket));
        }
    }
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
