//! Reading an LLM request body: model, streaming, completion cap, prompt size.

use serde_json::{Map, Value};

use super::ApiShape;
use crate::config::TokensConfig;

/// Largest token count sluice takes at face value, in a request's cap or in
/// an upstream's reported usage (10M tokens: far above any model's context).
/// A cap above it is invalid (400); a reported usage above it is clamped to
/// it and flagged.
pub const MAX_SANE_TOKENS: u64 = 10_000_000;

/// Used when a configured ratio is not a positive finite number (the policy
/// validates 0.5–20, so only a hand-built config can get here).
const FALLBACK_CHARS_PER_TOKEN: f64 = 4.0;

/// The body field that carries the completion cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapField {
    /// OpenAI chat's current name.
    MaxCompletionTokens,
    /// OpenAI chat (deprecated there), legacy completions, Anthropic.
    MaxTokens,
    /// OpenAI responses.
    MaxOutputTokens,
}

impl CapField {
    /// The field's JSON name.
    pub fn name(self) -> &'static str {
        match self {
            CapField::MaxCompletionTokens => "max_completion_tokens",
            CapField::MaxTokens => "max_tokens",
            CapField::MaxOutputTokens => "max_output_tokens",
        }
    }
}

/// The completion cap a request asks for, and what sluice does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// No cap field (or `null`): the policy's `default_max_tokens` is
    /// reserved. (Anthropic requires `max_tokens`; its upstream answers 400,
    /// and the reservation is refunded.)
    Absent,
    /// A usable cap, in tokens (1 to [`MAX_SANE_TOKENS`]). Above the quota's
    /// `max_completion_tokens` it is rejected (400) or clamped per `over_cap`.
    Given { field: CapField, tokens: u64 },
    /// The field is there but unusable: not a number, zero, negative,
    /// fractional, or above [`MAX_SANE_TOKENS`]. Answered 400 naming the
    /// field (the upstream would reject it as well, after doing the work of
    /// receiving it; a limiter cannot reserve an unknown amount).
    Invalid { field: CapField },
}

/// Why a body cannot be read as the request it claims to be. Each is
/// answered 400 (`invalid_request_error`) in the client's shape: the
/// upstream would refuse the request too, and the limiter cannot account
/// for what it cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyProblem {
    /// Empty, or not JSON.
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// A field sluice interprets has the wrong type: `model` not a string,
    /// `stream` not a boolean, `stream_options` not an object or its
    /// `include_usage` not a boolean.
    WrongType { field: &'static str },
    /// A count of completions (`n`, `best_of`, prompts in a batch) that is
    /// not a whole number from 1 to [`MAX_COMPLETIONS`].
    BadCount { field: &'static str },
}

/// Most completions one request may ask for (`n`, `best_of`, and prompts
/// in a batch), OpenAI's own bound for `n`.
pub const MAX_COMPLETIONS: u64 = 128;

impl BodyProblem {
    /// The offending field, for the error's `param`.
    pub fn param(self) -> Option<&'static str> {
        match self {
            BodyProblem::WrongType { field } | BodyProblem::BadCount { field } => Some(field),
            BodyProblem::NotJson | BodyProblem::NotObject => None,
        }
    }

    /// A message for the 400 answer.
    pub fn message(self) -> String {
        match self {
            BodyProblem::NotJson => "The request body is not valid JSON.".to_string(),
            BodyProblem::NotObject => "The request body must be a JSON object.".to_string(),
            BodyProblem::WrongType { field } => format!("Invalid type for '{field}'."),
            BodyProblem::BadCount { field } => {
                format!("Invalid '{field}': expected an integer between 1 and {MAX_COMPLETIONS}.")
            }
        }
    }
}

/// What sluice needs to know about a request before forwarding it.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestInfo {
    pub api: ApiShape,
    /// The body's `model`; `None` when absent, `null` or empty (the filter
    /// then takes the model header, the policy's default, or `unknown`).
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    pub cap: Cap,
    /// Characters of prompt text: message contents (strings or the `text` of
    /// content parts), `system`, `instructions`, `prompt`, `input`, tool
    /// call arguments. Images and other non-text parts count nothing.
    pub prompt_chars: u64,
    /// Prompt tokens given as token ids (legacy completions' `prompt` as an
    /// array of integers): counted one each, exactly.
    pub prompt_token_ids: u64,
    /// Estimated prompt tokens, with the model's characters-per-token ratio.
    pub prompt_tokens: u64,
    /// Completions the upstream will generate, each up to the cap: `n` (or
    /// legacy completions' `best_of`, when larger) times the prompts of a
    /// batched legacy completions request. 1 for the other shapes.
    pub completions: u64,
    /// Set when the body cannot be read as a request; see [`BodyProblem`].
    pub problem: Option<BodyProblem>,
}

