//! One request's way through the engine, driven by Envoy's stream callbacks
//! and, while it waits, by the root's tick.
//!
//! An [`Exchange`] is shared between its HTTP context and the root (which
//! holds it while it waits). Host calls that may call back into the stream
//! (resuming it, answering it) are made with the exchange released.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use sluice_core::breaker::BACKEND_HEADER;
use sluice_core::llm::{ApiShape, ErrorKind, LocalReply, rewrite_body};
use sluice_core::outcome::ResponseFlags;
use sluice_core::tenant::identify;
use sluice_core::time::Timestamp;

use super::observe::Observation;
use super::request::{BodyRead, RequestContext, choose_model, needs_pin, read_body};
use super::root::{Config, Vm};
use super::{Admission, Edits, Flow, Verdict, Wake};
use crate::host::{self, Buffer, Headers, Map};

/// Request headers only sluice may set: a client's copy is removed before
/// anything reads the route table (a client naming its own endpoint would
/// step around ejections).
pub const INTERNAL_REQUEST_HEADERS: &[&str] =
    &[BACKEND_HEADER, sluice_core::outlier::DESTINATION_HEADER];

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not an LLM call, or no configuration: nothing to do.
    Passthrough,
    /// Held while the body arrives.
    Reading,
    /// Held until a capability's tick wakes it.
    Waiting,
    /// Sent upstream.
    Forwarded,
    /// Answered by sluice.
    Replied,
    /// Settled.
    Done,
}

/// Where an admission pass ended.
enum Step {
    Go,
    Wait,
    Reply(LocalReply),
}

/// The engine's state of one request.
pub(crate) struct Exchange {
    context_id: u32,
    config: Option<Rc<Config>>,
    phase: Phase,
    path: String,
    shape: ApiShape,
    tenant: String,
    /// The request headers as they arrived (one host call for all).
    headers: Headers,
    /// The body size Envoy holds (the last body callback's).
    body_size: usize,
    request: Option<RequestContext>,
    /// The capability to ask next (after a wait).
    next: usize,
    flows: Vec<Box<dyn Flow>>,
    edits: Edits,
    observation: Observation,
}

impl Exchange {
    fn new(context_id: u32, config: Option<Rc<Config>>) -> Self {
        Exchange {
            context_id,
            config,
            phase: Phase::Passthrough,
            path: String::new(),
            shape: ApiShape::Other,
            tenant: String::new(),
            headers: Headers::default(),
            body_size: 0,
            request: None,
            next: 0,
            flows: Vec::new(),
            edits: Edits::default(),
            observation: Observation::default(),
        }
    }

    /// Request headers. Returns whether the request is held.
    fn on_request_headers(&mut self, end_of_stream: bool, vm: &Vm) -> Held {
        let headers = host::headers(Map::RequestHeaders).unwrap_or_default();
        for name in INTERNAL_REQUEST_HEADERS {
            if headers.has(name) {
                host::set_request_header(name, None);
            }
        }
        let Some(config) = self.config.clone() else {
            return Held::No;
        };
        self.path = headers.text(":path").unwrap_or_default().to_string();
        self.shape = ApiShape::from_path(&self.path);
        if self.shape == ApiShape::Other {
            return Held::No;
        }
        self.headers = headers;
        let headers = &self.headers;
        match identify(&config.policy.tenant, |name| {
            headers.get(name).map(<[u8]>::to_vec)
        }) {
            Ok(tenant) => self.tenant = tenant,
            Err(e) => {
                let api = self.shape.vendor(sluice_core::config::Api::Openai);
                let reply = LocalReply::error(
                    api,
                    ErrorKind::InvalidRequest {
                        param: Some("authorization"),
                    },
                    &e.to_string(),
                    [],
                );
                return self.answer(reply);
            }
        }
        self.phase = Phase::Reading;
        let length = self
            .headers
            .text("content-length")
            .and_then(|l| l.trim().parse::<u64>().ok());
        if end_of_stream {
            return self.judge(Some(Vec::new()), vm);
        }
        if let Some(length) = length
            && length > config.max_body
        {
            return self.judge_too_large(length, vm);
        }
        Held::Yes
    }

