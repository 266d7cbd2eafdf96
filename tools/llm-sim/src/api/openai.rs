//! OpenAI shapes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! Streams are SSE `data: {json}\n\n` chunks: a first chunk with the
//! assistant role, one chunk per token (`choices[0].delta.content` for chat,
//! `choices[0].text` for completions), a chunk with `finish_reason`, then
//! `data: [DONE]`. With `stream_options.include_usage` every chunk carries
//! `"usage": null` and one more chunk before `[DONE]` has empty `choices` and
//! the totals, as OpenAI documents.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, GenRequest, ResponseMeta, invalid_json, text_chars};
use crate::timing::{estimate_tokens, generated_text, token_text};

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
}

/// Largest `n` OpenAI accepts.
pub const MAX_N: u32 = 128;

/// Most completions one request may ask for (prompts of a batch × `n`).
pub const MAX_CHOICES: u32 = 4096;

fn choices_per_prompt(n: Option<u32>) -> Result<u32, ApiError> {
    match n {
        None => Ok(1),
        Some(n @ 1..=MAX_N) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "Invalid 'n': {n}. Expected a value between 1 and {MAX_N}."
        ))),
    }
}

/// Prompts in a legacy completion's `prompt`: a string or one array of
/// token ids is one prompt; an array of strings or of token-id arrays is a
/// batch, one prompt per item.
fn prompt_count(prompt: &Value) -> Result<u32, ApiError> {
    match prompt {
        Value::Array(items) if items.is_empty() => Err(ApiError::bad_request(
            "Invalid 'prompt': empty array. Expected at least one prompt.",
        )),
        Value::Array(items) if items.iter().all(Value::is_number) => Ok(1),
        Value::Array(items) => u32::try_from(items.len())
            .map_err(|_| ApiError::bad_request("Invalid 'prompt': too many prompts.")),
        _ => Ok(1),
    }
}

fn total_choices(prompts: u32, n: u32) -> Result<u32, ApiError> {
    prompts
        .checked_mul(n)
        .filter(|c| *c <= MAX_CHOICES)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Too many completions requested: {prompts} prompt(s) × n = {n}; at most {MAX_CHOICES}."
            ))
        })
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::bad_request(format!("Missing required parameter: '{field}'.")))
}

fn limit(max_tokens: Option<u32>, field: &str) -> Result<Option<u32>, ApiError> {
    match max_tokens {
        Some(0) => Err(ApiError::bad_request(format!(
            "Invalid '{field}': integer below minimum value. Expected a value >= 1, but got 0 instead."
        ))),
        other => Ok(other),
    }
}

/// Parses a chat completion request body.
pub fn parse_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    let model = required(req.model, "model")?;
    let messages = required(req.messages, "messages")?;
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    let chars = messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(text_chars)
        .sum();
    let max_tokens = match req.max_completion_tokens {
        Some(n) => limit(Some(n), "max_completion_tokens")?,
        None => limit(req.max_tokens, "max_tokens")?,
    };
    Ok(GenRequest {
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens,
        prompt_tokens: estimate_tokens(chars),
        choices: choices_per_prompt(req.n)?,
    })
}

/// Prompt tokens of a legacy completion `prompt`: strings are estimated from
/// their characters, token-id arrays count one token per id.
fn prompt_tokens(prompt: &Value) -> u32 {
    fn walk(v: &Value, chars: &mut usize, ids: &mut u32) {
        match v {
            Value::String(s) => *chars += s.chars().count(),
            Value::Number(_) => *ids = ids.saturating_add(1),
            Value::Array(items) => items.iter().for_each(|i| walk(i, chars, ids)),
            _ => {}
        }
    }
    let (mut chars, mut ids) = (0, 0);
    walk(prompt, &mut chars, &mut ids);
    estimate_tokens(chars).saturating_add(ids)
}

