//! The tokens a response really used, read from its body as it passes.
//!
//! Where each API reports usage:
//!
//! - OpenAI chat/completions JSON: `usage.prompt_tokens`,
//!   `usage.completion_tokens`, `usage.total_tokens`. Streams report it only
//!   with `stream_options.include_usage`, in a last chunk with empty
//!   `choices` before `data: [DONE]`.
//! - OpenAI responses: `usage.input_tokens`, `usage.output_tokens`,
//!   `usage.total_tokens`; streams carry it in `response.completed` (or
//!   `response.incomplete`/`response.failed`) as `response.usage`.
//! - Anthropic: `usage.input_tokens`, `usage.output_tokens`,
//!   `usage.cache_creation_input_tokens`, `usage.cache_read_input_tokens`;
//!   streams send `message_start` with `message.usage` (input, output so
//!   far) and `message_delta` with cumulative `usage`.
//!
//! Each event is deserialized into a small typed view that skips everything
//! else (`IgnoredAny`), and streamed text is counted by a visitor without
//! copying it: no allocation per event.
//! Out-of-range numbers (negative, fractional, above [`MAX_SANE_TOKENS`],
//! not numbers) are clamped into `0..=MAX_SANE_TOKENS` and flagged in
//! [`UsageReport::clamped`].

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::request::{MAX_SANE_TOKENS, estimate_tokens};
use super::sse::SseLineReader;

/// Longest SSE line kept by default (4 MiB): a responses-API
/// `response.completed` event repeats the whole output on one line.
pub const DEFAULT_MAX_LINE: usize = 4 << 20;
/// Largest JSON response body buffered for its usage by default (8 MiB).
pub const DEFAULT_MAX_JSON_BODY: usize = 8 << 20;

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One JSON document (`application/json`).
    Json,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

impl Framing {
    /// From a response's `content-type`: SSE for `text/event-stream`, JSON
    /// otherwise (a JSON body that turns out to be SSE is still read as SSE).
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct)
                if ct
                    .trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream") =>
            {
                Framing::Sse
            }
            _ => Framing::Json,
        }
    }
}

/// Token usage, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (OpenAI's `prompt_tokens`, which include cached ones;
    /// `input_tokens` elsewhere, which for Anthropic exclude the cache).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Anthropic: tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
    /// Anthropic: tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// What the limiter charges: the sum of the above, or the upstream's
    /// `total_tokens` when that is larger. Cache reads count in full: they
    /// still occupy the upstream, and counting them keeps a quota simple to
    /// predict.
    pub total_tokens: u64,
}

/// Where the usage in a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's final usage.
    Reported,
    /// Some usage was reported (say Anthropic's `message_start`) but the
    /// final count never came: reported values, with the output no lower
    /// than the estimate from the streamed text.
    Partial,
    /// Nothing reported: the request's prompt estimate plus the streamed
    /// text's characters over `chars_per_token`.
    Estimated,
}

/// What to assume when the response does not say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsageFallback {
    /// The prompt estimate made for the request.
    pub prompt_tokens: u64,
    /// The model's characters per token.
    pub chars_per_token: f64,
}

/// The outcome of reading a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageReport {
    pub usage: Usage,
    pub source: UsageSource,
    /// A reported number was out of range (negative, fractional, not a
    /// number, above [`MAX_SANE_TOKENS`]) and was clamped or ignored.
    pub clamped: bool,
    /// Events or documents that could not be read (bad JSON, lines or
    /// bodies over the size limits); the rest of the stream was still read.
    pub framing_errors: u32,
    /// Characters of generated text seen (content, tool arguments, thinking).
    pub streamed_chars: u64,
    /// The stream ended with `data: [DONE]` (OpenAI chat/completions only).
    pub done: bool,
}

/// Reads a response body chunk by chunk and reports its token usage.
///
/// SSE bodies are parsed as they pass, keeping at most one partial line and
/// one event's `data`; JSON bodies are buffered (up to a limit) and parsed
/// at the end, where their `usage` is.
#[derive(Debug)]
pub struct UsageParser {
    framing: Framing,
    lines: SseLineReader,
    /// SSE: the current event's `data` lines, joined by `\n`.
    /// JSON: the body so far.
    buf: Vec<u8>,
    max_line: usize,
    max_json: usize,
    /// JSON: bytes seen, buffered or not.
    bytes_seen: u64,
    json_overflow: bool,
    acc: Accumulator,
}

