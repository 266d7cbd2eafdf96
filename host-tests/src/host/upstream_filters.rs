//! Upstream HTTP filters: Wasm filters in a cluster's `http_filters`, run by
//! the router once per attempt, between the router and the upstream codec.
//!
//! They see what a downstream filter cannot: the host the router picked
//! (`upstream.address` is set in their `on_http_request_headers`) and which
//! attempt this is (`upstream.request_attempt_count` 1, 2, 3 across retries),
//! and they see the upstream's response *before the router does*. That last
//! point is what makes a first-token deadline possible: an upstream filter
//! that pauses the response headers (with `allow_on_headers_stop_iteration`)
//! until the first body chunk keeps the router from seeing them, so the
//! route's per-try timeout still applies and a silent endpoint is abandoned
//! and retried elsewhere. All of this was checked by hand in Envoy 1.40.
//!
//! What the harness models, per attempt:
//! - new contexts for the cluster's upstream filters, on their own copy of
//!   the request headers and stream info (after host selection); the request
//!   body, if any, arrives in one `on_http_request_body(size, true)` call.
//!   The request path is assumed to continue (a pause there is not modelled);
//! - the response through them in reverse order before the router: a pause in
//!   `on_http_response_headers` holds the headers (and the body that follows)
//!   until the filter continues in a body callback or with
//!   `continue_stream`; only then does the router see the status (and may
//!   retry) and the response go on to the downstream filters;
//! - at the end of the attempt (retry, timeout, end of stream) `on_done` and
//!   `on_delete`. Whether Envoy calls `on_log` on upstream instances was not
//!   checked, so the harness does not.
//!
//! An upstream filter with the same `vm_id` as a downstream one shares its
//! shared data (one store per `vm_id`, as in Envoy). Envoy may also run both
//! in one VM per worker (same VM memory); here each plugin has its own VMs.

use std::cell::RefCell;
use std::rc::Rc;

use super::chain::{Dir, Frame};
use super::plugins::Called;
use super::{Host, PluginId, StreamId};
use crate::abi::Action;
use crate::census::Callback;
use crate::headers::HeaderMap;
use crate::stream_data::{Access, SharedStream, StreamData};
use crate::upstream::ResponsePlan;
use crate::vm::StreamContext;

/// The upstream filters of one attempt.
pub(super) struct UpstreamAttempt {
    /// The upstream request's headers and the attempt's stream info.
    pub(super) data: SharedStream,
    /// The filters' contexts, in `http_filters` order.
    pub(super) contexts: Vec<(PluginId, u32)>,
    /// Response headers held by the filter at this position of the response
    /// order (reverse of `contexts`): the router has not seen them.
    pub(super) held_at: Option<usize>,
    /// Whether the response headers end the stream.
    pub(super) headers_eos: bool,
    /// Body that passed the filters while the headers were held.
    pub(super) held_body: Vec<u8>,
}

impl Host {
    /// The upstream filters of `cluster`, in the order they were added.
    fn upstream_plugins(&self, cluster: &str) -> Vec<PluginId> {
        (0..self.plugins.len())
            .filter(|&p| self.plugins[p].upstream_cluster.as_deref() == Some(cluster))
            .collect()
    }

    /// Whether the current attempt of a stream runs upstream filters.
    pub(super) fn has_upstream_filters(&self, id: StreamId) -> bool {
        self.streams
            .get(&id)
            .and_then(|s| s.upstream.as_ref())
            .is_some_and(|u| !u.contexts.is_empty())
    }

