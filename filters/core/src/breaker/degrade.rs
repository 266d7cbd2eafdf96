//! What a turned-away request gets: fail fast, a fallback model, or a
//! static answer, each in the client's API shape.
//!
//! Shapes follow the providers' documented wire formats:
//!
//! - OpenAI errors: `{"error":{"message","type","param","code"}}`; chat
//!   completions: an `object: "chat.completion"` body, or streamed
//!   `object: "chat.completion.chunk"` events as `data: {...}` lines ending
//!   with `data: [DONE]`.
//! - Anthropic errors: `{"type":"error","error":{"type","message"}}`;
//!   messages: a `type: "message"` body, or the event sequence
//!   `message_start`, `content_block_start`, `content_block_delta`,
//!   `content_block_stop`, `message_delta`, `message_stop`, each as
//!   `event: <type>` + `data: {...}`.
//!
//! The wire formats themselves are written by [`crate::llm`] (error bodies,
//! SSE framing, body rewriting), the one implementation every filter uses;
//! this module only decides what to say.

use std::time::Duration;

use serde_json::{Value, json};

use super::RejectReason;
use crate::config::{Api, DegradeAction, DegradeConfig};
use crate::llm::{ErrorKind, error_body, write_event};
use crate::time::Timestamp;

/// Response header naming what sluice did instead of the normal call.
pub const DEGRADED_HEADER: &str = "x-sluice-degraded";
/// Response header naming why (`circuit-open`, `throttled`, ...).
pub const REASON_HEADER: &str = "x-sluice-degraded-reason";
/// Request header the route table matches to pick a backend.
pub const BACKEND_HEADER: &str = "x-sluice-backend";

/// What the client asked for, as far as degrading it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientRequest<'a> {
    /// The API shape the client speaks.
    pub api: Api,
    /// Whether it asked for a stream (`"stream": true`).
    pub stream: bool,
    /// The model it asked for.
    pub model: &'a str,
}

pub use crate::llm::LocalReply;

/// Send the request on to another model and backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reroute {
    /// The model to write into the body (see [`rewrite_model`]).
    pub model: String,
    /// Headers to set on the request (the backend route header).
    pub request_headers: Vec<(&'static str, String)>,
    /// Headers to add to the response when it comes back.
    pub response_headers: Vec<(&'static str, String)>,
}

/// What to do with a turned-away request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Degradation {
    Reply(LocalReply),
    Reroute(Reroute),
}

/// The degradation `cfg` asks for, for a request turned away for `reason`.
///
/// `retry_after` overrides the configured `retry-after` when the caller
/// knows better (an open circuit knows when it will probe). A fallback to
/// the model the request already names would loop: it fails fast instead.
/// The filter checks the fallback model's own circuit before rerouting and
/// calls [`fail_fast`] when that one is open too.
pub fn degrade(
    cfg: &DegradeConfig,
    reason: RejectReason,
    retry_after: Option<Duration>,
    request: &ClientRequest<'_>,
    now: Timestamp,
) -> Degradation {
    let retry_after = retry_after.unwrap_or(cfg.retry_after);
    match &cfg.action {
        DegradeAction::FailFast => Degradation::Reply(fail_fast(reason, retry_after, request.api)),
        DegradeAction::FallbackModel { model, backend } if model != request.model => {
            Degradation::Reroute(Reroute {
                model: model.clone(),
                request_headers: vec![(BACKEND_HEADER, backend.clone())],
                response_headers: vec![
                    (DEGRADED_HEADER, "fallback-model".to_string()),
                    (REASON_HEADER, reason.as_str().to_string()),
                ],
            })
        }
        DegradeAction::FallbackModel { .. } => {
            Degradation::Reply(fail_fast(reason, retry_after, request.api))
        }
        DegradeAction::Static { text } => {
            Degradation::Reply(static_answer(text, reason, request, now))
        }
    }
}

/// A 503 with `retry-after` (whole seconds, rounded up) and an error body
/// in the client's API shape ([`error_body`], shared with every sluice
/// error answer).
pub fn fail_fast(reason: RejectReason, retry_after: Duration, api: Api) -> LocalReply {
    let message = format!(
        "sluice: the upstream is unavailable ({}); retry later",
        reason.describe()
    );
    let kind = ErrorKind::Unavailable {
        code: reason.as_str(),
    };
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    LocalReply {
        status: kind.status(),
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("retry-after", secs.max(1).to_string()),
            (DEGRADED_HEADER, "fail-fast".to_string()),
            (REASON_HEADER, reason.as_str().to_string()),
        ],
        body: error_body(api, kind, &message),
    }
}

/// A 200 carrying `text` as the assistant's answer, in the client's API
/// shape: a JSON body, or a complete SSE stream when the client asked for
/// one. Usage is reported as zero: no model ran.
pub fn static_answer(
    text: &str,
    reason: RejectReason,
    request: &ClientRequest<'_>,
    now: Timestamp,
) -> LocalReply {
    let created = now.as_nanos() / 1_000_000_000;
    let body = match (request.api, request.stream) {
        (Api::Openai, false) => openai_completion(text, request.model, created).to_string(),
        (Api::Openai, true) => openai_stream(text, request.model, created),
        (Api::Anthropic, false) => anthropic_message(text, request.model, created).to_string(),
        (Api::Anthropic, true) => anthropic_stream(text, request.model, created),
    };
    let content_type = if request.stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    LocalReply {
        status: 200,
        headers: vec![
            ("content-type", content_type.to_string()),
            (DEGRADED_HEADER, "static".to_string()),
            (REASON_HEADER, reason.as_str().to_string()),
        ],
        body,
    }
}

fn openai_completion(text: &str, model: &str, created: u64) -> Value {
    json!({
        "id": format!("chatcmpl-sluice-{created}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": "stop",
        }],
        "usage": { "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 },
    })
}

fn openai_stream(text: &str, model: &str, created: u64) -> String {
    let id = format!("chatcmpl-sluice-{created}");
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    let mut out = String::new();
    for event in [
        chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
        chunk(json!({ "content": text }), Value::Null),
        chunk(json!({}), json!("stop")),
    ] {
        write_event(&mut out, None, &event.to_string());
    }
    write_event(&mut out, None, "[DONE]");
    out
}

fn anthropic_message(text: &str, model: &str, created: u64) -> Value {
    json!({
        "id": format!("msg_sluice_{created}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": { "input_tokens": 0, "output_tokens": 0 },
    })
}

fn anthropic_stream(text: &str, model: &str, created: u64) -> String {
    let start = json!({
        "id": format!("msg_sluice_{created}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
        "usage": { "input_tokens": 0, "output_tokens": 0 },
    });
    let events = [
        json!({ "type": "message_start", "message": start }),
        json!({
            "type": "content_block_start",
            "index": 0,
            "content_block": { "type": "text", "text": "" },
        }),
        json!({
            "type": "content_block_delta",
            "index": 0,
            "delta": { "type": "text_delta", "text": text },
        }),
        json!({ "type": "content_block_stop", "index": 0 }),
        json!({
            "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null },
            "usage": { "output_tokens": 0 },
        }),
        json!({ "type": "message_stop" }),
    ];
    let mut out = String::new();
    for event in events {
        let name = event["type"].as_str().unwrap_or_default();
        write_event(&mut out, Some(name), &event.to_string());
    }
    out
}
