//! One line of `requests.jsonl`: what a client saw for one request.

use std::collections::BTreeMap;

use serde::Serialize;

/// Response headers copied into the record when present.
pub const CAPTURED_HEADERS: &[&str] = &[
    "x-sluice-endpoint",
    "x-sluice-zone",
    "x-sluice-degraded",
    "x-sluice-limited",
    "x-llm-sim-zone",
    "x-llm-sim-instance",
    // LiteLLM passes the upstream's headers on with this prefix.
    "llm_provider-x-llm-sim-zone",
    "llm_provider-x-llm-sim-instance",
    "retry-after",
];

/// How a request ended, from the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx whose body ended properly (`data: [DONE]` for an SSE stream).
    Ok,
    /// A status that is not 2xx (the body is read but not judged).
    HttpError,
    /// No response status: connect failure, reset, timeout or abort before
    /// the headers (`status` is 0).
    TransportError,
    /// A 2xx whose body stopped early: reset, timeout or abort mid-body, or
    /// an SSE stream that ended without `data: [DONE]`.
    Cut,
    /// Never sent: the open loop's `--max-in-flight` was reached when it was due.
    Dropped,
}

/// Why a request failed below HTTP, or why its body was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The TCP connection could not be made (refused, unreachable).
    Connect,
    /// `--timeout` elapsed.
    Timeout,
    /// The connection closed or was reset before the response was complete.
    Reset,
    /// An SSE stream ended cleanly at the HTTP level but without `[DONE]`.
    MissingDone,
    /// Still in flight when the run stopped (after a signal's grace period).
    Aborted,
    /// Anything else the HTTP client reported.
    Other,
}

impl ErrorKind {
    /// The snake_case name used in the outputs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::MissingDone => "missing_done",
            ErrorKind::Aborted => "aborted",
            ErrorKind::Other => "other",
        }
    }
}

/// One request as the client saw it. Times are milliseconds; `scheduled_ms`
/// and `start_ms` are relative to the run start, `ttft_ms` and `total_ms` to
/// the *scheduled* start (so waiting to be sent counts as latency).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Sequence number, in the order requests were due (0-based).
    pub id: u64,
    /// Closed loop: which client sent it (null in the open loop).
    pub client: Option<u32>,
    /// Whether the request asked for `stream: true`.
    pub stream: bool,
    /// The tenant header's value, if one was sent.
    pub tenant: Option<String>,
    /// When the request was due.
    pub scheduled_ms: f64,
    /// When it was actually sent (absent when dropped).
    pub start_ms: Option<f64>,
    /// Time to first token: first SSE event carrying a role or content, or
    /// the first body byte of a non-streamed answer; 2xx only.
    pub ttft_ms: Option<f64>,
    /// Until the body ended, failed or timed out (absent when dropped).
    pub total_ms: Option<f64>,
    /// HTTP status, 0 when no status was received.
    pub status: u16,
    pub outcome: Outcome,
    pub error_kind: Option<ErrorKind>,
    /// For SSE answers: whether `data: [DONE]` was seen.
    pub stream_done: Option<bool>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// The [`CAPTURED_HEADERS`] present in the response.
    pub headers: BTreeMap<&'static str, String>,
}

impl Record {
    /// A request that was due but not sent.
    pub fn dropped(id: u64, stream: bool, tenant: Option<String>, scheduled_ms: f64) -> Record {
        Record {
            id,
            client: None,
            stream,
            tenant,
            scheduled_ms,
            start_ms: None,
            ttft_ms: None,
            total_ms: None,
            status: 0,
            outcome: Outcome::Dropped,
            error_kind: None,
            stream_done: None,
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            headers: BTreeMap::new(),
        }
    }
}