/// Parses a legacy completion request body.
pub fn parse_completions(body: &[u8]) -> Result<GenRequest, ApiError> {
    let req: CompletionRequest = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    let model = required(req.model, "model")?;
    let prompt = required(req.prompt, "prompt")?;
    let choices = total_choices(prompt_count(&prompt)?, choices_per_prompt(req.n)?)?;
    Ok(GenRequest {
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        // The legacy endpoint defaults to 16 tokens when max_tokens is absent.
        max_tokens: Some(limit(req.max_tokens, "max_tokens")?.unwrap_or(16)),
        prompt_tokens: prompt_tokens(&prompt),
        choices,
    })
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// OpenAI's header for the time until the request limit is back to full.
pub const REQUESTS_RESET_HEADER: &str = "x-ratelimit-reset-requests";

/// Whole seconds as OpenAI writes a reset time, a Go-style duration:
/// `0s`, `7s`, `1m30s`, `2h0m0s`.
pub fn reset_duration(secs: u64) -> String {
    go_duration(Duration::from_secs(secs))
}

/// A duration as Go's `time.Duration` prints it, which is how OpenAI writes
/// its resets, to the millisecond and rounded up (a client that waits this
/// long is never early): `0s`, `20ms`, `1s`, `1.5s`, `58.25s`, `6m0s`,
/// `1h2m3.5s`.
///
/// Written here rather than borrowed from sluice-core, which formats the
/// same header: the simulator is the independent side of the wire.
pub fn go_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let frac = match ms % 1000 {
        0 => String::new(),
        f => format!(".{f:03}").trim_end_matches('0').to_owned(),
    };
    if h > 0 {
        format!("{h}h{m}m{s}{frac}s")
    } else if m > 0 {
        format!("{m}m{s}{frac}s")
    } else {
        format!("{s}{frac}s")
    }
}