impl RequestInfo {
    /// Reads a request to `path` with body `body`; never fails (what is
    /// wrong is recorded in `problem` and `cap`). The body is parsed once,
    /// with serde_json's recursion limit guarding deep nesting.
    pub fn parse(path: &str, body: &[u8], cfg: &TokensConfig) -> Self {
        let mut info = Self::read(path, body);
        // Nothing read (not JSON, not an object) estimates to 0.
        info.prompt_tokens = info.prompt_tokens_for(cfg, info.model.as_deref().unwrap_or(""));
        info
    }

    /// Like [`RequestInfo::parse`] without the token estimate
    /// (`prompt_tokens` stays 0): for filters that need the model, the
    /// stream flag and the cap but no tokenizer settings (the breaker).
    pub fn read(path: &str, body: &[u8]) -> Self {
        let api = ApiShape::from_path(path);
        let mut info = RequestInfo::empty(api);
        let doc: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => {
                info.problem = Some(BodyProblem::NotJson);
                return info;
            }
        };
        let Value::Object(obj) = &doc else {
            info.problem = Some(BodyProblem::NotObject);
            return info;
        };
        info.read_object(obj);
        info
    }

    /// A request whose body was not buffered (larger than `max_body` with
    /// `on_large_body = "estimate"`): the prompt is estimated from the body's
    /// length, as if every byte were a character of text (an overestimate
    /// for JSON, which is the safe side for a reservation).
    pub fn from_length(path: &str, content_length: u64, cfg: &TokensConfig) -> Self {
        let mut info = RequestInfo::empty(ApiShape::from_path(path));
        info.prompt_chars = content_length;
        info.prompt_tokens = estimate_tokens(content_length, chars_per_token_for(cfg, ""));
        info
    }

    /// Estimated prompt tokens if the model is `model` (for a model named by
    /// a header rather than the body).
    pub fn prompt_tokens_for(&self, cfg: &TokensConfig, model: &str) -> u64 {
        estimate_tokens(self.prompt_chars, chars_per_token_for(cfg, model))
            .saturating_add(self.prompt_token_ids)
    }

    /// Whether the body should get `stream_options.include_usage = true` so
    /// that the stream reports its usage (OpenAI chat and completions).
    pub fn lacks_stream_usage(&self) -> bool {
        self.api.has_include_usage() && self.stream && !self.include_usage
    }

    fn empty(api: ApiShape) -> Self {
        RequestInfo {
            api,
            model: None,
            stream: false,
            include_usage: false,
            cap: Cap::Absent,
            prompt_chars: 0,
            prompt_token_ids: 0,
            prompt_tokens: 0,
            completions: 1,
            problem: None,
        }
    }

    fn read_object(&mut self, obj: &Map<String, Value>) {
        let mut problem = None;
        match obj.get("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.model = (!s.is_empty()).then(|| s.clone()),
            Some(_) => problem = Some(BodyProblem::WrongType { field: "model" }),
        }
        match obj.get("stream") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => self.stream = *b,
            Some(_) => problem = Some(BodyProblem::WrongType { field: "stream" }),
        }
        match obj.get("stream_options") {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => self.include_usage = *b,
                Some(_) => {
                    problem = Some(BodyProblem::WrongType {
                        field: "stream_options.include_usage",
                    })
                }
            },
            Some(_) => {
                problem = Some(BodyProblem::WrongType {
                    field: "stream_options",
                })
            }
        }
        match completions(self.api, obj) {
            Ok(n) => self.completions = n,
            Err(field) => problem = problem.or(Some(BodyProblem::BadCount { field })),
        }
        self.problem = problem;
        self.cap = read_cap(self.api, obj);
        let mut count = TextCount::default();
        for key in [
            "messages",
            "system",
            "prompt",
            "suffix",
            "input",
            "instructions",
        ] {
            if let Some(v) = obj.get(key) {
                count.add(v);
            }
        }
        self.prompt_chars = count.chars;
        self.prompt_token_ids = count.token_ids;
    }
}