    /// A request body chunk (`size`: all Envoy holds so far).
    fn on_request_body(&mut self, size: usize, end_of_stream: bool, vm: &Vm) -> Held {
        match self.phase {
            Phase::Reading => {}
            // Waiting or answered: the body waits with the request.
            Phase::Waiting | Phase::Replied => return Held::Yes,
            _ => return Held::No,
        }
        self.body_size = size;
        let max_body = self.config.as_ref().map_or(u64::MAX, |c| c.max_body);
        if u64::try_from(size).unwrap_or(u64::MAX) > max_body {
            return self.judge_too_large(u64::try_from(size).unwrap_or(u64::MAX), vm);
        }
        if !end_of_stream {
            return Held::Yes;
        }
        let body = host::buffer(Buffer::RequestBody, size).unwrap_or_default();
        self.judge(Some(body), vm)
    }

    /// Request trailers: the request ends here rather than with a body
    /// chunk marked end-of-stream (HTTP/2, gRPC-web), and is judged exactly
    /// as it would have been there.
    fn on_request_trailers(&mut self, vm: &Vm) -> Held {
        match self.phase {
            Phase::Reading => {
                let body = if self.body_size > 0 {
                    host::buffer(Buffer::RequestBody, self.body_size).unwrap_or_default()
                } else {
                    Vec::new()
                };
                self.judge(Some(body), vm)
            }
            Phase::Waiting | Phase::Replied => Held::Yes,
            _ => Held::No,
        }
    }

    fn judge_too_large(&mut self, length: u64, vm: &Vm) -> Held {
        self.build_request(BodyRead::TooLarge { length });
        self.admit_from(0, vm)
    }

    fn judge(&mut self, body: Option<Vec<u8>>, vm: &Vm) -> Held {
        let Some(config) = self.config.clone() else {
            return Held::No;
        };
        let bytes = body.unwrap_or_default();
        let info = read_body(&self.path, &bytes, config.reads_prompt);
        self.build_request(BodyRead::Read { bytes, info });
        self.admit_from(0, vm)
    }