    /// Creates this attempt's upstream filter contexts and runs their request
    /// callbacks (the router has picked the host: `upstream.*` is readable).
    pub(super) fn start_upstream_filters(&mut self, id: StreamId) {
        self.end_upstream_filters(id);
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let cluster = s.router.cluster.clone().unwrap_or_default();
        let plugins = self.upstream_plugins(&cluster);
        if plugins.is_empty() {
            return;
        }
        let worker = s.worker;
        let body = s.router.body.clone();
        let data = {
            let downstream = s.data.borrow();
            StreamData {
                request_headers: downstream.request_headers.clone(),
                info: downstream.info.clone(),
                ..StreamData::default()
            }
        };
        let data = Rc::new(RefCell::new(data));
        let mut contexts = Vec::new();
        for plugin in plugins {
            let vm = &mut self.plugins[plugin].vms[worker];
            let ctx = vm.next_context_id;
            vm.next_context_id += 1;
            vm.store.data_mut().contexts.insert(
                ctx,
                StreamContext {
                    stream: data.clone(),
                    access: Access::default(),
                },
            );
            self.context_index.insert((plugin, worker, ctx), id);
            contexts.push((plugin, ctx));
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.upstream = Some(UpstreamAttempt {
                data: data.clone(),
                contexts: contexts.clone(),
                held_at: None,
                headers_eos: false,
                held_body: Vec::new(),
            });
        }
        let eos = u32::from(body.is_empty());
        for (plugin, ctx) in contexts {
            let _ = self.call(plugin, worker, ctx, Callback::ContextCreate, |e, s| {
                e.on_context_create.as_ref().map(|f| f.call(s, (ctx, 1)))
            });
            let count = data.borrow().request_headers.len() as u32;
            self.set_access(plugin, worker, ctx, |a| a.request_headers = true);
            let _ = self.call(plugin, worker, ctx, Callback::RequestHeaders, |e, s| {
                e.on_request_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            });
            self.set_access(plugin, worker, ctx, |a| a.request_headers = false);
            if !body.is_empty() {
                let len = body.len() as u32;
                data.borrow_mut().request_body = body.clone();
                self.set_access(plugin, worker, ctx, |a| a.request_body = true);
                let _ = self.call(plugin, worker, ctx, Callback::RequestBody, |e, s| {
                    e.on_request_body.as_ref().map(|f| f.call(s, (ctx, len, 1)))
                });
                self.set_access(plugin, worker, ctx, |a| a.request_body = false);
                data.borrow_mut().request_body.clear();
            }
        }
    }

    /// Ends the current attempt's upstream filters (`on_done`, `on_delete`).
    pub(super) fn end_upstream_filters(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let worker = s.worker;
        let Some(attempt) = s.upstream.take() else {
            return;
        };
        for (plugin, ctx) in attempt.contexts {
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
        // Actions the ended contexts queued have no stream to act on.
        let index = &self.context_index;
        self.pending
            .retain(|(p, w, c, _)| index.contains_key(&(*p, *w, *c)));
    }

    /// The upstream's response headers arrive: they pass the upstream
    /// filters (in reverse), then reach the router unless one holds them.
    pub(super) fn upstream_response_headers(
        &mut self,
        id: StreamId,
        headers: HeaderMap,
        plan: &ResponsePlan,
    ) {
        let eos = plan.chunks.is_empty() && plan.trailers.is_none();
        let Some(attempt) = self.streams.get_mut(&id).and_then(|s| s.upstream.as_mut()) else {
            return;
        };
        attempt.headers_eos = eos;
        {
            let mut data = attempt.data.borrow_mut();
            data.response_headers = headers;
            data.info.response_code = Some(plan.status);
            data.info.response_code_details = Some("via_upstream".into());
        }
        self.run_upstream_headers(id, 0);
    }

    /// Runs `on_http_response_headers` from position `from` of the response
    /// order; hands the headers to the router if nobody holds them.
    fn run_upstream_headers(&mut self, id: StreamId, from: usize) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let worker = s.worker;
        let Some(attempt) = s.upstream.as_ref() else {
            return;
        };
        let order: Vec<(PluginId, u32)> = attempt.contexts.iter().rev().copied().collect();
        let data = attempt.data.clone();
        let eos = u32::from(attempt.headers_eos);
        for (pos, &(plugin, ctx)) in order.iter().enumerate().skip(from) {
            let count = data.borrow().response_headers.len() as u32;
            self.set_access(plugin, worker, ctx, |a| a.response_headers = true);
            let called = self.call(plugin, worker, ctx, Callback::ResponseHeaders, |e, s| {
                e.on_response_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            });
            let action = match called {
                Called::Returned(raw) => Action::from_raw(raw),
                _ => Action::Continue,
            };
            if action == Action::Pause {
                if let Some(attempt) = self.streams.get_mut(&id).and_then(|s| s.upstream.as_mut()) {
                    attempt.held_at = Some(pos);
                }
                return;
            }
            self.set_access(plugin, worker, ctx, |a| a.response_headers = false);
        }
        self.router_receives_response(id);
    }