/// The OpenAI error envelope for `err`.
pub fn error_body(err: &ApiError) -> Vec<u8> {
    let kind = match err.status.as_u16() {
        400 | 404 | 405 | 411 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    let envelope = ErrorEnvelope {
        error: ErrorDetail {
            message: &err.message,
            kind,
            param: None,
            code: err.code,
        },
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// OpenAI `usage`.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Usage {
    /// Prompt tokens (estimated).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

fn finish_reason(cut_short: bool) -> &'static str {
    if cut_short { "length" } else { "stop" }
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatCompletion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    usage: Usage,
    system_fingerprint: Option<&'a str>,
}

/// The text of choice `c`: `produced` words from the choice's own offset.
fn choice_text(meta: &ResponseMeta, c: u32, produced: u32) -> String {
    generated_text(meta.word_offset.wrapping_add(u64::from(c)), produced)
}

/// Usage of `produced` tokens in each of the answer's choices.
fn usage_of(meta: &ResponseMeta, produced: u32) -> Usage {
    Usage::new(meta.prompt_tokens, produced.saturating_mul(meta.choices))
}

/// A complete `chat.completion`: `meta.choices` choices of `produced` tokens each.
pub fn chat_response(meta: &ResponseMeta, produced: u32, cut_short: bool) -> Vec<u8> {
    let texts: Vec<String> = (0..meta.choices)
        .map(|c| choice_text(meta, c, produced))
        .collect();
    let body = ChatCompletion {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: texts
            .iter()
            .zip(0..)
            .map(|(text, index)| ChatChoice {
                index,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: finish_reason(cut_short),
            })
            .collect(),
        usage: usage_of(meta, produced),
        system_fingerprint: None,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// A complete `text_completion`: `meta.choices` choices (prompts of a batch
/// × `n`, in that order) of `produced` tokens each.
pub fn completion_response(meta: &ResponseMeta, produced: u32, cut_short: bool) -> Vec<u8> {
    let texts: Vec<String> = (0..meta.choices)
        .map(|c| choice_text(meta, c, produced))
        .collect();
    let body = ChatCompletion {
        id: &meta.id,
        object: "text_completion",
        created: meta.created,
        model: &meta.model,
        choices: texts
            .iter()
            .zip(0..)
            .map(|(text, index)| TextChoice {
                text,
                index,
                logprobs: None,
                finish_reason: Some(finish_reason(cut_short)),
            })
            .collect(),
        usage: usage_of(meta, produced),
        system_fingerprint: None,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// One streamed chunk; `C` is the choice type of the endpoint.
#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'a str>,
    choices: Vec<C>,
    /// Absent without include_usage; `null` on ordinary chunks with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

/// Encodes the SSE stream of one chat or legacy completion.
#[derive(Debug)]
pub struct OpenAiStream {
    meta: ResponseMeta,
    chat: bool,
    include_usage: bool,
}

fn sse_data(json: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // Serializing these plain structs cannot fail; an empty object keeps the framing.
    if serde_json::to_writer(&mut out, json).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    out
}

impl OpenAiStream {
    /// A stream for a chat completion (`chat`) or a legacy completion.
    pub fn new(meta: ResponseMeta, chat: bool, include_usage: bool) -> Self {
        Self {
            meta,
            chat,
            include_usage,
        }
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> Vec<u8> {
        sse_data(&Chunk {
            id: &self.meta.id,
            object: if self.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            },
            created: self.meta.created,
            model: &self.meta.model,
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn choice(
        &self,
        index: u32,
        delta: Delta<'_>,
        text: &str,
        finish: Option<&'static str>,
    ) -> Vec<u8> {
        if self.chat {
            self.chunk(
                vec![ChunkChoice {
                    index,
                    delta,
                    logprobs: None,
                    finish_reason: finish,
                }],
                None,
            )
        } else {
            self.chunk(
                vec![TextChoice {
                    text,
                    index,
                    logprobs: None,
                    finish_reason: finish,
                }],
                None,
            )
        }
    }

    /// What comes before the first token: the chat role chunk of each
    /// choice (nothing for completions).
    pub fn preamble(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.chat {
            for c in 0..self.meta.choices {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                };
                out.extend(self.choice(c, delta, "", None));
            }
        }
        out
    }

    /// The chunks of token `i`: one per choice, as OpenAI interleaves them.
    pub fn token(&self, i: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for c in 0..self.meta.choices {
            let text = token_text(self.meta.word_offset.wrapping_add(u64::from(c)), i);
            let delta = Delta {
                role: None,
                content: Some(text),
            };
            out.extend(self.choice(c, delta, text, None));
        }
        out
    }

    /// The closing chunks after `produced` tokens per choice: each choice's
    /// finish reason, the usage (every choice's tokens), `[DONE]`.
    pub fn finish(&self, produced: u32, cut_short: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for c in 0..self.meta.choices {
            out.extend(self.choice(c, Delta::default(), "", Some(finish_reason(cut_short))));
        }
        if self.include_usage {
            let usage = usage_of(&self.meta, produced);
            out.extend(self.chunk(Vec::<ChunkChoice<'_>>::new(), Some(usage)));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    // Anthropic's model list fields, so both SDKs can list models.
    #[serde(rename = "type")]
    kind: &'static str,
    display_name: &'a str,
    created_at: &'static str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
    has_more: bool,
    first_id: Option<&'a str>,
    last_id: Option<&'a str>,
}

/// The `GET /v1/models` body, readable as OpenAI's list and Anthropic's page.
pub fn models_body(models: &[String], created: u64) -> Vec<u8> {
    let list = ModelList {
        object: "list",
        data: models
            .iter()
            .map(|m| ModelEntry {
                id: m,
                object: "model",
                created,
                owned_by: "llm-sim",
                kind: "model",
                display_name: m,
                created_at: "2026-01-01T00:00:00Z",
            })
            .collect(),
        has_more: false,
        first_id: models.first().map(String::as_str),
        last_id: models.last().map(String::as_str),
    };
    serde_json::to_vec(&list).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_are_go_style() {
        assert_eq!(reset_duration(0), "0s");
        assert_eq!(reset_duration(7), "7s");
        assert_eq!(reset_duration(59), "59s");
        assert_eq!(reset_duration(60), "1m0s");
        assert_eq!(reset_duration(90), "1m30s");
        assert_eq!(reset_duration(7200), "2h0m0s");
        assert_eq!(reset_duration(86_400), "24h0m0s");
    }

    #[test]
    fn go_durations_to_the_millisecond_round_up() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(go_duration(ms(20)), "20ms");
        assert_eq!(go_duration(ms(999)), "999ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(58_250)), "58.25s");
        assert_eq!(go_duration(ms(60_001)), "1m0.001s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(3_723_500)), "1h2m3.5s");
        assert!(go_duration(Duration::MAX).ends_with('s'));
    }

    #[test]
    fn chat_request_fields() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":5}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.prompt_tokens, 2);
    }

    #[test]
    fn malformed_and_missing_are_400() {
        assert_eq!(parse_chat(b"{nope").unwrap_err().status, 400);
        assert_eq!(parse_chat(b"[]").unwrap_err().status, 400);
        assert_eq!(parse_chat(br#"{"model":"m"}"#).unwrap_err().status, 400);
        assert_eq!(
            parse_chat(br#"{"model":"m","messages":[{"content":"x"}],"max_tokens":-1}"#)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse_completions(br#"{"model":"m"}"#).unwrap_err().status,
            400
        );
    }

    #[test]
    fn completion_prompt_token_ids_count_one_each() {
        assert_eq!(prompt_tokens(&serde_json::json!([[1, 2, 3], "abcde"])), 5);
    }

    #[test]
    fn include_usage_chunks() {
        let meta = ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            prompt_tokens: 3,
            word_offset: 0,
            choices: 1,
        };
        let s = OpenAiStream::new(meta, true, true);
        let token = String::from_utf8(s.token(0)).unwrap();
        assert!(token.contains(r#""usage":null"#), "{token}");
        let end = String::from_utf8(s.finish(1, false)).unwrap();
        assert!(
            end.contains(r#""choices":[],"usage":{"prompt_tokens":3"#),
            "{end}"
        );
        assert!(end.ends_with("data: [DONE]\n\n"));
    }
}
