//! The filter chain: frames moving through the filters in Envoy's order,
//! stopped and resumed, and local replies.
//!
//! This is where a filter's verdict takes effect, and where the harness is
//! most likely to differ from Envoy in ways a filter can notice: a stopped
//! filter keeps seeing later frames and its buffered body; a pause in the
//! headers without `allow_on_headers_stop_iteration` becomes
//! `StopAllIterationAndWatermark` (body and trailers buffered unseen); the
//! response visits only the filters whose context exists, in reverse; a local
//! reply supersedes what the filters had queued. Requests and responses share
//! one implementation, parameterised by [`Dir`], so the two directions cannot
//! drift apart.

use super::plugins::Called;
use std::cell::RefCell;

use super::{Host, PluginId, StreamId};
use crate::abi::{Action, StreamType};
use crate::census::Callback;
use crate::headers::HeaderMap;
use crate::stream_data::StreamData;
use crate::vm::{LocalReply, StreamAction};

/// The direction a frame travels: the request towards the router, the
/// response towards the client (through the filters in reverse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dir {
    Request,
    Response,
}

/// One piece of a message as Envoy's filter manager hands it on. Header and
/// trailer maps live in the stream's shared data, so their frames only mark
/// the arrival; a body frame carries its bytes.
#[derive(Debug)]
pub(super) enum Frame {
    Headers { eos: bool },
    Data { bytes: Vec<u8>, eos: bool },
    Trailers,
}

/// What a stopped filter holds back.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Position (in the direction's order) of the filter that stopped.
    pub(super) at: usize,
    pub(super) headers: Option<bool>,
    pub(super) body: Option<(Vec<u8>, bool)>,
    pub(super) trailers: bool,
    /// The filter paused its headers without `allow_on_headers_stop_iteration`
    /// (Envoy's `StopAllIterationAndWatermark`): later body and trailers are
    /// buffered without calling it, and reach it only when it resumes.
    pub(super) stop_all: bool,
}

impl Host {
    pub(super) fn order_len(&self, id: StreamId, dir: Dir) -> usize {
        let s = &self.streams[&id];
        match dir {
            Dir::Request => s.slots.len(),
            Dir::Response => s.response_order.len(),
        }
    }

    pub(super) fn slot_at(&self, id: StreamId, dir: Dir, pos: usize) -> usize {
        let s = &self.streams[&id];
        match dir {
            Dir::Request => pos,
            Dir::Response => s.response_order[pos],
        }
    }

    pub(super) fn held_mut(&mut self, id: StreamId, dir: Dir) -> &mut Option<Held> {
        let s = self.streams.get_mut(&id).expect("stream exists");
        match dir {
            Dir::Request => &mut s.request_held,
            Dir::Response => &mut s.response_held,
        }
    }