impl UsageParser {
    /// A parser with the default limits ([`DEFAULT_MAX_LINE`],
    /// [`DEFAULT_MAX_JSON_BODY`]).
    pub fn new(framing: Framing) -> Self {
        Self::with_limits(framing, DEFAULT_MAX_LINE, DEFAULT_MAX_JSON_BODY)
    }

    /// A parser dropping SSE lines (and events) over `max_line` bytes and
    /// JSON bodies over `max_json` bytes (flagged as framing errors; usage is
    /// then estimated).
    pub fn with_limits(framing: Framing, max_line: usize, max_json: usize) -> Self {
        UsageParser {
            framing,
            lines: SseLineReader::new(max_line),
            buf: Vec::new(),
            max_line,
            max_json,
            bytes_seen: 0,
            json_overflow: false,
            acc: Accumulator::default(),
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self.framing {
            Framing::Sse => {
                let (buf, acc, max) = (&mut self.buf, &mut self.acc, self.max_line);
                self.lines
                    .feed(chunk, |line| on_sse_line(line, buf, acc, max));
            }
            Framing::Json => {
                self.bytes_seen = self
                    .bytes_seen
                    .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
                if self.json_overflow {
                    return;
                }
                if self.buf.len().saturating_add(chunk.len()) > self.max_json {
                    self.json_overflow = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
        }
    }

    /// Whether it is holding a JSON body (not SSE, not given up).
    pub fn holds_json(&self) -> bool {
        self.framing == Framing::Json && !self.json_overflow
    }

    /// Bytes of a JSON body held so far (0 for SSE, or once given up).
    pub fn buffered(&self) -> usize {
        match self.framing {
            Framing::Json => self.buf.len(),
            Framing::Sse => 0,
        }
    }

    /// Stops holding a JSON body (a caller's memory budget ran out): its
    /// usage is then estimated from its size, as for a body over `max_json`.
    pub fn give_up_json(&mut self) {
        if self.framing == Framing::Json {
            self.json_overflow = true;
            self.buf = Vec::new();
        }
    }

    /// SSE events with data seen so far (`[DONE]` excepted); 0 for JSON.
    pub fn events(&self) -> u32 {
        self.acc.events
    }

    /// Ends the body (end of stream, or the stream was cut) and reports the
    /// usage, reported or estimated with `fallback`.
    pub fn finish(mut self, fallback: &UsageFallback) -> UsageReport {
        match self.framing {
            Framing::Sse => self.finish_sse(),
            Framing::Json => {
                if self.json_overflow {
                    self.acc.framing_errors += 1;
                    // The text is in there somewhere: every byte a character
                    // is an overestimate, the safe side.
                    self.acc.text_chars = self.bytes_seen;
                } else if looks_like_sse(&self.buf) {
                    let body = std::mem::take(&mut self.buf);
                    self.feed_as_sse(&body);
                    self.finish_sse();
                } else {
                    match serde_json::from_slice::<Event>(&self.buf) {
                        Ok(ev) => self.acc.apply(ev),
                        Err(_) => self.acc.framing_errors += 1,
                    }
                }
            }
        }
        self.acc.report(fallback)
    }

    fn feed_as_sse(&mut self, body: &[u8]) {
        self.framing = Framing::Sse;
        self.feed(body);
    }

    fn finish_sse(&mut self) {
        let (buf, acc, max) = (&mut self.buf, &mut self.acc, self.max_line);
        self.lines.finish(|line| on_sse_line(line, buf, acc, max));
        // A stream cut before the blank line that ends its last event: the
        // event is read anyway (the spec says to drop it, but its tokens were
        // generated all the same).
        dispatch(buf, acc);
        acc.framing_errors = acc.framing_errors.saturating_add(self.lines.overflows());
    }
}

fn looks_like_sse(body: &[u8]) -> bool {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let body = &body[start..];
    body.starts_with(b"data:") || body.starts_with(b"event:") || body.starts_with(b":")
}

/// One SSE line: `data` lines accumulate, a blank line dispatches the
/// event; `event`, `id`, `retry` and comments are not needed (every payload
/// names its own type).
fn on_sse_line(line: &[u8], data: &mut Vec<u8>, acc: &mut Accumulator, max: usize) {
    if line.is_empty() {
        dispatch(data, acc);
        return;
    }
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(0) => return,
        Some(i) => {
            let value = &line[i + 1..];
            (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &b""[..]),
    };
    if name != b"data" {
        return;
    }
    if data.len().saturating_add(value.len()).saturating_add(1) > max {
        acc.framing_errors = acc.framing_errors.saturating_add(1);
        data.clear();
        return;
    }
    if !data.is_empty() {
        data.push(b'\n');
    }
    data.extend_from_slice(value);
}

fn dispatch(data: &mut Vec<u8>, acc: &mut Accumulator) {
    if data.is_empty() {
        return;
    }
    if data.trim_ascii() == b"[DONE]" {
        acc.done = true;
        data.clear();
        return;
    }
    acc.events = acc.events.saturating_add(1);
    if !mentions_usage(data) {
        // Most of a stream is one event per token, none of which carries
        // usage: parsing each as JSON cost more than the rest of the filter
        // together, so only the text is measured, by a scan (see
        // `scan_text_chars`).
        let (chars, well_formed) = scan_text_chars(data);
        acc.text_chars = acc.text_chars.saturating_add(chars);
        if !well_formed {
            acc.framing_errors = acc.framing_errors.saturating_add(1);
        }
    } else {
        match serde_json::from_slice::<Event>(data) {
            Ok(ev) => acc.apply(ev),
            Err(_) => acc.framing_errors = acc.framing_errors.saturating_add(1),
        }
    }
    data.clear();
}

/// Whether an event may carry usage (`"usage"` appears in it, as a key of
/// OpenAI's last chunk, Anthropic's `message_start`/`message_delta` or the
/// responses API's final response).
fn mentions_usage(data: &[u8]) -> bool {
    data.windows(7).any(|w| w == b"\"usage\"")
}

/// Characters of generated text in a JSON event, without building it, and
/// whether the event was well formed. It counts what [`Event`]'s parse
/// counts: strings under the top-level `choices`, `delta`, `content` or
/// `output`, reached through [`TEXT_KEYS`] and arrays. One pass, no
/// allocation; nesting deeper than 64 levels is not counted.
fn scan_text_chars(data: &[u8]) -> (u64, bool) {
    const TOP_KEYS: [&str; 4] = ["choices", "delta", "content", "output"];
    const MAX_DEPTH: usize = 64;
    // Per open container: whether it is an object, and whether its values count.
    let mut objects = 0u64;
    let mut counting = 0u64;
    let mut depth = 0usize;
    let mut pending = false; // the next value in the current object counts
    let mut closed_root = false;
    let bit = |d: usize| 1u64 << (d.min(MAX_DEPTH) - 1);
    let value_counts = |depth: usize, pending: bool, objects: u64, counting: u64| {
        if depth == 0 || depth > MAX_DEPTH {
            false
        } else if objects & bit(depth) != 0 {
            pending
        } else {
            counting & bit(depth) != 0
        }
    };
    let mut total = 0u64;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                let (chars, end, terminated) = scan_string(data, i + 1);
                if !terminated {
                    return (total, false);
                }
                let mut j = end;
                while j < data.len() && data[j].is_ascii_whitespace() {
                    j += 1;
                }
                let in_object = depth > 0 && depth <= MAX_DEPTH && objects & bit(depth) != 0;
                if in_object && data.get(j) == Some(&b':') {
                    let key = &data[i + 1..end - 1];
                    let keys: &[&str] = if depth == 1 { &TOP_KEYS } else { &TEXT_KEYS };
                    pending =
                        counting & bit(depth) != 0 && keys.iter().any(|k| k.as_bytes() == key);
                    i = j + 1;
                    continue;
                }
                if value_counts(depth, pending, objects, counting) {
                    total = total.saturating_add(chars);
                }
                pending = false;
                i = end;
                continue;
            }
            open @ (b'{' | b'[') => {
                let counts = depth == 0 || value_counts(depth, pending, objects, counting);
                depth += 1;
                if depth <= MAX_DEPTH {
                    let b = bit(depth);
                    objects = if open == b'{' {
                        objects | b
                    } else {
                        objects & !b
                    };
                    counting = if counts { counting | b } else { counting & !b };
                }
                pending = false;
            }
            b'}' | b']' => {
                if depth == 0 {
                    return (total, false);
                }
                depth -= 1;
                closed_root |= depth == 0;
                pending = false;
            }
            b if b.is_ascii_whitespace() || b == b':' => {}
            _ => pending = false,
        }
        i += 1;
    }
    (total, depth == 0 && closed_root)
}

