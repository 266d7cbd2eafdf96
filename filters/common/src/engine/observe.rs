//! The response, observed once for every capability.

use std::time::Duration;

use sluice_core::llm::{Framing, UsageParser};
use sluice_core::outcome::ResponseFlags;
use sluice_core::time::Timestamp;

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
    pub first_event: Option<Timestamp>,
    pub last_event: Option<Timestamp>,
    /// Envoy's `response.flags`, read when the request is done.
    pub flags: ResponseFlags,
    /// The upstream host (`ip:port`) it reached, read when done.
    pub upstream_address: Option<String>,
    /// The response was sluice's own local reply.
    pub replied_locally: bool,
    usage: Option<UsageParser>,
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

    /// The usage reader, for the one capability that settles usage.
    pub fn take_usage(&mut self) -> Option<UsageParser> {
        self.usage.take()
    }

    /// Response headers arrived. `read_json` buffers JSON bodies for their
    /// usage; streams are always read (events time the tokens).
    pub(crate) fn on_headers(
        &mut self,
        status: Option<u16>,
        content_type: Option<&str>,
        end_of_stream: bool,
        read_json: bool,
        now: impl Fn() -> Timestamp,
    ) {
        self.status = status;
        let framing = Framing::from_content_type(content_type);
        self.sse = framing == Framing::Sse;
        if self.sse || read_json {
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
        now: impl Fn() -> Timestamp,
    ) {
        if size == 0 {
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
        let before = parser.events();
        parser.feed(chunk);
        let after = parser.events();
        if after > before {
            let t = clock();
            self.events = after;
            self.first_event.get_or_insert(t);
            self.last_event = Some(t);
        }
    }
}