    /// Works out the request's context, once, and pins its route.
    fn build_request(&mut self, body: BodyRead) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let policy = &config.policy;
        let body_model = match &body {
            BodyRead::Read { info, .. } => info.model.as_deref(),
            BodyRead::TooLarge { .. } => None,
        };
        let headers = &self.headers;
        let model = choose_model(policy, body_model, |name| {
            headers.text(name).map(str::to_string)
        });
        let stream = match &body {
            BodyRead::Read { info, .. } => info.stream,
            BodyRead::TooLarge { .. } => false,
        };
        let authority = self
            .headers
            .text(":authority")
            .unwrap_or_default()
            .to_string();
        let backend = policy.route(&self.path, &authority, &model, &self.tenant);
        let api = self
            .shape
            .vendor(backend.map_or(sluice_core::config::Api::Openai, |b| b.api));
        let index = backend.and_then(|b| policy.backends.iter().position(|x| x.name == b.name));
        if let Some(b) = backend
            && needs_pin(policy, &b.name)
        {
            // Envoy's route table cannot read the body (model routes), so
            // the engine names the backend it resolved.
            self.edits
                .request_headers
                .push((BACKEND_HEADER.to_string(), Some(b.name.clone())));
        }
        self.request = Some(RequestContext {
            path: std::mem::take(&mut self.path),
            authority,
            shape: self.shape,
            tenant: std::mem::take(&mut self.tenant),
            api,
            model,
            stream,
            body,
            backend: index,
        });
    }

    /// Asks the capabilities from `start` on, then acts on the outcome.
    fn admit_from(&mut self, start: usize, vm: &Vm) -> Held {
        let now = host::now();
        match self.run(start, vm, now) {
            Step::Go => {
                self.apply_edits();
                self.forward(now);
                Held::No
            }
            Step::Wait => {
                self.apply_edits();
                self.phase = Phase::Waiting;
                Held::Wait
            }
            Step::Reply(reply) => self.answer(reply),
        }
    }

    /// One admission pass from capability `start`.
    fn run(&mut self, start: usize, vm: &Vm, now: Timestamp) -> Step {
        let (Some(config), Some(request)) = (self.config.clone(), self.request.as_ref()) else {
            return Step::Go;
        };
        for (index, cap) in config.caps.iter().enumerate().skip(start) {
            let mut admission = Admission {
                request,
                edits: &mut self.edits,
                now,
                rand: vm.rand(),
                context_id: self.context_id,
            };
            let admitted = cap.admit(&mut admission);
            if let Some(flow) = admitted.flow {
                self.flows.push(flow);
            }
            match admitted.verdict {
                Verdict::Go => {}
                Verdict::Wait => {
                    self.next = index + 1;
                    return Step::Wait;
                }
                Verdict::Reply(reply) => return Step::Reply(reply),
            }
        }
        Step::Go
    }

    /// Applies the capabilities' request edits: headers, then the body,
    /// rewritten once, with its new `content-length` (Envoy does not
    /// recompute it: without one the request would go upstream chunked).
    fn apply_edits(&mut self) {
        for (name, value) in self.edits.properties.drain(..) {
            let _ = host::set_property(&[name], &value);
        }
        for (name, value) in self.edits.request_headers.drain(..) {
            // Removing a header the request never had is a host call saved.
            if value.is_some() || self.headers.has(&name) {
                host::set_request_header(&name, value.as_deref());
            }
        }
        let mut body = self.edits.body.take();
        let rewrite = std::mem::take(&mut self.edits.rewrite);
        if !rewrite.is_empty() {
            let source = body
                .as_deref()
                .or_else(|| self.request.as_ref().and_then(RequestContext::bytes));
            if let Some(rewritten) = source.and_then(|b| rewrite_body(b, &rewrite)) {
                body = Some(rewritten);
            }
        }
        let Some(body) = body else {
            return;
        };
        if host::replace_buffer(Buffer::RequestBody, self.body_size, &body).is_ok() {
            host::set_request_header("content-length", Some(&body.len().to_string()));
            self.body_size = body.len();
            if let Some(RequestContext {
                body: BodyRead::Read { bytes, .. },
                ..
            }) = self.request.as_mut()
            {
                *bytes = body;
            }
        }
    }

    fn forward(&mut self, now: Timestamp) {
        self.phase = Phase::Forwarded;
        self.observation.sent_at = Some(now);
    }

    /// Answers the request with `reply`.
    fn answer(&mut self, reply: LocalReply) -> Held {
        self.phase = Phase::Replied;
        self.observation.replied_locally = true;
        Held::Reply(reply)
    }

    /// Response headers from the upstream: observed, then each flow adds
    /// what it wants to say.
    fn on_response_headers(&mut self, end_of_stream: bool) {
        if self.phase != Phase::Forwarded {
            return;
        }
        let reads_usage = self.config.as_ref().is_some_and(|c| c.reads_usage);
        let headers = host::headers(Map::ResponseHeaders).unwrap_or_default();
        let status = headers.text(":status").and_then(|s| s.trim().parse().ok());
        self.observation.on_headers(
            status,
            headers.text("content-type"),
            headers.text("content-encoding"),
            end_of_stream,
            reads_usage,
            host::now,
        );
        if self.config.as_ref().is_some_and(|c| c.reads_endpoint) {
            self.observation.upstream_address = host::property_string(&["upstream", "address"]);
        }
        let mut add = std::mem::take(&mut self.edits.response_headers);
        for flow in &mut self.flows {
            flow.response_headers(&self.observation, &mut add);
        }
        for (name, value) in &add {
            host::set_response_header(name, value);
        }
    }

    fn on_response_body(&mut self, size: usize, end_of_stream: bool, vm: &Vm) {
        if self.phase != Phase::Forwarded || (size == 0 && !end_of_stream) {
            return;
        }
        let chunk = if size > 0 && self.observation.reads_body() {
            host::buffer(Buffer::ResponseBody, size)
        } else {
            None
        };
        self.observation.on_chunk(
            size,
            chunk.as_deref(),
            end_of_stream,
            &vm.json_budget,
            host::now,
        );
        if let Some(chunk) = &chunk {
            for flow in &mut self.flows {
                flow.response_chunk(chunk, &self.observation);
            }
        }
    }

    /// The request is over (`on_log`, or `on_done` if Envoy skipped it):
    /// every flow settles, once.
    fn finish(&mut self, vm: &Vm) {
        let phase = self.phase;
        if phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        if phase == Phase::Waiting {
            vm.waiting.borrow_mut().remove(&self.context_id);
            if let Some(cap) = self
                .config
                .as_ref()
                .and_then(|c| c.caps.get(self.next.saturating_sub(1)))
            {
                cap.forget(self.context_id);
            }
        }
        if phase == Phase::Forwarded {
            if self.config.as_ref().is_some_and(|c| c.reads_flags) {
                self.observation.flags = ResponseFlags::from_envoy_bits(
                    host::property_u64(&["response", "flags"]).unwrap_or(0),
                );
            }
            if self.config.as_ref().is_some_and(|c| c.reads_attempts) {
                self.observation.attempts =
                    host::property_u64(&["upstream", "request_attempt_count"])
                        .and_then(|n| u32::try_from(n).ok());
            }
            if self.observation.upstream_address.is_none()
                && self.config.as_ref().is_some_and(|c| c.reads_endpoint)
            {
                self.observation.upstream_address = host::property_string(&["upstream", "address"]);
            }
        }
        self.observation.release(&vm.json_budget);
        if self.flows.is_empty() {
            return;
        }
        let now = host::now();
        self.observation.close(now);
        for flow in &mut self.flows {
            flow.done(&mut self.observation, now);
        }
    }

    /// A capability's tick decided the fate of this waiting request.
    pub(crate) fn wake(exchange: &Rc<RefCell<Exchange>>, vm: &Vm, wake: Wake, now: Timestamp) {
        let (id, held) = {
            let mut ex = exchange.borrow_mut();
            if ex.phase != Phase::Waiting {
                return;
            }
            vm.waiting.borrow_mut().remove(&ex.context_id);
            // Host calls below act on this request's stream.
            if host::set_effective_context(ex.context_id).is_err() {
                return;
            }
            let held = match wake {
                Wake::Resume => {
                    let next = ex.next;
                    match ex.run(next, vm, now) {
                        Step::Go => {
                            ex.apply_edits();
                            ex.forward(now);
                            Held::No
                        }
                        Step::Wait => {
                            ex.apply_edits();
                            Held::Wait
                        }
                        Step::Reply(reply) => ex.answer(reply),
                    }
                }
                Wake::Reply(reply) => ex.answer(reply),
            };
            (ex.context_id, held)
        };
        match held {
            Held::No => {
                let _ = host::resume_request();
            }
            Held::Wait => {
                vm.waiting.borrow_mut().insert(id, Rc::clone(exchange));
            }
            Held::Reply(reply) => send(&reply),
            Held::Yes => {}
        }
    }
}