/// Reads a JSON string whose content starts at `start`: its characters
/// (an escape counts as one), the index after the closing quote, and whether
/// there was one.
fn scan_string(data: &[u8], start: usize) -> (u64, usize, bool) {
    let mut chars = 0u64;
    let mut i = start;
    while i < data.len() {
        match data[i] {
            b'"' => return (chars, i + 1, true),
            b'\\' => {
                chars += 1;
                i += if data.get(i + 1) == Some(&b'u') { 6 } else { 2 };
            }
            b => {
                // Count characters, not bytes: skip UTF-8 continuation bytes.
                if b & 0xC0 != 0x80 {
                    chars += 1;
                }
                i += 1;
            }
        }
    }
    (chars, data.len(), false)
}

/// Usage gathered so far; each reported field keeps its latest value
/// (Anthropic's `message_delta` counts are cumulative).
#[derive(Debug, Default)]
struct Accumulator {
    /// SSE events with data, `[DONE]` excepted: about one per output token
    /// (OpenAI sends a chunk per token or few, Anthropic a delta).
    events: u32,
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    total: Option<u64>,
    /// A final usage was seen (top-level `usage`, or `response.usage`).
    complete: bool,
    /// Some usage was seen.
    partial: bool,
    clamped: bool,
    framing_errors: u32,
    text_chars: u64,
    done: bool,
}

