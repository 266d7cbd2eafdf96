//! Wire formats: what requests are read as and what responses look like.
//!
//! The simulator's answers must be parsed by the real `openai` and `anthropic`
//! SDKs and by sluice's filters (which count tokens from `usage`), so each
//! flavor follows its provider's documented shapes: ids with the provider's
//! prefix, `model` echoed from the request, finish/stop reasons, `usage`
//! counting exactly what was produced, SSE framing, and errors in the
//! provider's error envelope.
//!
//! Requests are parsed leniently (unknown fields ignored, as servers do) into a
//! flavor-neutral [`GenRequest`]; a body that is not JSON or lacks a required
//! field is a 400 in the flavor's error shape, never a panic.

pub mod anthropic;
pub mod openai;

use std::io;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::Value;

/// The response body of every route: a full buffer or an SSE stream.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// An inference endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions` (OpenAI).
    ChatCompletions,
    /// `POST /v1/completions` (OpenAI, legacy).
    Completions,
    /// `POST /v1/messages` (Anthropic).
    Messages,
}

/// Whose error envelope an answer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

impl Endpoint {
    /// The error envelope of this endpoint.
    pub fn flavor(self) -> Flavor {
        match self {
            Self::ChatCompletions | Self::Completions => Flavor::OpenAi,
            Self::Messages => Flavor::Anthropic,
        }
    }
}

/// A generation request, whatever the flavor.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The model asked for; echoed in the response.
    pub model: String,
    /// Whether the answer is an SSE stream.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`: a last chunk carries `usage`.
    pub include_usage: bool,
    /// Upper bound on generated tokens, if the request sets one.
    pub max_tokens: Option<u32>,
    /// Estimated prompt tokens (see [`crate::timing::estimate_tokens`]),
    /// over every prompt of a batch.
    pub prompt_tokens: u32,
    /// Completions to generate, each `max_tokens` long at most: OpenAI's
    /// `n`, times the prompts of a batched legacy completion; 1 otherwise.
    pub choices: u32,
}

/// What every generated response needs to name itself.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// Response id, with the provider's prefix.
    pub id: String,
    /// Unix time of creation, in seconds.
    pub created: u64,
    /// The model, as requested.
    pub model: String,
    /// Prompt tokens counted for `usage`.
    pub prompt_tokens: u32,
    /// Where the generated words start (varies the text between responses);
    /// choice `c` starts at `word_offset + c`.
    pub word_offset: u64,
    /// Completions in the answer (see [`GenRequest::choices`]).
    pub choices: u32,
}

/// An answer other than a generation, in the endpoint's error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI `code` (e.g. `model_not_found`).
    pub code: Option<&'static str>,
    /// `retry-after` header value, in seconds.
    pub retry_after_s: Option<u64>,
    /// When set, the provider's request rate-limit reset header says the
    /// limit resets this many seconds from now (OpenAI
    /// `x-ratelimit-reset-requests`, Anthropic `anthropic-ratelimit-requests-reset`).
    pub requests_reset_s: Option<u64>,
    /// The answer carries no rate-limit header at all, not even a quota's
    /// (the `bare_errors` fault).
    pub bare: bool,
}

impl ApiError {
    /// An error with no rate-limit hint.
    fn plain(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self {
            status,
            message: message.into(),
            code,
            retry_after_s: None,
            requests_reset_s: None,
            bare: false,
        }
    }

    /// A 400 for a request that cannot be served as sent.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::plain(StatusCode::BAD_REQUEST, message, None)
    }

    /// A 404 for a model this instance does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self::plain(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
            Some("model_not_found"),
        )
    }

    /// A 404 for a path that is not an endpoint.
    pub fn unknown_route(path: &str) -> Self {
        Self::plain(
            StatusCode::NOT_FOUND,
            format!("Unknown request URL: {path}"),
            Some("unknown_url"),
        )
    }

    /// A 405 for a known path with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::plain(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None)
    }

    /// A 413 for a body over `--max-body-bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body exceeds {limit} bytes"),
            None,
        )
    }

    /// A 411 for a body sent without `content-length` (`--require-content-length`).
    pub fn length_required() -> Self {
        Self::plain(
            StatusCode::LENGTH_REQUIRED,
            "A content-length header is required (chunked request bodies are refused).",
            Some("length_required"),
        )
    }

    /// A 429 from the capacity limit, as an overloaded server sends it.
    pub fn overloaded(retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::plain(
                StatusCode::TOO_MANY_REQUESTS,
                "The server is overloaded: all request slots are busy. Retry later.",
                Some("rate_limit_exceeded"),
            )
        }
    }

    /// A 429 from the quota (`limit` is `requests` or `tokens`), with
    /// `retry-after` until the window ends; the quota's own headers are
    /// added with every answer.
    pub fn quota_exceeded(limit: &str, retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::plain(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Rate limit reached for {limit} (simulated quota). Please try again in {retry_after_s}s."
                ),
                Some("rate_limit_exceeded"),
            )
        }
    }

    /// An error status injected by a fault. With a `hint_s` (the
    /// `retry_after_s` fault) it carries `retry-after: hint_s` and the
    /// provider's reset header, whatever the status; without, 429, 503 and
    /// 529 carry `retry-after: retry_after_s` (`--retry-after-s`). A `bare`
    /// answer (the `bare_errors` fault) carries neither.
    pub fn fault(status: u16, retry_after_s: u64, hint_s: Option<u32>, bare: bool) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let plain = Self::plain(
            status,
            format!("Simulated fault: status {}", status.as_u16()),
            None,
        );
        if bare {
            return Self { bare, ..plain };
        }
        let hint_s = hint_s.map(u64::from);
        let retry = matches!(status.as_u16(), 429 | 503 | 529);
        Self {
            retry_after_s: hint_s.or(retry.then_some(retry_after_s)),
            requests_reset_s: hint_s,
            ..plain
        }
    }

    /// The error as a response in `flavor`'s envelope.
    pub fn into_response(self, flavor: Flavor) -> Response<Body> {
        let body = match flavor {
            Flavor::OpenAi => openai::error_body(&self),
            Flavor::Anthropic => anthropic::error_body(&self),
        };
        let mut resp = json_response(self.status, body);
        let headers = resp.headers_mut();
        if let Some(secs) = self.retry_after_s {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(secs) = self.requests_reset_s {
            let (name, value) = match flavor {
                Flavor::OpenAi => (openai::REQUESTS_RESET_HEADER, openai::reset_duration(secs)),
                Flavor::Anthropic => (
                    anthropic::REQUESTS_RESET_HEADER,
                    anthropic::reset_instant(unix_now(), secs),
                ),
            };
            // Both formats are ASCII digits and letters: never invalid.
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
        resp
    }
}

/// The error for a body that does not deserialize.
pub(crate) fn invalid_json(err: &serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("Invalid request body: {err}"))
}

