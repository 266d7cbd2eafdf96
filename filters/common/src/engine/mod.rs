//! The engine: one proxy-wasm filter that runs every capability a policy
//! enables, in one pass over each request.
//!
//! # Why one engine
//!
//! Each Wasm filter in Envoy's chain pays the runtime again: its own VM
//! crossings per callback, its own copy of the headers and body, its own
//! parse. Two capabilities built as two filters were measured at +53 and
//! +59 µs of Envoy CPU per request each, against +16 µs for a filter that
//! only holds and reads the body (`benches/envoy-cpu.md`): the cost was in
//! the work each did again. Here that work is done once — identity, route,
//! one body parse, one response observation, one owner of shared state —
//! and a capability adds only its own algorithm.
//!
//! # A request's way
//!
//! 1. **Request headers** ([`http`]): internal headers a client sent
//!    (`x-sluice-backend`) are removed whatever the policy enables; requests
//!    that are not LLM calls (`/v1/models`, health checks) pass untouched.
//!    LLM calls are held while their body arrives (up to the policy's
//!    `max_body`).
//! 2. **Request context**, once ([`RequestContext`]): tenant, API shape,
//!    model, stream flag, the parsed body ([`RequestInfo`]) and the backend
//!    the policy routes it to, pinned with `x-sluice-backend` so Envoy's
//!    route table sends it there. Built at the body's end, or at the
//!    trailers of a request that ends with trailers (HTTP/2, gRPC-web):
//!    the decision is the same either way.
//! 3. **Admission**, capability by capability in the order the module gives
//!    them (tokens, breaker, outlier): each may let the request go, answer it
//!    ([`Verdict::Reply`], which ends the pass: later capabilities never see
//!    it, earlier ones see it as done without an upstream), or make it wait
//!    ([`Verdict::Wait`]: the capability wakes it from its tick). Each may
//!    also edit the request ([`Edits`]): headers, the model, the body. The
//!    body is rewritten once, at the end, with its new `content-length`.
//! 4. **Response**, observed once ([`Observation`]): status, framing, time
//!    to first byte and to each streamed event, usage as it streams by.
//!    Every capability's [`Flow`] is shown the same observation.
//! 5. **Done** (`on_log`, which Envoy also runs after resets and local
//!    replies): Envoy's `response.flags` and the upstream address complete
//!    the observation, and every flow settles: charge or refund tokens,
//!    record the circuit's outcome, release slots.
//!
//! The same module also runs as an upstream filter of the clusters (root id
//! [`ATTEMPT_ROOT_ID`]), once per attempt, retries included: there it only
//! observes each attempt (endpoint, attempt number, status, first byte,
//! Envoy's flags) and hands it to [`Capability::attempt`].
//!
//! A capability is one [`Capability`] implementation (its admission, its
//! tick, its attempts) and one [`Flow`] per admitted request (its response
//! hooks): it never touches the proxy-wasm contexts, the body or the policy
//! loading.
//! Adding one is described in `filters/README.md`.

mod attempt;
mod http;
mod observe;
mod request;
mod root;

use std::time::Duration;

use sluice_core::config::Policy;
use sluice_core::llm::LocalReply;
use sluice_core::time::Timestamp;

pub use attempt::{ATTEMPT_ROOT_ID, Attempt, FIRST_TOKEN_PROPERTY};
pub use observe::Observation;
pub use request::{BodyRead, RequestContext};
pub use root::{Engine, start};

/// What a capability decided about a request.
#[derive(Debug)]
pub enum Verdict {
    /// Let it go on (to the next capability, then the upstream).
    Go,
    /// Hold it: the capability wakes it from its tick ([`Wake`]).
    Wait,
    /// Answer it now; no later capability sees it.
    Reply(LocalReply),
}

/// A waiting request's fate, decided in a capability's tick.
#[derive(Debug)]
pub enum Wake {
    /// Go on (later capabilities still judge it).
    Resume,
    /// Answer it.
    Reply(LocalReply),
}

/// Changes a capability asks for on the request it admits. The engine
/// applies them once every capability has spoken.
#[derive(Debug, Default)]
pub struct Edits {
    /// Request headers to set (`Some`) or remove (`None`).
    pub request_headers: Vec<(String, Option<String>)>,
    /// Headers to add to the response when it comes back.
    pub response_headers: Vec<(&'static str, String)>,
    /// Properties of the stream to set (Envoy filter state): what the
    /// per-attempt instance must know, without a header going upstream.
    pub properties: Vec<(&'static str, Vec<u8>)>,
    /// A replacement body (a capability that rewrote the model itself).
    pub body: Option<Vec<u8>>,
    /// Body edits (include usage in streams, lower the completion cap),
    /// applied on top of `body` when there is one.
    pub rewrite: sluice_core::llm::Rewrite,
    /// The request's zones in order of preference, by the index of the
    /// zone in its backend (`[failover]` sets it; the endpoint picker keeps
    /// to rank 0 and falls back through the others,
    /// `sluice_core::outlier::pick`). `None`: no zone preference.
    pub zone_ranks: Option<Vec<sluice_core::outlier::pick::Rank>>,
}

impl Edits {
    /// The last value an earlier capability gave request header `name`
    /// (`Some(None)`: removed), `None` when none touched it.
    pub fn request_header(&self, name: &str) -> Option<Option<&str>> {
        self.request_headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_deref())
    }

    /// Sets request header `name`, replacing what an earlier capability
    /// asked for it.
    pub fn set_request_header(&mut self, name: &str, value: Option<String>) {
        self.request_headers.retain(|(n, _)| n != name);
        self.request_headers.push((name.to_owned(), value));
    }
}

/// One capability's admission of one request.
pub struct Admission<'a> {
    pub request: &'a RequestContext,
    pub edits: &'a mut Edits,
    pub now: Timestamp,
    /// A uniform draw in `[0, 1)` for this admission (jitter, shedding).
    pub rand: f64,
    /// This request's stream (context) id: the key a capability keeps it
    /// under while it waits.
    pub context_id: u32,
}