impl Accumulator {
    fn apply(&mut self, ev: Event) {
        for text in [ev.choices, ev.delta, ev.content, ev.output]
            .into_iter()
            .flatten()
        {
            self.text_chars = self.text_chars.saturating_add(text.0);
        }
        if let Some(u) = ev.usage {
            self.apply_usage(&u);
            self.complete = true;
        }
        if let Some(u) = ev.message.and_then(|m| m.usage) {
            self.apply_usage(&u);
        }
        if let Some(u) = ev.response.and_then(|r| r.usage) {
            self.apply_usage(&u);
            self.complete = true;
        }
    }

    fn apply_usage(&mut self, u: &UsageFields) {
        self.partial = true;
        let mut set = |slot: &mut Option<u64>, n: Option<Num>| {
            if let Some(n) = n {
                let (value, clamped) = n.clamped();
                self.clamped |= clamped;
                if let Some(v) = value {
                    *slot = Some(v);
                }
            }
        };
        set(&mut self.input, u.prompt_tokens);
        set(&mut self.input, u.input_tokens);
        set(&mut self.output, u.completion_tokens);
        set(&mut self.output, u.output_tokens);
        set(&mut self.cache_creation, u.cache_creation_input_tokens);
        set(&mut self.cache_read, u.cache_read_input_tokens);
        set(&mut self.total, u.total_tokens);
    }

    fn report(&self, fallback: &UsageFallback) -> UsageReport {
        let estimated_output = estimate_tokens(self.text_chars, fallback.chars_per_token);
        let (source, input, output) = if self.complete {
            (
                UsageSource::Reported,
                self.input.unwrap_or(fallback.prompt_tokens),
                self.output.unwrap_or(estimated_output),
            )
        } else if self.partial {
            (
                UsageSource::Partial,
                self.input.unwrap_or(fallback.prompt_tokens),
                self.output.unwrap_or(0).max(estimated_output),
            )
        } else {
            (
                UsageSource::Estimated,
                fallback.prompt_tokens,
                estimated_output,
            )
        };
        let cache_creation = self.cache_creation.unwrap_or(0);
        let cache_read = self.cache_read.unwrap_or(0);
        let sum = input
            .saturating_add(output)
            .saturating_add(cache_creation)
            .saturating_add(cache_read);
        let reported_total = if self.complete { self.total } else { None };
        UsageReport {
            usage: Usage {
                input_tokens: input,
                output_tokens: output,
                cache_creation_input_tokens: cache_creation,
                cache_read_input_tokens: cache_read,
                total_tokens: sum.max(reported_total.unwrap_or(0)),
            },
            source,
            clamped: self.clamped,
            framing_errors: self.framing_errors,
            streamed_chars: self.text_chars,
            done: self.done,
        }
    }
}