    /// Moves a frame through the chain from position `pos`, as Envoy's filter
    /// manager does: each filter may continue it or stop; a stopped filter
    /// keeps receiving later frames (and buffers body) until it continues.
    pub(super) fn push(&mut self, id: StreamId, dir: Dir, mut pos: usize, mut frame: Frame) {
        loop {
            if self.stream_stopped(id) {
                return;
            }
            if pos >= self.order_len(id, dir) {
                self.sink(id, dir, frame);
                return;
            }
            let slot = self.slot_at(id, dir, pos);
            let held_here = self.held_mut(id, dir).as_ref().is_some_and(|h| h.at == pos);
            let stop_all = held_here && self.held_mut(id, dir).as_ref().is_some_and(|h| h.stop_all);
            if stop_all {
                // StopAllIteration: buffer without calling the filter.
                if let Some(h) = self.held_mut(id, dir).as_mut() {
                    match frame {
                        Frame::Headers { .. } => {}
                        Frame::Data { bytes, eos } => {
                            let (mut buffered, _) = h.body.take().unwrap_or_default();
                            buffered.extend_from_slice(&bytes);
                            h.body = Some((buffered, eos));
                        }
                        Frame::Trailers => h.trailers = true,
                    }
                }
                return;
            }
            if held_here {
                // The filter is stopped: it still sees the frame, and its verdict
                // decides whether everything it holds moves on.
                let action = match frame {
                    Frame::Headers { .. } => Action::Pause,
                    Frame::Data { bytes, eos } => {
                        let mut buffered = self
                            .held_mut(id, dir)
                            .as_mut()
                            .and_then(|h| h.body.take())
                            .map(|(b, _)| b)
                            .unwrap_or_default();
                        buffered.extend_from_slice(&bytes);
                        let (action, after) = self.call_body(id, dir, slot, buffered, eos);
                        if let Some(h) = self.held_mut(id, dir).as_mut() {
                            h.body = Some((after, eos));
                        }
                        action
                    }
                    Frame::Trailers => {
                        // Envoy's `getBuffer` returns the decoding buffer
                        // to a filter that buffered the body (its
                        // `buffering_request_body_`), so the trailers
                        // callback reads, and may rewrite, the whole body.
                        let buffered = self.held_mut(id, dir).as_mut().and_then(|h| h.body.take());
                        let (action, after) = self.call_trailers(id, dir, slot, buffered);
                        if let Some(h) = self.held_mut(id, dir).as_mut() {
                            h.trailers = true;
                            h.body = after;
                        }
                        action
                    }
                };
                if action == Action::Continue && !self.stream_stopped(id) {
                    self.release(id, dir, pos);
                }
                return;
            }
            let action = match &mut frame {
                Frame::Headers { eos } => self.call_headers(id, dir, slot, *eos),
                Frame::Data { bytes, eos } => {
                    let (action, after) =
                        self.call_body(id, dir, slot, std::mem::take(bytes), *eos);
                    *bytes = after;
                    action
                }
                Frame::Trailers => self.call_trailers(id, dir, slot, None).0,
            };
            if action == Action::Pause {
                let allow = self.plugins[self.streams[&id].slots[slot].0]
                    .config
                    .allow_on_headers_stop_iteration;
                let held = self.held_mut(id, dir);
                let mut h = Held {
                    at: pos,
                    ..Held::default()
                };
                match frame {
                    Frame::Headers { eos } => {
                        h.headers = Some(eos);
                        h.stop_all = !allow;
                    }
                    Frame::Data { bytes, eos } => h.body = Some((bytes, eos)),
                    Frame::Trailers => h.trailers = true,
                }
                *held = Some(h);
                return;
            }
            pos += 1;
        }
    }

    /// Passes on everything the filter at `pos` held (it continued).
    pub(super) fn release(&mut self, id: StreamId, dir: Dir, pos: usize) {
        let Some(held) = self.held_mut(id, dir).take() else {
            return;
        };
        if let Some(eos) = held.headers {
            self.push(id, dir, pos + 1, Frame::Headers { eos });
        }
        // After StopAllIteration the filter has not seen the buffered body and
        // trailers yet: Envoy delivers them starting from that filter.
        let from = if held.stop_all { pos } else { pos + 1 };
        if let Some((bytes, eos)) = held.body
            && !self.stream_stopped(id)
        {
            self.push(id, dir, from, Frame::Data { bytes, eos });
        }
        if held.trailers && !self.stream_stopped(id) {
            self.push(id, dir, from, Frame::Trailers);
        }
    }

