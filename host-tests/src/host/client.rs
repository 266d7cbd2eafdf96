//! The client's side of a stream: the [`Request`] a test sends, the
//! [`Response`] it gets back, and the `Host` methods that send and wait.
//!
//! A test speaks in whole requests and responses; Envoy speaks in frames
//! (headers, body chunks, trailers) that each filter may stop or rewrite.
//! This module is where one becomes the other: a request is split into the
//! frames Envoy's HTTP/1 codec would deliver (see `streams.rs`), and a
//! response is assembled from what reaches the client, with the virtual
//! times at which it arrived.

use std::collections::BTreeMap;
use std::time::Duration;

use super::chain::{Dir, Frame};
use super::{Event, Host, StreamId};
use crate::headers::HeaderMap;

/// A request as the client sends it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Headers in the order the client sends them; a value added with
    /// [`Request::header_bytes`] shows here as lossy text.
    pub headers: Vec<(String, String)>,
    /// Exact bytes of the values in `headers` that are not text, by index in
    /// `headers` (set by [`Request::header_bytes`]; keep it in step if you
    /// edit `headers` by hand).
    pub raw_values: BTreeMap<usize, Vec<u8>>,
    /// Body chunks, delivered in order.
    pub body: Vec<Vec<u8>>,
    pub trailers: Option<Vec<(String, String)>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), "sluice.test".into()),
            ],
            raw_values: BTreeMap::new(),
            body: Vec::new(),
            trailers: None,
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    /// A POST with a JSON body in one chunk (and its content-length).
    pub fn post_json(path: &str, body: &str) -> Self {
        Self::new("POST", path)
            .header("content-type", "application/json")
            .header("content-length", &body.len().to_string())
            .chunk(body.as_bytes())
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A header whose value is arbitrary bytes (a client can send
    /// `x-tenant-id: \xff`; Envoy passes such bytes on unchanged).
    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.raw_values.insert(self.headers.len(), value.to_vec());
        self.headers
            .push((name.into(), String::from_utf8_lossy(value).into_owned()));
        self
    }

    /// The headers as the client sends them on the wire, values byte-exact.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (i, (name, value)) in self.headers.iter().enumerate() {
            match self.raw_values.get(&i) {
                Some(bytes) => map.add_bytes(name, bytes),
                None => map.add(name, value),
            }
        }
        map
    }

    pub fn chunk(mut self, bytes: &[u8]) -> Self {
        self.body.push(bytes.to_vec());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .get_or_insert_with(Vec::new)
            .push((name.into(), value.into()));
        self
    }
}

/// What the client received.
#[derive(Clone, Debug, Default)]
pub struct Response {
    /// `:status`, 0 if no headers arrived.
    pub status: u32,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Each body chunk with the virtual time it reached the client (ns).
    pub chunks: Vec<(u64, Vec<u8>)>,
    pub trailers: Option<HeaderMap>,
    /// A filter or the router answered locally.
    pub local_reply: bool,
    /// The stream was reset (after or instead of a response).
    pub reset: bool,
    pub started_ns: u64,
    pub headers_at_ns: Option<u64>,
    pub completed_ns: Option<u64>,
    /// Upstream attempts the router made.
    pub attempts: u64,
    /// Address of the endpoint that answered last.
    pub upstream: Option<String>,
    /// `response.code_details` at the end.
    pub code_details: Option<String>,
    /// `response.flags` at the end.
    pub flags: u64,
    pub worker: usize,
    /// Request headers as the router saw them (after every filter), if the
    /// request reached it.
    pub upstream_request_headers: Option<HeaderMap>,
    /// Request body as the router received it.
    pub upstream_request_body: Vec<u8>,
}

impl Response {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// A response header's first value, byte-exact.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers.get_bytes(name)
    }

    /// Time from the start to the response headers.
    pub fn time_to_headers(&self) -> Option<Duration> {
        self.headers_at_ns
            .map(|t| Duration::from_nanos(t - self.started_ns))
    }

    /// Time from the start to the end of the response.
    pub fn duration(&self) -> Option<Duration> {
        self.completed_ns
            .map(|t| Duration::from_nanos(t - self.started_ns))
    }

    pub fn is_complete(&self) -> bool {
        self.completed_ns.is_some()
    }
}

