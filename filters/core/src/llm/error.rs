//! sluice's own error answers, in the shape the client's SDK parses.
//!
//! OpenAI: `{"error":{"message","type","param","code"}}`; a rate limit is
//! `type` `"tokens"` or `"requests"` with `code` `"rate_limit_exceeded"`
//! (what api.openai.com sends, and what the `openai` SDK turns into
//! `RateLimitError` from the status). Anthropic:
//! `{"type":"error","error":{"type","message"}}` with `rate_limit_error`
//! (429), `invalid_request_error` (400) and `request_too_large` (413).
//! An upstream sluice protects (open circuit, full bulkhead) is answered 503:
//! OpenAI `server_error` with sluice's reason as `code` (the SDKs retry 5xx
//! after `retry-after`), Anthropic `overloaded_error`.

use serde_json::json;

use crate::config::Api;

/// What went wrong, which sets the status and the error's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429: a token limit.
    RateLimitTokens,
    /// 429: a request-rate limit.
    RateLimitRequests,
    /// 429: too many concurrent streams.
    ConcurrentStreams,
    /// 400: the request is malformed; `param` names the offending field.
    InvalidRequest { param: Option<&'static str> },
    /// 413: the body is larger than sluice buffers.
    TooLarge,
    /// 503: sluice turned the request away to protect an upstream (an open
    /// circuit, a full bulkhead); `code` says why (`circuit-open`, ...).
    Unavailable { code: &'static str },
}

impl ErrorKind {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::RateLimitTokens
            | ErrorKind::RateLimitRequests
            | ErrorKind::ConcurrentStreams => 429,
            ErrorKind::InvalidRequest { .. } => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unavailable { .. } => 503,
        }
    }
}

/// The JSON error body for `kind` in `api`'s shape, with `message` as the
/// human-readable text (escaped as needed).
pub fn error_body(api: Api, kind: ErrorKind, message: &str) -> String {
    let value = match api {
        Api::Openai => {
            let (ty, code, param) = match kind {
                ErrorKind::RateLimitTokens => ("tokens", Some("rate_limit_exceeded"), None),
                ErrorKind::RateLimitRequests | ErrorKind::ConcurrentStreams => {
                    ("requests", Some("rate_limit_exceeded"), None)
                }
                ErrorKind::InvalidRequest { param } => ("invalid_request_error", None, param),
                ErrorKind::TooLarge => ("invalid_request_error", Some("request_too_large"), None),
                ErrorKind::Unavailable { code } => ("server_error", Some(code), None),
            };
            json!({"error": {"message": message, "type": ty, "param": param, "code": code}})
        }
        Api::Anthropic => {
            let ty = match kind {
                ErrorKind::RateLimitTokens
                | ErrorKind::RateLimitRequests
                | ErrorKind::ConcurrentStreams => "rate_limit_error",
                ErrorKind::InvalidRequest { .. } => "invalid_request_error",
                ErrorKind::TooLarge => "request_too_large",
                ErrorKind::Unavailable { .. } => "overloaded_error",
            };
            json!({"type": "error", "error": {"type": ty, "message": message}})
        }
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn openai_rate_limit_shape() {
        let body = parse(&error_body(
            Api::Openai,
            ErrorKind::RateLimitTokens,
            "Rate limit \"reached\"",
        ));
        assert_eq!(body["error"]["type"], "tokens");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        assert_eq!(body["error"]["message"], "Rate limit \"reached\"");
        let body = parse(&error_body(Api::Openai, ErrorKind::RateLimitRequests, "m"));
        assert_eq!(body["error"]["type"], "requests");
    }

    #[test]
    fn openai_invalid_request_names_the_param() {
        let kind = ErrorKind::InvalidRequest {
            param: Some("max_tokens"),
        };
        assert_eq!(kind.status(), 400);
        let body = parse(&error_body(Api::Openai, kind, "bad"));
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "max_tokens");
        assert_eq!(body["error"]["code"], Value::Null);
    }

    #[test]
    fn anthropic_shapes() {
        let body = parse(&error_body(
            Api::Anthropic,
            ErrorKind::ConcurrentStreams,
            "m",
        ));
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["message"], "m");
        let body = parse(&error_body(Api::Anthropic, ErrorKind::TooLarge, "m"));
        assert_eq!(body["error"]["type"], "request_too_large");
        assert_eq!(ErrorKind::TooLarge.status(), 413);
        assert_eq!(ErrorKind::RateLimitTokens.status(), 429);
    }

    #[test]
    fn unavailable_shapes() {
        let kind = ErrorKind::Unavailable {
            code: "circuit-open",
        };
        assert_eq!(kind.status(), 503);
        let body = parse(&error_body(Api::Openai, kind, "m"));
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "circuit-open");
        assert_eq!(body["error"]["param"], Value::Null);
        let body = parse(&error_body(Api::Anthropic, kind, "m"));
        assert_eq!(body["error"]["type"], "overloaded_error");
    }
}
