//! The life of one stream: how it opens (what Envoy's connection manager
//! adds before any filter runs), what the host keeps about it while it is
//! active, and how it ends (`on_log`, `on_done`, `on_delete`, in Envoy's
//! order).
//!
//! A stream is the unit a test reasons about, but its state is touched by
//! the chain, the router and the event queue. Keeping its bookkeeping here
//! (and its data shared with the VMs in [`StreamData`]) means there is one
//! place that decides when a stream is stopped or done, so a late upstream
//! event or a resumed filter can never act on a finished stream.

use std::cell::RefCell;
use std::rc::Rc;

use super::chain::{Dir, Frame, Held};
use super::client::{Request, Response};
use super::router::RouterState;
use super::upstream_filters::UpstreamAttempt;
use super::{Host, PluginId, StreamId};
use crate::census::Callback;
use crate::headers::HeaderMap;
use crate::stream_data::StreamData;
use crate::vm::StreamAction;

/// What the host keeps about an active stream besides the data its filters share.
pub(super) struct Stream {
    pub(super) worker: usize,
    pub(super) data: Rc<RefCell<StreamData>>,
    /// Per chain position: plugin and the context id once created.
    pub(super) slots: Vec<(PluginId, Option<u32>)>,
    pub(super) request_held: Option<Held>,
    pub(super) response_held: Option<Held>,
    /// Chain positions the response visits, in order (created filters, reversed).
    pub(super) response_order: Vec<usize>,
    pub(super) response_started: bool,
    pub(super) local_reply_sent: bool,
    pub(super) router: RouterState,
    /// The upstream filters of the current attempt, if its cluster has any.
    pub(super) upstream: Option<UpstreamAttempt>,
    pub(super) response: Response,
    pub(super) done: bool,
}

impl Host {
    pub(super) fn open_stream(&mut self, worker: usize, request: Request) -> StreamId {
        self.open_stream_with(worker, request, false)
    }