/// The parts of an event or response body that matter; everything else is
/// skipped without being stored.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Event {
    /// Top-level usage: OpenAI (JSON, last stream chunk), Anthropic (JSON,
    /// `message_delta`), responses API JSON.
    usage: Option<UsageFields>,
    /// Anthropic `message_start`.
    message: Option<Shell>,
    /// Responses API stream events carrying the response.
    response: Option<Shell>,
    /// OpenAI chat/completions text (`delta.content`, `message.content`,
    /// `text`, tool call arguments).
    choices: Option<TextChars>,
    /// Anthropic `content_block_delta` and responses API `*.delta` text.
    delta: Option<TextChars>,
    /// Anthropic JSON content blocks.
    content: Option<TextChars>,
    /// Responses API JSON output items.
    output: Option<TextChars>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Shell {
    usage: Option<UsageFields>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageFields {
    prompt_tokens: Option<Num>,
    completion_tokens: Option<Num>,
    total_tokens: Option<Num>,
    input_tokens: Option<Num>,
    output_tokens: Option<Num>,
    cache_creation_input_tokens: Option<Num>,
    cache_read_input_tokens: Option<Num>,
}

/// A reported count as it came: any JSON value is accepted, so that one odd
/// field does not lose the whole event.
#[derive(Clone, Copy, Debug)]
enum Num {
    Count(u64),
    Negative,
    Float(f64),
    NotANumber,
}

impl Num {
    /// The value clamped into `0..=MAX_SANE_TOKENS` (`None`: ignore it), and
    /// whether it had to be changed.
    fn clamped(self) -> (Option<u64>, bool) {
        match self {
            Num::Count(n) if n <= MAX_SANE_TOKENS => (Some(n), false),
            Num::Count(_) => (Some(MAX_SANE_TOKENS), true),
            Num::Negative => (Some(0), true),
            Num::Float(f) if f.is_finite() && f >= 0.0 => {
                let exact = f.fract() == 0.0 && f <= MAX_SANE_TOKENS as f64;
                // `as` saturates; the min keeps it in range.
                (Some((f as u64).min(MAX_SANE_TOKENS)), !exact)
            }
            Num::Float(_) => (Some(0), true),
            Num::NotANumber => (None, true),
        }
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumVisitor)
    }
}

struct NumVisitor;