impl Admission<'_> {
    /// The backend the request goes to: the one an earlier capability
    /// rerouted it to (the breaker's fallback, through `x-sluice-backend`),
    /// else the one the policy routed it to. `None` for a reroute to a
    /// backend the policy does not have.
    pub fn backend<'p>(&self, policy: &'p Policy) -> Option<&'p sluice_core::config::Backend> {
        match self
            .edits
            .request_header(sluice_core::breaker::BACKEND_HEADER)
        {
            Some(name) => policy.backend(name.unwrap_or_default()),
            None => self.request.backend.and_then(|i| policy.backends.get(i)),
        }
    }
}

/// What a capability returns for one request.
pub struct Admitted {
    pub verdict: Verdict,
    /// The capability's state for this request, shown the response and
    /// told when it is done; `None` when it has nothing to follow.
    pub flow: Option<Box<dyn Flow>>,
}

impl Admitted {
    /// Nothing to follow; let it go.
    pub fn pass() -> Self {
        Admitted {
            verdict: Verdict::Go,
            flow: None,
        }
    }
}

/// A capability's state for one admitted request.
///
/// Hooks run in this order: [`Flow::response_headers`] once (unless no
/// response came), [`Flow::response_chunk`] per body chunk, then
/// [`Flow::done`] exactly once, also when the request never reached the
/// upstream (a later capability answered it, the client left while it
/// waited): the flow must then give back whatever it holds.
pub trait Flow {
    /// The upstream's response headers (already in `observation`); headers
    /// to add to the response go into `add`.
    fn response_headers(
        &mut self,
        observation: &Observation,
        add: &mut Vec<(&'static str, String)>,
    ) {
        let _ = (observation, add);
    }

    /// A response body chunk, after the engine's observation took it in.
    fn response_chunk(&mut self, chunk: &[u8], observation: &Observation) {
        let _ = (chunk, observation);
    }

    /// The request is over; `observation` says how it went (no status and
    /// no `sent_at` when it never reached the upstream).
    fn done(&mut self, observation: &mut Observation, now: Timestamp);
}

/// One capability of the engine, configured from one policy.
pub trait Capability {
    /// Its name, for logs (`tokens`, `breaker`).
    fn name(&self) -> &'static str;

    /// Judges a request once its context is known.
    fn admit(&self, admission: &mut Admission<'_>) -> Admitted;

    /// Whether it reads the response's token usage (the engine then
    /// buffers JSON answers to read it; SSE is always read as it passes).
    fn reads_usage(&self) -> bool {
        false
    }

    /// Whether it needs the prompt's size (the engine then parses the whole
    /// body, not just `model` and `stream`).
    fn reads_prompt(&self) -> bool {
        false
    }

    /// Whether it judges outcomes by Envoy's `response.flags` (resets,
    /// timeouts, connect failures: one host call per request).
    fn reads_flags(&self) -> bool {
        false
    }

    /// Whether it may ask, through [`FIRST_TOKEN_PROPERTY`], that attempts
    /// hold their response headers until the first token (the per-attempt
    /// instance then reads that property on every attempt).
    fn holds_first_token(&self) -> bool {
        false
    }

    /// Whether it counts a request's upstream attempts
    /// ([`Observation::attempts`], one host call per request).
    fn reads_attempts(&self) -> bool {
        false
    }

    /// Whether it reads every attempt's rate-limit headers
    /// ([`Attempt::headroom`]: the per-attempt instance then reads the
    /// whole response header map, one host call per attempt).
    fn reads_quota(&self) -> bool {
        false
    }

    /// Whether it needs the upstream address a request reached
    /// ([`Observation::upstream_address`], one host call per request).
    fn reads_endpoint(&self) -> bool {
        false
    }

    /// How often it wants [`Capability::tick`], if at all.
    fn tick_period(&self) -> Option<Duration> {
        None
    }

    /// The root's tick: wake waiting requests (`wake(context_id, Wake)`),
    /// renew leases, refresh gauges.
    fn tick(&self, now: Timestamp, wake: &mut dyn FnMut(u32, Wake)) {
        let _ = (now, wake);
    }

    /// The client left while a request this capability holds was waiting
    /// (its flow's `done` follows).
    fn forget(&self, context_id: u32) {
        let _ = context_id;
    }

    /// Whether it learns from each upstream attempt (retries included): the
    /// render then adds the engine as an upstream filter of the clusters.
    fn needs_attempts(&self) -> bool {
        false
    }

    /// One upstream attempt left for its endpoint (`status` and the rest
    /// are not known yet).
    fn attempt_started(&self, attempt: &Attempt) {
        let _ = attempt;
    }

    /// One upstream attempt ended (the engine's per-attempt instance, in
    /// the cluster's filter chain; it shares state with the request's).
    fn attempt(&self, attempt: &Attempt) {
        let _ = attempt;
    }

    /// How often the per-attempt instance wants [`Capability::attempt_tick`].
    fn attempt_tick_period(&self) -> Option<Duration> {
        None
    }

    /// The per-attempt instance's tick (it holds no requests: flush what
    /// attempts taught it).
    fn attempt_tick(&self, now: Timestamp) {
        let _ = now;
    }
}

/// Builds the capabilities a policy enables; called on every (re)configure.
/// A capability whose section is off is simply not in the list: a disabled
/// section costs nothing per request.
pub type Builder = fn(&Policy) -> Vec<Box<dyn Capability>>;