/// A complete JSON response.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A body from a buffer.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Characters of prompt text in a message `content`-like value: a string, an
/// array of strings or of parts with `text` (OpenAI parts, Anthropic blocks),
/// recursing into nested `content` (Anthropic `tool_result`). Other values
/// (images, numbers) count for nothing.
pub fn text_chars(value: &Value) -> usize {
    match value {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => {
            map.get("text").map_or(0, text_chars) + map.get("content").map_or(0, text_chars)
        }
        _ => 0,
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_text_in_every_content_shape() {
        let v: Value = serde_json::json!([
            "abcd",
            {"type": "text", "text": "ef"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"type": "tool_result", "content": [{"type": "text", "text": "ghi"}]}
        ]);
        assert_eq!(text_chars(&v), 9);
        assert_eq!(text_chars(&Value::Null), 0);
    }

    fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
        resp.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn fault_without_hint_keeps_the_configured_retry_after_on_busy_statuses() {
        for (status, retry) in [
            (429, Some("2")),
            (503, Some("2")),
            (529, Some("2")),
            (500, None),
        ] {
            let resp = ApiError::fault(status, 2, None, false).into_response(Flavor::OpenAi);
            assert_eq!(header(&resp, "retry-after"), retry, "{status}");
            assert_eq!(header(&resp, openai::REQUESTS_RESET_HEADER), None);
            assert_eq!(header(&resp, anthropic::REQUESTS_RESET_HEADER), None);
        }
    }

    #[test]
    fn fault_hint_sets_retry_after_and_the_openai_reset() {
        for status in [429, 500, 502, 503] {
            let resp = ApiError::fault(status, 2, Some(90), false).into_response(Flavor::OpenAi);
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(header(&resp, "retry-after"), Some("90"));
            assert_eq!(header(&resp, "x-ratelimit-reset-requests"), Some("1m30s"));
            assert_eq!(header(&resp, anthropic::REQUESTS_RESET_HEADER), None);
        }
    }

    #[test]
    fn fault_hint_sets_retry_after_and_the_anthropic_reset() {
        let before = unix_now();
        let resp = ApiError::fault(529, 2, Some(30), false).into_response(Flavor::Anthropic);
        let after = unix_now();
        assert_eq!(header(&resp, "retry-after"), Some("30"));
        assert_eq!(header(&resp, openai::REQUESTS_RESET_HEADER), None);
        let reset = header(&resp, "anthropic-ratelimit-requests-reset").unwrap();
        let candidates: Vec<String> = (before..=after)
            .map(|now| anthropic::reset_instant(now, 30))
            .collect();
        assert!(
            candidates.iter().any(|c| c == reset),
            "{reset} not in {candidates:?}"
        );
    }

    #[test]
    fn a_bare_fault_carries_no_hint_whatever_its_status() {
        for status in [429, 503, 529] {
            let err = ApiError::fault(status, 2, Some(30), true);
            assert!(err.bare);
            for flavor in [Flavor::OpenAi, Flavor::Anthropic] {
                let resp = err.clone().into_response(flavor);
                assert_eq!(resp.status().as_u16(), status);
                assert_eq!(header(&resp, "retry-after"), None);
                assert_eq!(header(&resp, openai::REQUESTS_RESET_HEADER), None);
                assert_eq!(header(&resp, anthropic::REQUESTS_RESET_HEADER), None);
            }
        }
    }

    #[test]
    fn a_quota_refusal_is_a_rate_limit_error_with_retry_after() {
        let resp = ApiError::quota_exceeded("requests", 4).into_response(Flavor::OpenAi);
        assert_eq!(resp.status().as_u16(), 429);
        assert_eq!(header(&resp, "retry-after"), Some("4"));
        let resp = ApiError::quota_exceeded("tokens", 1).into_response(Flavor::Anthropic);
        assert_eq!(header(&resp, "retry-after"), Some("1"));
    }

    #[test]
    fn other_errors_carry_no_reset() {
        let resp = ApiError::overloaded(3).into_response(Flavor::Anthropic);
        assert_eq!(header(&resp, "retry-after"), Some("3"));
        assert_eq!(header(&resp, anthropic::REQUESTS_RESET_HEADER), None);
    }
}