impl<'de> Visitor<'de> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
        Ok(Num::Count(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
        Ok(u64::try_from(v).map_or(Num::Negative, Num::Count))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Num, E> {
        Ok(Num::Float(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Num, E> {
        Ok(Num::NotANumber)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Num, E> {
        Ok(Num::NotANumber)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Num, E> {
        Ok(Num::NotANumber)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Num, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Num::NotANumber)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Num, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Num::NotANumber)
    }
}

/// Characters of generated text inside a value: strings count their
/// characters; objects count only the values of [`TEXT_KEYS`] (so `type`,
/// `role`, `id`, `stop_reason` do not); numbers and booleans nothing.
struct TextChars(u64);

/// Keys under which generated text sits in the four APIs' responses.
const TEXT_KEYS: [&str; 11] = [
    "text",
    "content",
    "delta",
    "message",
    "tool_calls",
    "function",
    "arguments",
    "partial_json",
    "thinking",
    "refusal",
    "reasoning_content",
];

impl<'de> Deserialize<'de> for TextChars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = TextChars;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<TextChars, E> {
        Ok(TextChars(
            u64::try_from(v.chars().count()).unwrap_or(u64::MAX),
        ))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextChars, E> {
        Ok(TextChars(0))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextChars, E> {
        Ok(TextChars(0))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextChars, E> {
        Ok(TextChars(0))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextChars, E> {
        Ok(TextChars(0))
    }
    fn visit_unit<E: de::Error>(self) -> Result<TextChars, E> {
        Ok(TextChars(0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextChars, A::Error> {
        let mut n = 0u64;
        while let Some(TextChars(c)) = seq.next_element()? {
            n = n.saturating_add(c);
        }
        Ok(TextChars(n))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextChars, A::Error> {
        let mut n = 0u64;
        while let Some(TextKey(is_text)) = map.next_key()? {
            if is_text {
                let TextChars(c) = map.next_value()?;
                n = n.saturating_add(c);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(TextChars(n))
    }
}

/// Whether an object key is one of [`TEXT_KEYS`], read without allocating.
struct TextKey(bool);

impl<'de> Deserialize<'de> for TextKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextKeyVisitor)
    }
}

struct TextKeyVisitor;

impl<'de> Visitor<'de> for TextKeyVisitor {
    type Value = TextKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<TextKey, E> {
        Ok(TextKey(TEXT_KEYS.contains(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FB: UsageFallback = UsageFallback {
        prompt_tokens: 10,
        chars_per_token: 4.0,
    };

    fn parse(framing: Framing, body: &str) -> UsageReport {
        let mut p = UsageParser::new(framing);
        p.feed(body.as_bytes());
        p.finish(&FB)
    }

    #[test]
    fn openai_json() {
        let r = parse(
            Framing::Json,
            r#"{"choices":[{"message":{"role":"assistant","content":"hi"}}],
               "usage":{"prompt_tokens":13,"completion_tokens":5,"total_tokens":18}}"#,
        );
        assert_eq!(r.source, UsageSource::Reported);
        assert_eq!(r.usage.input_tokens, 13);
        assert_eq!(r.usage.output_tokens, 5);
        assert_eq!(r.usage.total_tokens, 18);
        assert_eq!(r.streamed_chars, 2);
        assert!(!r.clamped);
    }

    #[test]
    fn absurd_numbers_are_clamped_and_flagged() {
        let r = parse(
            Framing::Json,
            r#"{"usage":{"prompt_tokens":-5,"completion_tokens":99999999999999,"total_tokens":"x"}}"#,
        );
        assert!(r.clamped);
        assert_eq!(r.usage.input_tokens, 0);
        assert_eq!(r.usage.output_tokens, MAX_SANE_TOKENS);
        assert_eq!(r.usage.total_tokens, MAX_SANE_TOKENS);
        let r = parse(
            Framing::Json,
            r#"{"usage":{"prompt_tokens":1e300,"completion_tokens":2.5}}"#,
        );
        assert!(r.clamped);
        assert_eq!(r.usage.input_tokens, MAX_SANE_TOKENS);
        assert_eq!(r.usage.output_tokens, 2);
    }

    #[test]
    fn json_that_is_not_json_is_estimated() {
        let r = parse(Framing::Json, "<html>502</html>");
        assert_eq!(r.source, UsageSource::Estimated);
        assert_eq!(r.framing_errors, 1);
        assert_eq!(r.usage.input_tokens, 10);
        assert_eq!(r.usage.output_tokens, 0);
    }

    #[test]
    fn oversized_json_is_estimated_from_its_size() {
        let mut p = UsageParser::with_limits(Framing::Json, 1024, 16);
        p.feed(br#"{"usage":{"prompt_tokens":1,"#);
        p.feed(br#""completion_tokens":1}}"#);
        let r = p.finish(&FB);
        assert_eq!(r.source, UsageSource::Estimated);
        assert_eq!(r.framing_errors, 1);
        assert_eq!(r.streamed_chars, 51);
        assert_eq!(r.usage.output_tokens, 13);
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::from_content_type(Some("text/event-stream; charset=utf-8")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("Text/Event-Stream")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("application/json")),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(None), Framing::Json);
    }

    #[test]
    fn multi_line_data_is_joined() {
        let r = parse(
            Framing::Sse,
            "data: {\"usage\":\ndata: {\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
        );
        assert_eq!(r.source, UsageSource::Reported);
        assert_eq!(r.usage.total_tokens, 7);
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    /// The scan and the full parse agree on the events APIs stream.
    #[test]
    fn scanning_counts_what_parsing_counts() {
        let events: [&str; 8] = [
            r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Hé \"you\"\n"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
            r#"{"choices":[{"text":" lorem","index":0}]}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"ipsum ✓"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"x\": "}}"#,
            r#"{"type":"response.output_text.delta","delta":"dolor"}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"response.output_text.done","text":"not counted: an echo"}"#,
        ];
        for e in events {
            let parsed: Event = serde_json::from_str(e).unwrap();
            let mut acc = Accumulator::default();
            acc.apply(parsed);
            assert_eq!(scan_text_chars(e.as_bytes()), (acc.text_chars, true), "{e}");
        }
    }

    #[test]
    fn scanning_broken_json_never_panics() {
        for e in [
            &b"{\"content\":\"abc"[..],
            b"\"",
            b"{\"content\":\"\\",
            b"{\"content\":\"\\u12",
            b"\xff\xfe\"text\":\"\xc3",
            b"]]}}",
            b"{\"a\":[[[[1]",
        ] {
            assert!(
                !scan_text_chars(e).1,
                "{:?} is not well formed",
                String::from_utf8_lossy(e)
            );
        }
        let deep = format!("{{\"delta\":{}\"x\"{}}}", "[".repeat(100), "]".repeat(100));
        assert!(scan_text_chars(deep.as_bytes()).1);
    }
}
