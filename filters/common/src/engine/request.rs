//! What is known about a request when it is judged, worked out once.

use sluice_core::config::{Api, ModelFrom, Policy};
use sluice_core::llm::{ApiShape, RequestInfo, RouteFields};

/// The request as every capability sees it.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// `:path` as Envoy forwards it (after its own normalisation).
    pub path: String,
    pub authority: String,
    /// Which LLM API the path is (never `Other`: those pass untouched).
    pub shape: ApiShape,
    pub tenant: String,
    /// The API shape of sluice's own answers to this client.
    pub api: Api,
    /// The model: the body's (or the header's, as the policy says), else the
    /// other, else the policy's default, else `unknown`.
    pub model: String,
    /// `stream: true` in the body.
    pub stream: bool,
    pub body: BodyRead,
    /// Index in `policy.backends` of the backend the policy routes it to.
    pub backend: Option<usize>,
}

/// How much of the body was read.
#[derive(Clone, Debug)]
pub enum BodyRead {
    /// The whole body, with what it says. `info` is the full parse when a
    /// capability reads prompts (the token limiter), else the two fields
    /// that route (`model`, `stream`) and no prompt size.
    Read { bytes: Vec<u8>, info: RequestInfo },
    /// Larger than the policy's `max_body`: not buffered. Its length, from
    /// `content-length` or from what had arrived when it crossed the limit.
    TooLarge { length: u64 },
}

impl RequestContext {
    /// The parsed body, when it was read.
    pub fn info(&self) -> Option<&RequestInfo> {
        match &self.body {
            BodyRead::Read { info, .. } => Some(info),
            BodyRead::TooLarge { .. } => None,
        }
    }

    /// The body's bytes, when it was read.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.body {
            BodyRead::Read { bytes, .. } => Some(bytes),
            BodyRead::TooLarge { .. } => None,
        }
    }

    /// The backend's name, if the request is routed to one.
    pub fn backend_name<'p>(&self, policy: &'p Policy) -> Option<&'p str> {
        self.backend
            .and_then(|i| policy.backends.get(i))
            .map(|b| b.name.as_str())
    }
}

/// Reads a body: in full when `full` (a capability needs the prompt's
/// size), else only the routing fields (a cheaper, allocation-light walk).
pub fn read_body(path: &str, bytes: &[u8], full: bool) -> RequestInfo {
    if full {
        return RequestInfo::read(path, bytes);
    }
    let fields = RouteFields::read(bytes);
    let mut info = RequestInfo::read(path, b"{}");
    info.model = fields.model;
    info.stream = fields.stream;
    info
}

/// The model of a request: `body_model` or the header's value, in the
/// order the policy says, else its default, else `unknown`.
pub fn choose_model(
    policy: &Policy,
    body_model: Option<&str>,
    header: impl Fn(&str) -> Option<String>,
) -> String {
    let source = &policy.model;
    let from_body = || body_model.map(str::to_string);
    let from_header = || header(&source.header).filter(|m| !m.is_empty());
    let chosen = match source.from {
        ModelFrom::Body => from_body().or_else(from_header),
        ModelFrom::Header => from_header().or_else(from_body),
    };
    chosen
        .or_else(|| source.default.clone())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Whether a request routed to `backend` must name it in `x-sluice-backend`
/// for Envoy to send it there. Without the header Envoy's table (as
/// `sluice render` writes it) tries the policy's explicit routes, then the
/// default backend; only when there are no explicit routes and the backend
/// is the default is the header moot.
pub fn needs_pin(policy: &Policy, backend: &str) -> bool {
    !policy.routes.is_empty() || backend != policy.default_backend
}