/// How many completions a request asks for, or the field that is invalid.
///
/// OpenAI chat and legacy completions take `n` (choices per prompt); legacy
/// completions also `best_of` (generated server-side, billed, only the best
/// `n` returned) and a batch of prompts (`prompt` as an array of strings, or
/// of token arrays). Each completion may run to the cap.
fn completions(api: ApiShape, obj: &Map<String, Value>) -> Result<u64, &'static str> {
    let count = |field: &'static str| -> Result<u64, &'static str> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(1),
            Some(v) => match token_count(v) {
                Some(n) if (1..=MAX_COMPLETIONS).contains(&n) => Ok(n),
                _ => Err(field),
            },
        }
    };
    match api {
        ApiShape::ChatCompletions => count("n"),
        ApiShape::Completions => {
            let per_prompt = count("n")?.max(count("best_of")?);
            let prompts = match obj.get("prompt") {
                // A batch: strings, or token arrays. A flat array of
                // integers is one prompt given as token ids.
                Some(Value::Array(items))
                    if !items.is_empty() && !items.iter().all(Value::is_number) =>
                {
                    u64::try_from(items.len()).unwrap_or(u64::MAX)
                }
                _ => 1,
            };
            let total = per_prompt.saturating_mul(prompts);
            if total > MAX_COMPLETIONS {
                return Err("prompt");
            }
            Ok(total)
        }
        ApiShape::Responses | ApiShape::Messages | ApiShape::Other => Ok(1),
    }
}

/// The cap fields of `api`, in order of precedence.
fn cap_fields(api: ApiShape) -> &'static [CapField] {
    match api {
        ApiShape::ChatCompletions => &[CapField::MaxCompletionTokens, CapField::MaxTokens],
        ApiShape::Completions | ApiShape::Messages => &[CapField::MaxTokens],
        ApiShape::Responses => &[CapField::MaxOutputTokens],
        ApiShape::Other => &[],
    }
}

fn read_cap(api: ApiShape, obj: &Map<String, Value>) -> Cap {
    for &field in cap_fields(api) {
        match obj.get(field.name()) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match token_count(v) {
                    Some(tokens) if (1..=MAX_SANE_TOKENS).contains(&tokens) => {
                        Cap::Given { field, tokens }
                    }
                    _ => Cap::Invalid { field },
                };
            }
        }
    }
    Cap::Absent
}

/// A JSON number that is a whole non-negative count (`100` or `100.0`).
fn token_count(v: &Value) -> Option<u64> {
    let n = v.as_number()?;
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    let f = n.as_f64()?;
    // Integral and within u64: `as` is exact below 2^53, and values above
    // MAX_SANE_TOKENS are rejected by the caller anyway.
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 1e18).then_some(f as u64)
}

/// Characters of text and token ids found in a prompt value.
#[derive(Default)]
struct TextCount {
    chars: u64,
    token_ids: u64,
}

/// Object keys whose values hold prompt text, in any of the four shapes:
/// content parts and blocks (`text`, nested `content` of tool results),
/// tool calls (`tool_calls` → `function` → `arguments`), reasoning.
const TEXT_KEYS: [&str; 8] = [
    "text",
    "content",
    "tool_calls",
    "function",
    "arguments",
    "thinking",
    "refusal",
    "output",
];

impl TextCount {
    /// Adds `v`: a string counts its characters, an array its items, an
    /// object the values under [`TEXT_KEYS`], an integer one token id.
    /// Depth is bounded by serde_json's recursion limit on the parse.
    fn add(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.chars = self.chars.saturating_add(char_count(s)),
            Value::Array(items) => items.iter().for_each(|i| self.add(i)),
            Value::Object(o) => {
                for key in TEXT_KEYS {
                    if let Some(inner) = o.get(key) {
                        self.add(inner);
                    }
                }
            }
            Value::Number(n) if n.is_u64() => self.token_ids = self.token_ids.saturating_add(1),
            Value::Number(_) | Value::Bool(_) | Value::Null => {}
        }
    }
}

fn char_count(s: &str) -> u64 {
    u64::try_from(s.chars().count()).unwrap_or(u64::MAX)
}

/// The characters-per-token ratio for `model`: the first matching
/// `model_chars_per_token` pattern, else `chars_per_token`.
pub fn chars_per_token_for(cfg: &TokensConfig, model: &str) -> f64 {
    let ratio = cfg
        .model_chars_per_token
        .iter()
        .find(|(p, _)| p.matches(model))
        .map(|(_, r)| *r)
        .unwrap_or(cfg.chars_per_token);
    if ratio.is_finite() && ratio > 0.0 {
        ratio
    } else {
        FALLBACK_CHARS_PER_TOKEN
    }
}

/// Tokens for `chars` characters at `chars_per_token`, rounded up (a
/// non-positive or non-finite ratio counts as 4).
pub fn estimate_tokens(chars: u64, chars_per_token: f64) -> u64 {
    let ratio = if chars_per_token.is_finite() && chars_per_token > 0.0 {
        chars_per_token
    } else {
        FALLBACK_CHARS_PER_TOKEN
    };
    // Float-to-int `as` saturates (and maps NaN to 0): no overflow.
    (chars as f64 / ratio).ceil() as u64
}