    pub(super) fn open_stream_with(
        &mut self,
        worker: usize,
        request: Request,
        streaming: bool,
    ) -> StreamId {
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        let now = self.now_ns();
        let mut headers = request.header_map();
        if self.options.normalize_downstream {
            if headers.get(":scheme").is_none() {
                headers.add(":scheme", "http");
            }
            for h in [
                "x-envoy-max-retries",
                "x-envoy-retry-on",
                "x-envoy-retriable-status-codes",
            ] {
                headers.remove(h);
            }
            headers.replace("x-forwarded-proto", "http");
            if headers.get("x-request-id").is_none() {
                let (a, b) = (self.rng.next_u64(), self.rng.next_u64());
                let uuid = format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    (b >> 48) & 0x3fff | 0x8000,
                    b & 0xffff_ffff_ffff
                );
                headers.add("x-request-id", &uuid);
            }
        }
        // Envoy's connection manager resolves the route before the first
        // filter's `decodeHeaders`, so `xds.cluster_name` (the route's
        // cluster, when it exists) is readable at request headers. A filter
        // that changes request headers clears the route cache, but the value
        // stays until the route is resolved again (by the router: see
        // [`Host::route`], which re-selects from the headers as the filters
        // left them).
        let cluster_name = self
            .route_cluster(&headers)
            .filter(|c| self.clusters.contains_key(c));
        let data = StreamData {
            request_headers: headers,
            info: crate::stream_data::StreamInfo {
                cluster_name,
                start_time_ns: now,
                source_address: format!("10.0.1.{}:{}", 1 + worker, 40000 + (id.0 % 20000)),
                destination_address: "10.0.0.10:8080".into(),
                protocol: "HTTP/1.1".into(),
                route_name: Some(self.options.route.name.clone()),
                ..Default::default()
            },
            ..StreamData::default()
        };
        let stream = Stream {
            worker,
            data: Rc::new(RefCell::new(data)),
            slots: (0..self.plugins.len())
                .filter(|&p| self.plugins[p].upstream_cluster.is_none())
                .map(|p| (p, None))
                .collect(),
            upstream: None,
            request_held: None,
            response_held: None,
            response_order: Vec::new(),
            response_started: false,
            local_reply_sent: false,
            router: RouterState::default(),
            response: Response {
                started_ns: now,
                worker,
                ..Response::default()
            },
            done: false,
        };
        self.streams.insert(id, stream);
        let body_chunks = request.body.len();
        let has_trailers = request.trailers.is_some();
        self.push(
            id,
            Dir::Request,
            0,
            Frame::Headers {
                eos: body_chunks == 0 && !has_trailers && !streaming,
            },
        );
        // Envoy's HTTP/1 codec hands each body chunk on as it arrives
        // (end_stream false) and ends the message with an empty end_stream
        // call, so the filters see the body in calls with eos=false, then
        // `on_http_request_body(0, true)`.
        for chunk in request.body {
            if self.stream_stopped(id) {
                break;
            }
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: chunk,
                    eos: false,
                },
            );
        }
        if body_chunks > 0 && !has_trailers && !streaming && !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: Vec::new(),
                    eos: true,
                },
            );
        }
        if let Some(trailers) = request.trailers {
            if let Some(s) = self.streams.get(&id) {
                s.data.borrow_mut().request_trailers = HeaderMap::from_pairs(trailers);
            }
            if !self.stream_stopped(id) {
                self.push(id, Dir::Request, 0, Frame::Trailers);
            }
        }
        id
    }

    /// True once the stream is done or a local reply / reset is pending for it.
    pub(super) fn stream_stopped(&self, id: StreamId) -> bool {
        let Some(stream) = self.streams.get(&id) else {
            return true;
        };
        if stream.done {
            return true;
        }
        self.pending.iter().any(|(p, w, ctx, action)| {
            matches!(action, StreamAction::LocalReply(_) | StreamAction::Close(_))
                && self.context_index.get(&(*p, *w, *ctx)) == Some(&id)
        })
    }

    /// Ends a stream: records the response, then runs `on_log`, `on_done` and
    /// `on_delete` on every filter context it created (Envoy logs first, then
    /// destroys the filters).
    pub(super) fn complete(&mut self, id: StreamId, reset: bool) {
        let now = self.now_ns();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.done {
            return;
        }
        s.done = true;
        s.router.generation += 1;
        s.response.reset = reset;
        s.response.completed_ns = Some(now);
        {
            let mut data = s.data.borrow_mut();
            data.info.request_duration_ns = Some(now - s.response.started_ns);
            s.response.code_details = data.info.response_code_details.clone();
            s.response.flags = data.info.response_flags;
            s.response.attempts = data.info.attempt_count;
        }
        let worker = s.worker;
        self.end_upstream_filters(id);
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let contexts: Vec<(PluginId, u32)> = s
            .slots
            .iter()
            .filter_map(|(p, c)| c.map(|c| (*p, c)))
            .collect();
        for &(plugin, ctx) in &contexts {
            self.set_access(plugin, worker, ctx, |a| a.access_log = true);
            let _ = self.call(plugin, worker, ctx, Callback::Log, |e, s| {
                e.on_log.as_ref().map(|f| f.call(s, ctx))
            });
            self.set_access(plugin, worker, ctx, |a| a.access_log = false);
        }
        for &(plugin, ctx) in &contexts {
            let _ = self.call(plugin, worker, ctx, Callback::Done, |e, s| {
                e.on_done.as_ref().map(|f| f.call(s, ctx))
            });
            let _ = self.call(plugin, worker, ctx, Callback::Delete, |e, s| {
                e.on_delete.as_ref().map(|f| f.call(s, ctx))
            });
            self.plugins[plugin].vms[worker]
                .store
                .data_mut()
                .contexts
                .remove(&ctx);
            self.context_index.remove(&(plugin, worker, ctx));
        }
        if let Some(s) = self.streams.remove(&id) {
            self.finished_total += 1;
            if self.keep_finished {
                self.finished.insert(id, s.response);
                self.completion_order.push(id);
            }
        }
    }
}
