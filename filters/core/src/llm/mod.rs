//! What an LLM request asks for and what its response really used.
//!
//! The token limiter ([`crate::tokens`]) decides before the upstream is
//! called, so it needs an estimate of the request's cost from the request
//! alone, and afterwards the real usage to settle the difference. This module
//! is that translation, for the four API shapes sluice fronts:
//!
//! | path                   | shape                    | completion cap                        |
//! |------------------------|--------------------------|---------------------------------------|
//! | `/v1/chat/completions` | OpenAI chat completions  | `max_completion_tokens`, `max_tokens` |
//! | `/v1/completions`      | OpenAI legacy completions| `max_tokens`                          |
//! | `/v1/responses`        | OpenAI responses         | `max_output_tokens`                   |
//! | `/v1/messages`         | Anthropic messages       | `max_tokens`                          |
//!
//! - [`RequestInfo::parse`] reads a request body once and never fails: what
//!   was missing or malformed is recorded in [`RequestInfo::problem`] and in
//!   the [`Cap`], so the filter can answer 400 or fall back, each case with a
//!   documented rule (see [`Cap`] and [`BodyProblem`]).
//! - [`rewrite_body`] adds `stream_options.include_usage` to OpenAI streams
//!   (or the upstream never reports a stream's usage) and lowers a cap;
//!   [`rewrite_model`] sends a request to another model (the breaker's
//!   fallback).
//! - [`RouteFields::read`] reads only `model` and `stream`, for the breaker,
//!   which needs nothing else and runs on every request.
//! - [`UsageParser`] reads the response incrementally, JSON or SSE, chunk by
//!   chunk as the host hands them over, keeping at most one line of the
//!   stream; when a stream ends without usage it estimates from the text it
//!   saw. Usage an upstream reports out of range is clamped and flagged.
//! - [`error_body`] writes sluice's own 400/413/429 answers in the client's
//!   API shape, so SDKs raise their usual exceptions (`RateLimitError`),
//!   and [`write_event`] frames the SSE streams sluice answers itself.
//!
//! Tokens are estimated from characters (`chars_per_token`, 4 by default,
//! OpenAI's rule of thumb for English): a tokenizer per model would be more
//! exact, but it is megabytes of tables inside every Wasm VM, and the
//! estimate only has to hold a reservation until the real usage arrives.

mod api;
mod error;
mod reply;
mod request;
mod rewrite;
mod route_fields;
mod sse;
mod usage;

pub use api::ApiShape;
pub use error::{ErrorKind, error_body};
pub use reply::LocalReply;
pub use request::{
    BodyProblem, Cap, CapField, MAX_COMPLETIONS, MAX_SANE_TOKENS, RequestInfo, chars_per_token_for,
    estimate_tokens,
};
pub use rewrite::{Rewrite, RewriteError, rewrite_body, rewrite_model};
pub use route_fields::RouteFields;
pub use sse::{SseLineReader, write_event};
pub use usage::{
    DEFAULT_MAX_JSON_BODY, DEFAULT_MAX_LINE, Framing, Usage, UsageFallback, UsageParser,
    UsageReport, UsageSource,
};