/// What a callback does with the stream.
enum Held {
    /// Let it go on.
    No,
    /// Hold it (more body to come, or the request waits with its body).
    Yes,
    /// Hold it until a capability's tick wakes it.
    Wait,
    /// Answer it (with the exchange released).
    Reply(LocalReply),
}

fn send(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let _ = host::send_local_response(reply.status, &headers, reply.body.as_bytes());
}

/// The HTTP context of one request.
pub(crate) struct ExchangeHttp {
    exchange: Rc<RefCell<Exchange>>,
    vm: Rc<Vm>,
}

impl ExchangeHttp {
    pub(crate) fn new(context_id: u32, config: Option<Rc<Config>>, vm: Rc<Vm>) -> Self {
        ExchangeHttp {
            exchange: Rc::new(RefCell::new(Exchange::new(context_id, config))),
            vm,
        }
    }

    /// Turns an exchange's answer into the callback's action (the
    /// exchange is no longer borrowed here).
    fn act(&self, held: Held) -> Action {
        match held {
            Held::No => Action::Continue,
            Held::Yes => Action::Pause,
            Held::Wait => {
                let id = self.exchange.borrow().context_id;
                self.vm
                    .waiting
                    .borrow_mut()
                    .insert(id, Rc::clone(&self.exchange));
                Action::Pause
            }
            Held::Reply(reply) => {
                send(&reply);
                Action::Pause
            }
        }
    }

    fn finish(&self) {
        self.exchange.borrow_mut().finish(&self.vm);
    }
}

impl Context for ExchangeHttp {
    fn on_done(&mut self) -> bool {
        // Envoy runs on_log first; this only matters if it did not.
        self.finish();
        true
    }
}

impl HttpContext for ExchangeHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let held = self
            .exchange
            .borrow_mut()
            .on_request_headers(end_of_stream, &self.vm);
        self.act(held)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let held = self
            .exchange
            .borrow_mut()
            .on_request_body(body_size, end_of_stream, &self.vm);
        self.act(held)
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        let held = self.exchange.borrow_mut().on_request_trailers(&self.vm);
        self.act(held)
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.exchange
            .borrow_mut()
            .on_response_headers(end_of_stream);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.exchange
            .borrow_mut()
            .on_response_body(body_size, end_of_stream, &self.vm);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}
