//! The response, observed once for every capability.

use std::time::Duration;

use sluice_core::llm::{Framing, UsageParser};
use sluice_core::outcome::ResponseFlags;
use sluice_core::time::Timestamp;

/// Bytes of JSON answers one worker holds at once, for their usage (an
/// answer past its share is given up: its usage is then estimated from its
/// size, an overestimate). 32 MiB: hundreds of ordinary answers at once,
/// and a bound however many a client opens.
pub const JSON_BUDGET: usize = 32 << 20;

/// A worker's budget of bytes held for JSON answers.
#[derive(Debug)]
pub(crate) struct JsonBudget {
    left: std::cell::Cell<usize>,
}

impl JsonBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            left: std::cell::Cell::new(bytes),
        }
    }

    /// Takes `n` bytes if they are left.
    pub(crate) fn take(&self, n: usize) -> bool {
        let left = self.left.get();
        if n <= left {
            self.left.set(left - n);
            true
        } else {
            false
        }
    }

    pub(crate) fn give_back(&self, n: usize) {
        self.left.set(self.left.get().saturating_add(n));
    }
}

/// What happened to a request upstream, as far as the engine saw it.
#[derive(Debug, Default)]
pub struct Observation {
    /// When the request was let go to the upstream; `None` if it never was
    /// (answered by sluice, or the client left first).
    pub sent_at: Option<Timestamp>,
    /// The upstream's status; `None` when no response headers came (or the
    /// answer was sluice's own).
    pub status: Option<u16>,
    /// The response is a server-sent event stream.
    pub sse: bool,
    /// The first response body byte (or the headers of a body-less answer).
    pub first_byte: Option<Timestamp>,
    /// Streamed events with data (about one per output token).
    pub events: u32,
    /// When the first event arrived.
    pub first_event: Option<Timestamp>,
    /// When the last event arrived, to the end of the stream's chunk: the
    /// clock is read at the first event and at the stream's end only.
    pub last_event: Option<Timestamp>,
    /// Envoy's `response.flags`, read when the request is done.
    pub flags: ResponseFlags,
    /// Upstream attempts the router made (`upstream.request_attempt_count`),
    /// read when the request is done for a capability that counts them.
    pub attempts: Option<u32>,
    /// The upstream host (`ip:port`) it reached, read when done.
    pub upstream_address: Option<String>,
    /// The response was sluice's own local reply.
    pub replied_locally: bool,
    /// The upstream compressed its answer (`content-encoding` other than
    /// `identity`) although sluice asked for none: its body cannot be read.
    pub compressed: bool,
    usage: Option<UsageParser>,
    /// Total tokens of the request, once a capability settled its usage.
    pub settled_tokens: Option<u64>,
    /// Bytes of a JSON answer this observation holds in the worker's budget.
    held: usize,
    /// Events arrived after `last_event` was last stamped.
    last_unstamped: bool,
}

impl Observation {
    /// Time from sending to the first response byte.
    pub fn ttft(&self) -> Option<Duration> {
        Some(self.first_byte?.since(self.sent_at?))
    }

    /// Mean time per output token after the first (streams of at least
    /// two events).
    pub fn tpot(&self) -> Option<Duration> {
        match (self.first_event, self.last_event) {
            (Some(first), Some(last)) if self.events >= 2 => {
                Some(last.since(first) / (self.events - 1))
            }
            _ => None,
        }
    }

    /// Whether the upstream answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// The usage reader, for the one capability that settles usage (which
    /// then records the total in [`Observation::settled_tokens`]).
    pub fn take_usage(&mut self) -> Option<UsageParser> {
        self.usage.take()
    }

    /// The tokens the request used (prompt and completion), as the
    /// capability that settled usage counted them, or read here when none
    /// did (nothing assumed where the answer says nothing).
    pub fn tokens_used(&mut self) -> Option<u64> {
        if self.settled_tokens.is_none()
            && let Some(parser) = self.usage.take()
        {
            let report = parser.finish(&sluice_core::llm::UsageFallback {
                prompt_tokens: 0,
                chars_per_token: f64::INFINITY,
            });
            self.settled_tokens = Some(report.usage.total_tokens);
        }
        self.settled_tokens
    }

    /// Gives back what this observation holds of the worker's budget.
    pub(crate) fn release(&mut self, budget: &JsonBudget) {
        budget.give_back(std::mem::take(&mut self.held));
    }

    /// Response headers arrived. `read_json` buffers JSON bodies for their
    /// usage; streams are always read (events time the tokens).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_headers(
        &mut self,
        status: Option<u16>,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        end_of_stream: bool,
        read_json: bool,
        now: impl Fn() -> Timestamp,
    ) {
        self.status = status;
        let framing = Framing::from_content_type(content_type);
        self.sse = framing == Framing::Sse;
        self.compressed = content_encoding
            .is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"));
        if (self.sse || read_json) && !self.compressed {
            self.usage = Some(UsageParser::new(framing));
        }
        if end_of_stream {
            self.first_byte.get_or_insert_with(now);
        }
    }

    /// Whether body chunks need reading (someone parses them).
    pub(crate) fn reads_body(&self) -> bool {
        self.usage.is_some()
    }

    /// A body chunk of `size` bytes arrived; `chunk` when it was read.
    pub(crate) fn on_chunk(
        &mut self,
        size: usize,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
        budget: &JsonBudget,
        now: impl Fn() -> Timestamp,
    ) {
        if size == 0 {
            if end_of_stream && std::mem::take(&mut self.last_unstamped) {
                self.last_event = Some(now());
            }
            return;
        }
        let mut at = None;
        let mut clock = || *at.get_or_insert_with(&now);
        if self.first_byte.is_none() {
            self.first_byte = Some(clock());
        }
        let (Some(parser), Some(chunk)) = (self.usage.as_mut(), chunk) else {
            return;
        };
        // A JSON answer is held until its end (its usage is there): the
        // worker's budget bounds what all answers hold together.
        let mut taken = 0;
        if parser.holds_json() {
            if budget.take(chunk.len()) {
                taken = chunk.len();
            } else {
                parser.give_up_json();
            }
        }
        let before = parser.events();
        parser.feed(chunk);
        let holding = parser.buffered();
        let accounted = self.held.saturating_add(taken);
        budget.give_back(accounted.saturating_sub(holding));
        self.held = holding;
        let after = parser.events();
        if after > before {
            self.events = after;
            if self.first_event.is_none() {
                let t = clock();
                self.first_event = Some(t);
                self.last_event = Some(t);
            } else {
                // Stamped at the end of the stream: a clock read per chunk
                // is a host call per token for the same mean.
                self.last_unstamped = true;
            }
        }
        if end_of_stream && self.last_unstamped {
            self.last_unstamped = false;
            self.last_event = Some(clock());
        }
    }

    /// The request is done: events since the last stamp end now (a stream
    /// cut before its end).
    pub(crate) fn close(&mut self, now: Timestamp) {
        if std::mem::take(&mut self.last_unstamped) {
            self.last_event = Some(now);
        }
    }
}