    /// A response body frame from the upstream passes the upstream filters;
    /// a filter holding the headers that continues here releases them.
    pub(super) fn upstream_response_body(&mut self, id: StreamId, bytes: Vec<u8>, eos: bool) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let worker = s.worker;
        let Some(attempt) = s.upstream.as_ref() else {
            return;
        };
        let order: Vec<(PluginId, u32)> = attempt.contexts.iter().rev().copied().collect();
        let data = attempt.data.clone();
        let held_at = attempt.held_at;
        // Without `allow_on_headers_stop_iteration` a header pause is
        // StopAllIteration: the body is buffered without calling the filter.
        let stop_all = held_at.is_some_and(|at| {
            !self.plugins[order[at].0]
                .config
                .allow_on_headers_stop_iteration
        });
        let mut buffer = bytes;
        if !stop_all {
            let reach = held_at.map_or(order.len(), |at| at + 1);
            for (pos, &(plugin, ctx)) in order.iter().enumerate().take(reach) {
                let len = buffer.len() as u32;
                data.borrow_mut().response_body = std::mem::take(&mut buffer);
                self.set_access(plugin, worker, ctx, |a| a.response_body = true);
                let called = self.call(plugin, worker, ctx, Callback::ResponseBody, |e, s| {
                    e.on_response_body
                        .as_ref()
                        .map(|f| f.call(s, (ctx, len, u32::from(eos))))
                });
                self.set_access(plugin, worker, ctx, |a| a.response_body = false);
                buffer = std::mem::take(&mut data.borrow_mut().response_body);
                let continued = match called {
                    Called::Returned(raw) => Action::from_raw(raw) == Action::Continue,
                    Called::Missing | Called::Failed => true,
                };
                if Some(pos) == held_at && continued {
                    self.stash_held_body(id, buffer, eos);
                    return self.release_upstream_headers(id);
                }
            }
        }
        if held_at.is_some() {
            self.stash_held_body(id, buffer, eos);
            return;
        }
        self.push(id, Dir::Response, 0, Frame::Data { bytes: buffer, eos });
    }

    /// Keeps body that passed the filters while the router has no headers.
    fn stash_held_body(&mut self, id: StreamId, bytes: Vec<u8>, eos: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.router.upstream_body_complete |= eos;
        if let Some(attempt) = s.upstream.as_mut() {
            attempt.held_body.extend_from_slice(&bytes);
        }
    }

    /// The filter holding the response headers continued: the remaining
    /// filters see them, then the router, then what was held of the body.
    pub(super) fn release_upstream_headers(&mut self, id: StreamId) {
        let Some(attempt) = self.streams.get_mut(&id).and_then(|s| s.upstream.as_mut()) else {
            return;
        };
        let Some(at) = attempt.held_at.take() else {
            return;
        };
        self.run_upstream_headers(id, at + 1);
    }

    /// The router sees the response headers of the attempt: it may retry;
    /// otherwise the response starts down the downstream filter chain.
    fn router_receives_response(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(plan) = s.router.plan.clone() else {
            return;
        };
        s.router.headers_received = true;
        if Self::retriable(&s.router, Some(plan.status)) && s.router.retries_left > 0 {
            // Abandon this attempt: its pending chunks become stale.
            s.router.generation += 1;
            self.end_upstream_filters(id);
            self.maybe_retry(id, Some(plan.status));
            return;
        }
        // Not retried: sets the retry-limit flag when that is why.
        self.maybe_retry(id, Some(plan.status));
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(attempt) = s.upstream.as_mut() else {
            return;
        };
        let headers = attempt.data.borrow().response_headers.clone();
        let held_body = std::mem::take(&mut attempt.held_body);
        let body_complete = s.router.upstream_body_complete;
        let eos = plan.chunks.is_empty() && plan.trailers.is_none();
        {
            let mut data = s.data.borrow_mut();
            data.response_headers = headers;
            data.info.response_code = Some(plan.status);
            data.info.response_code_details = Some("via_upstream".into());
        }
        self.start_response(id);
        self.push(id, Dir::Response, 0, Frame::Headers { eos });
        if !eos && (!held_body.is_empty() || body_complete) && !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Response,
                0,
                Frame::Data {
                    bytes: held_body,
                    eos: body_complete,
                },
            );
        }
    }
}
