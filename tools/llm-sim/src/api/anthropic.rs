//! Anthropic shapes: `/v1/messages`.
//!
//! A stream is a sequence of named SSE events, `event: NAME\ndata: {json}\n\n`:
//! `message_start` (the message shell with input usage), `content_block_start`,
//! `ping`, one `content_block_delta` (`text_delta`) per token,
//! `content_block_stop`, `message_delta` (stop reason and cumulative usage),
//! `message_stop`. `max_tokens` is required, as the real API requires it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, GenRequest, ResponseMeta, invalid_json, text_chars};
use crate::timing::estimate_tokens;

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    max_tokens: Option<u32>,
    messages: Option<Vec<Message>>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::bad_request(format!("{field}: Field required")))
}

/// Parses a messages request body.
pub fn parse_messages(body: &[u8]) -> Result<GenRequest, ApiError> {
    let req: MessagesRequest = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    let model = required(req.model, "model")?;
    let max_tokens = required(req.max_tokens, "max_tokens")?;
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens: Input should be greater than or equal to 1",
        ));
    }
    let messages = required(req.messages, "messages")?;
    let chars: usize = messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(text_chars)
        .sum::<usize>()
        + req.system.as_ref().map_or(0, text_chars);
    Ok(GenRequest {
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: false,
        max_tokens: Some(max_tokens),
        prompt_tokens: estimate_tokens(chars),
        choices: 1,
    })
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// Anthropic's error type for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Anthropic's header for the instant the request limit is back to full.
pub const REQUESTS_RESET_HEADER: &str = "anthropic-ratelimit-requests-reset";

/// The instant `secs` after `now_unix` (seconds since the Unix epoch) as
/// Anthropic writes a reset: RFC 3339, UTC, to the second
/// (`2026-11-29T19:02:39Z`).
///
/// By hand rather than a date crate for this one format, and not borrowed
/// from sluice-core (which formats the same header): the simulator is the
/// independent side of the wire, so a bug in one formatter must not hide in
/// both. Total over every input: no overflow, no panic.
pub fn reset_instant(now_unix: u64, secs: u64) -> String {
    let t = now_unix.saturating_add(secs);
    let (year, month, day) = civil_from_days(t / 86_400);
    let rem = t % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01, proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The Anthropic error envelope for `err`.
pub fn error_body(err: &ApiError) -> Vec<u8> {
    let envelope = ErrorEnvelope {
        kind: "error",
        error: ErrorDetail {
            kind: error_type(err.status.as_u16()),
            message: &err.message,
        },
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// Anthropic `usage`; the cache fields are always 0 (no prompt cache simulated).
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Usage {
    /// Prompt tokens (estimated).
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Tokens written to the prompt cache.
    pub cache_creation_input_tokens: u32,
    /// Tokens read from the prompt cache.
    pub cache_read_input_tokens: u32,
}

impl Usage {
    fn new(input_tokens: u32, output_tokens: u32) -> Self {
        Self {
            input_tokens,
            output_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        }
    }
}

fn stop_reason(cut_short: bool) -> &'static str {
    if cut_short { "max_tokens" } else { "end_turn" }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

/// A complete message with `text` made of `produced` tokens.
pub fn message_response(
    meta: &ResponseMeta,
    text: &str,
    produced: u32,
    cut_short: bool,
) -> Vec<u8> {
    let body = MessageBody {
        id: &meta.id,
        kind: "message",
        role: "assistant",
        model: &meta.model,
        content: vec![TextBlock { kind: "text", text }],
        stop_reason: Some(stop_reason(cut_short)),
        stop_sequence: None,
        usage: Usage::new(meta.prompt_tokens, produced),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Appends one `event: NAME\ndata: {json}\n\n` frame.
fn event(out: &mut Vec<u8>, name: &str, json: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serializing these plain structs cannot fail; an empty object keeps the framing.
    if serde_json::to_writer(&mut *out, json).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
}

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: MessageBody<'a>,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: TextBlock<'a>,
}

#[derive(Serialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: TextDelta<'a>,
}

#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<()>,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: Usage,
}

/// Encodes the SSE stream of one message.
#[derive(Debug)]
pub struct AnthropicStream {
    meta: ResponseMeta,
}

impl AnthropicStream {
    /// A stream for the message named by `meta`.
    pub fn new(meta: ResponseMeta) -> Self {
        Self { meta }
    }

    /// Where the message's words start.
    pub fn word_offset(&self) -> u64 {
        self.meta.word_offset
    }

    /// `message_start` (input usage, no output yet), `content_block_start`, `ping`.
    pub fn preamble(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(640);
        let start = MessageStart {
            kind: "message_start",
            message: MessageBody {
                id: &self.meta.id,
                kind: "message",
                role: "assistant",
                model: &self.meta.model,
                content: Vec::new(),
                stop_reason: None,
                stop_sequence: None,
                usage: Usage::new(self.meta.prompt_tokens, 0),
            },
        };
        event(&mut out, "message_start", &start);
        let block = BlockStart {
            kind: "content_block_start",
            index: 0,
            content_block: TextBlock {
                kind: "text",
                text: "",
            },
        };
        event(&mut out, "content_block_start", &block);
        event(&mut out, "ping", &Typed { kind: "ping" });
        out
    }

    /// The `content_block_delta` of one generated token.
    pub fn token(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let delta = BlockDelta {
            kind: "content_block_delta",
            index: 0,
            delta: TextDelta {
                kind: "text_delta",
                text,
            },
        };
        event(&mut out, "content_block_delta", &delta);
        out
    }

    /// `content_block_stop`, `message_delta` with cumulative usage, `message_stop`.
    pub fn finish(&self, produced: u32, cut_short: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        let stop = BlockStop {
            kind: "content_block_stop",
            index: 0,
        };
        event(&mut out, "content_block_stop", &stop);
        let delta = MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: stop_reason(cut_short),
                stop_sequence: None,
            },
            usage: Usage::new(self.meta.prompt_tokens, produced),
        };
        event(&mut out, "message_delta", &delta);
        event(
            &mut out,
            "message_stop",
            &Typed {
                kind: "message_stop",
            },
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_counts_toward_prompt() {
        let r = parse_messages(
            br#"{"model":"m","max_tokens":4,"system":"abcd",
                "messages":[{"role":"user","content":[{"type":"text","text":"efgh"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 2);
        assert_eq!(r.max_tokens, Some(4));
    }

    #[test]
    fn max_tokens_is_required() {
        let err = parse_messages(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(err.status, 400);
        let body: Value = serde_json::from_slice(&error_body(&err)).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn reset_instants_are_rfc3339_utc() {
        assert_eq!(reset_instant(0, 0), "1970-01-01T00:00:00Z");
        // `date -u -d @1795978959` → 2026-11-29 19:02:39.
        assert_eq!(reset_instant(1_795_978_950, 9), "2026-11-29T19:02:39Z");
        // Across a leap day and a year end.
        assert_eq!(reset_instant(951_782_399, 1), "2000-02-29T00:00:00Z");
        assert_eq!(reset_instant(1_798_761_599, 1), "2027-01-01T00:00:00Z");
        // Saturates instead of overflowing.
        assert!(reset_instant(u64::MAX, 5).ends_with('Z'));
    }
}