impl Host {
    /// Starts a request on the next worker (round robin) now; returns its id.
    pub fn start(&mut self, request: Request) -> StreamId {
        let worker = self.next_worker % self.options.workers;
        self.next_worker += 1;
        self.start_on(worker, request)
    }

    /// Starts a request on a given worker now.
    pub fn start_on(&mut self, worker: usize, request: Request) -> StreamId {
        let id = self.open_stream(worker, request);
        self.run_pending();
        id
    }

    /// Sends a request and runs virtual time until its response completes
    /// (at most 10 virtual minutes).
    pub fn send(&mut self, request: Request) -> Response {
        let id = self.start(request);
        self.finish(id)
    }

    /// Like [`Host::send`] on a given worker.
    pub fn send_on(&mut self, worker: usize, request: Request) -> Response {
        let id = self.start_on(worker, request);
        self.finish(id)
    }

    /// Runs until the stream completes (at most 10 virtual minutes) and returns its response.
    pub fn finish(&mut self, id: StreamId) -> Response {
        self.run_until(Duration::from_secs(600), |h| h.finished.contains_key(&id));
        self.response(id).unwrap_or_default()
    }

    /// The response of a stream: final if it finished, partial otherwise.
    pub fn response(&self, id: StreamId) -> Option<Response> {
        self.finished
            .get(&id)
            .cloned()
            .or_else(|| self.streams.get(&id).map(|s| s.response.clone()))
    }

    /// Schedules a request to start at `at` (virtual time since the host
    /// start); `tag` comes back in [`Host::completed`].
    pub fn schedule_request(
        &mut self,
        at: Duration,
        worker: Option<usize>,
        request: Request,
        tag: u64,
    ) {
        let at = self
            .options
            .start_time_ns
            .saturating_add(at.as_nanos() as u64);
        self.schedule(
            at,
            Event::StartRequest {
                worker,
                request: Box::new(request),
                tag,
            },
        );
    }

    /// Streams finished so far, in completion order, with the tag they were scheduled with.
    pub fn completed(&self) -> Vec<(StreamId, Option<u64>, &Response)> {
        self.completion_order
            .iter()
            .filter_map(|id| {
                self.finished
                    .get(id)
                    .map(|r| (*id, self.tags.get(id).copied(), r))
            })
            .collect()
    }

    /// Number of streams finished so far.
    pub fn finished_count(&self) -> usize {
        self.finished_total
    }

    /// Streams not finished yet.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether to keep finished responses (turn off in benchmarks to save memory).
    pub fn keep_finished_responses(&mut self, keep: bool) {
        self.keep_finished = keep;
    }

    /// Starts a request whose body is still coming: the request's own chunks
    /// (if any) are sent without end of stream; send the rest with
    /// [`Host::send_request_data`] and [`Host::send_request_trailers`].
    pub fn start_streaming(&mut self, worker: usize, request: Request) -> StreamId {
        let id = self.open_stream_with(worker, request, true);
        self.run_pending();
        id
    }

    /// Sends a request body chunk on a stream started with [`Host::start_streaming`].
    pub fn send_request_data(&mut self, id: StreamId, bytes: &[u8], end_stream: bool) {
        if !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: bytes.to_vec(),
                    eos: end_stream,
                },
            );
        }
        self.run_pending();
    }

    /// Ends a streaming request with trailers.
    pub fn send_request_trailers(&mut self, id: StreamId, trailers: &[(&str, &str)]) {
        if let Some(s) = self.streams.get(&id) {
            s.data.borrow_mut().request_trailers = HeaderMap::from_pairs(trailers.iter().copied());
        }
        if !self.stream_stopped(id) {
            self.push(id, Dir::Request, 0, Frame::Trailers);
        }
        self.run_pending();
    }
}