    pub(super) fn call_headers(
        &mut self,
        id: StreamId,
        dir: Dir,
        slot: usize,
        eos: bool,
    ) -> Action {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, dir == Dir::Request) else {
            return Action::Continue;
        };
        let data = self.streams[&id].data.clone();
        let count = match dir {
            Dir::Request => data.borrow().request_headers.len(),
            Dir::Response => data.borrow().response_headers.len(),
        } as u32;
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_headers = true,
            Dir::Response => a.response_headers = true,
        });
        let eos = u32::from(eos);
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, Callback::RequestHeaders, |e, s| {
                e.on_request_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, Callback::ResponseHeaders, |e, s| {
                e.on_response_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            }),
        };
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return self.failed_verdict(plugin, worker, ctx),
        };
        if action == Action::Continue {
            // Envoy drops its pointer to the map once the filter continues.
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => a.request_headers = false,
                Dir::Response => a.response_headers = false,
            });
        }
        action
    }

    /// Calls the body callback with `bytes` as the visible buffer; returns the
    /// verdict and the buffer as the filter left it.
    pub(super) fn call_body(
        &mut self,
        id: StreamId,
        dir: Dir,
        slot: usize,
        bytes: Vec<u8>,
        eos: bool,
    ) -> (Action, Vec<u8>) {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, false) else {
            return (Action::Continue, bytes);
        };
        let data = self.streams[&id].data.clone();
        let len = bytes.len() as u32;
        self.expose_body(plugin, worker, ctx, &data, dir, bytes);
        let eos_raw = u32::from(eos);
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, Callback::RequestBody, |e, s| {
                e.on_request_body
                    .as_ref()
                    .map(|f| f.call(s, (ctx, len, eos_raw)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, Callback::ResponseBody, |e, s| {
                e.on_response_body
                    .as_ref()
                    .map(|f| f.call(s, (ctx, len, eos_raw)))
            }),
        };
        let after = take_body(&data, dir);
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return (self.failed_verdict(plugin, worker, ctx), after),
        };
        if action == Action::Continue {
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => a.request_body = false,
                Dir::Response => a.response_body = false,
            });
        }
        (action, after)
    }

    /// Makes `bytes` the body buffer the filter sees in this callback.
    fn expose_body(
        &mut self,
        plugin: PluginId,
        worker: usize,
        ctx: u32,
        data: &RefCell<StreamData>,
        dir: Dir,
        bytes: Vec<u8>,
    ) {
        match dir {
            Dir::Request => data.borrow_mut().request_body = bytes,
            Dir::Response => data.borrow_mut().response_body = bytes,
        }
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_body = true,
            Dir::Response => a.response_body = true,
        });
    }

    /// Calls the trailers callback; `buffered` is the body the filter holds
    /// (visible to it during the call, as in Envoy), returned as it left it.
    pub(super) fn call_trailers(
        &mut self,
        id: StreamId,
        dir: Dir,
        slot: usize,
        buffered: Option<(Vec<u8>, bool)>,
    ) -> (Action, Option<(Vec<u8>, bool)>) {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, false) else {
            return (Action::Continue, buffered);
        };
        let data = self.streams[&id].data.clone();
        let body_eos = buffered.as_ref().map(|(_, eos)| *eos);
        if let Some((bytes, _)) = buffered {
            self.expose_body(plugin, worker, ctx, &data, dir, bytes);
        }
        let count = match dir {
            Dir::Request => data.borrow().request_trailers.len(),
            Dir::Response => data.borrow().response_trailers.len(),
        } as u32;
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_trailers = true,
            Dir::Response => a.response_trailers = true,
        });
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, Callback::RequestTrailers, |e, s| {
                e.on_request_trailers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, Callback::ResponseTrailers, |e, s| {
                e.on_response_trailers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count)))
            }),
        };
        let after = body_eos.map(|eos| (take_body(&data, dir), eos));
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return (self.failed_verdict(plugin, worker, ctx), after),
        };
        if action == Action::Continue {
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => {
                    a.request_trailers = false;
                    a.request_body = false;
                }
                Dir::Response => {
                    a.response_trailers = false;
                    a.response_body = false;
                }
            });
        }
        (action, after)
    }

    /// Where frames leave the chain: the router (request) or the client (response).
    pub(super) fn sink(&mut self, id: StreamId, dir: Dir, frame: Frame) {
        match dir {
            Dir::Request => {
                let complete = match frame {
                    Frame::Headers { eos } => eos,
                    Frame::Data { bytes, eos } => {
                        let s = self.streams.get_mut(&id).expect("stream");
                        s.data.borrow_mut().info.bytes_received += bytes.len() as u64;
                        s.router.body.extend_from_slice(&bytes);
                        eos
                    }
                    Frame::Trailers => true,
                };
                if complete {
                    self.route(id);
                }
            }
            Dir::Response => {
                let now = self.now_ns();
                let s = self.streams.get_mut(&id).expect("stream");
                let complete = match frame {
                    Frame::Headers { eos } => {
                        let headers = s.data.borrow().response_headers.clone();
                        s.response.status = headers
                            .get(":status")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        s.response.headers = headers;
                        s.response.headers_at_ns = Some(now);
                        eos
                    }
                    Frame::Data { bytes, eos } => {
                        s.data.borrow_mut().info.bytes_sent += bytes.len() as u64;
                        s.response.body.extend_from_slice(&bytes);
                        if !bytes.is_empty() {
                            s.response.chunks.push((now, bytes));
                        }
                        eos
                    }
                    Frame::Trailers => {
                        s.response.trailers = Some(s.data.borrow().response_trailers.clone());
                        true
                    }
                };
                if complete {
                    self.complete(id, false);
                }
            }
        }
    }

    /// Computes the response path: every filter whose context exists, in reverse.
    pub(super) fn start_response(&mut self, id: StreamId) {
        let s = self.streams.get_mut(&id).expect("stream");
        s.response_started = true;
        s.response_order = (0..s.slots.len())
            .rev()
            .filter(|&i| s.slots[i].1.is_some())
            .collect();
        s.response_held = None;
    }

    /// Envoy's `sendLocalReply`: stop the request, build the response headers
    /// (`:status`, the filter's headers, then content-length/content-type when
    /// there is a body) and send it through every started filter in reverse.
    pub(super) fn send_local_reply(&mut self, id: StreamId, reply: LocalReply) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.done {
            return;
        }
        if s.response.headers_at_ns.is_some() {
            // Headers already reached the client: all Envoy can do is reset.
            return self.complete(id, true);
        }
        let in_response_path = s.response_started;
        s.local_reply_sent = true;
        s.router.generation += 1;
        s.request_held = None;
        s.response.local_reply = true;
        let mut headers = HeaderMap::new();
        headers.add(":status", &reply.status.to_string());
        for (k, v) in &reply.headers {
            headers.add(k, v);
        }
        if !reply.body.is_empty() {
            headers.add("content-length", &reply.body.len().to_string());
            headers.add("content-type", "text/plain");
        }
        {
            let mut data = s.data.borrow_mut();
            data.response_headers = headers;
            data.info.response_code = Some(reply.status);
            data.info.response_code_details = Some(reply.details.clone());
        }
        // Actions already queued for this stream are superseded.
        let index = &self.context_index;
        self.pending
            .retain(|(p, w, c, _)| index.get(&(*p, *w, *c)) != Some(&id));
        let eos = reply.body.is_empty();
        if in_response_path {
            // Simplification: a reply sent while encoding goes straight to the client.
            let s = self.streams.get_mut(&id).expect("stream");
            s.response_order.clear();
            s.response_held = None;
        } else {
            self.start_response(id);
        }
        let s = self.streams.get_mut(&id).expect("stream");
        s.local_reply_sent = false; // let the reply itself flow
        self.push(id, Dir::Response, 0, Frame::Headers { eos });
        if !eos {
            self.push(
                id,
                Dir::Response,
                0,
                Frame::Data {
                    bytes: reply.body,
                    eos: true,
                },
            );
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.local_reply_sent = true;
        }
    }

    pub(super) fn run_pending(&mut self) {
        while let Some((plugin, worker, ctx, action)) = self.pending.pop_front() {
            let Some(&id) = self.context_index.get(&(plugin, worker, ctx)) else {
                continue;
            };
            if self.streams.get(&id).is_none_or(|s| s.done) {
                continue;
            }
            match action {
                StreamAction::LocalReply(reply) => self.send_local_reply(id, reply),
                StreamAction::Close(_) => {
                    if let Some(s) = self.streams.get(&id) {
                        let mut data = s.data.borrow_mut();
                        if data.info.response_code_details.is_none() {
                            data.info.response_code_details = Some("wasm_close_stream".into());
                        }
                    }
                    self.complete(id, true);
                }
                StreamAction::Continue(kind) if self.plugins[plugin].upstream_cluster.is_some() => {
                    // An upstream filter resumes the response it holds.
                    if kind == StreamType::HttpResponse {
                        self.release_upstream_headers(id);
                    }
                }
                StreamAction::Continue(kind) => {
                    // Envoy drops the request-side pointers on any resume.
                    self.set_access(plugin, worker, ctx, |a| {
                        a.request_headers = false;
                        a.request_body = false;
                        a.request_trailers = false;
                    });
                    let dir = if kind == StreamType::HttpRequest {
                        Dir::Request
                    } else {
                        Dir::Response
                    };
                    let Some(slot) = self.streams[&id]
                        .slots
                        .iter()
                        .position(|(p, _)| *p == plugin)
                    else {
                        continue;
                    };
                    let pos = match dir {
                        Dir::Request => Some(slot),
                        Dir::Response => self.streams[&id]
                            .response_order
                            .iter()
                            .position(|&s| s == slot),
                    };
                    let held_at = match dir {
                        Dir::Request => self.streams[&id].request_held.as_ref().map(|h| h.at),
                        Dir::Response => self.streams[&id].response_held.as_ref().map(|h| h.at),
                    };
                    if let (Some(pos), Some(at)) = (pos, held_at)
                        && pos == at
                    {
                        self.release(id, dir, pos);
                    }
                }
            }
        }
    }
}

/// The body buffer as the filter left it (taken back from the stream).
fn take_body(data: &RefCell<StreamData>, dir: Dir) -> Vec<u8> {
    match dir {
        Dir::Request => std::mem::take(&mut data.borrow_mut().request_body),
        Dir::Response => std::mem::take(&mut data.borrow_mut().response_body),
    }
}
