//! `dispatch_http_call`: answering a filter's callouts from the simulated
//! clusters, and delivering the answers.
//!
//! Callouts bypass the filter chain and the router (no retries, no
//! `override_host`), take the cluster's latency, and time out with the 504
//! Envoy's async client produces; an answer for a context that is gone is
//! dropped, as Envoy cancels a context's calls when it is destroyed. These
//! rules differ enough from the router's to deserve their own module.

use super::schedule::Event;
use super::{Host, PluginId};
use crate::census::Callback;
use crate::headers::HeaderMap;
use crate::upstream::AttemptPlan;
use crate::vm::{CallResponse, OutgoingCall};

impl Host {
    /// Answers a `dispatch_http_call` from the cluster's endpoints (round
    /// robin) after their simulated latency, or with a 504 at the timeout.
    pub(super) fn dispatch(&mut self, plugin: PluginId, worker: usize, call: OutgoingCall) {
        self.http_calls.push(call.clone());
        let elapsed = self.elapsed();
        let Some(cluster) = self.clusters.get_mut(&call.cluster) else {
            return;
        };
        let Some(index) = cluster.next_round_robin() else {
            return;
        };
        let plan = cluster.endpoints[index]
            .behavior
            .plan(elapsed, &mut self.rng);
        let (delay, response) = match plan {
            AttemptPlan::ConnectFailure { after_ns } => (after_ns, CallResponse::default()),
            AttemptPlan::Respond(plan) => {
                let mut headers = HeaderMap::new();
                headers.add(":status", &plan.status.to_string());
                for (k, v) in &plan.headers {
                    headers.add(k, v);
                }
                for (k, v) in &plan.raw_headers {
                    headers.add_bytes(k, v);
                }
                let last = plan.chunks.last().map_or(0, |(o, _)| *o);
                let body = plan.chunks.into_iter().flat_map(|(_, b)| b).collect();
                (
                    plan.first_byte_ns + last,
                    CallResponse {
                        headers,
                        body,
                        trailers: HeaderMap::new(),
                    },
                )
            }
        };
        let timeout_ns = u64::from(call.timeout_ms) * 1_000_000;
        let (delay, response) = if call.timeout_ms > 0 && delay > timeout_ns {
            let mut headers = HeaderMap::new();
            headers.add(":status", "504");
            headers.add("content-length", "24");
            headers.add("content-type", "text/plain");
            (
                timeout_ns,
                CallResponse {
                    headers,
                    body: b"upstream request timeout".to_vec(),
                    trailers: HeaderMap::new(),
                },
            )
        } else {
            (delay, response)
        };
        self.schedule_in(
            delay,
            Event::CallDone {
                plugin,
                worker,
                context_id: call.context_id,
                token: call.token,
                response,
            },
        );
    }
}

impl Host {
    /// Hands a callout's answer to the context that dispatched it
    /// (`on_http_call_response`), if that context still exists.
    pub(super) fn deliver_call_response(
        &mut self,
        plugin: PluginId,
        worker: usize,
        context_id: u32,
        token: u32,
        response: CallResponse,
    ) {
        let exists = context_id == 1
            || self.plugins[plugin].vms[worker]
                .store
                .data()
                .contexts
                .contains_key(&context_id);
        let state = self.plugins[plugin].vms[worker].store.data_mut();
        state.pending_calls.remove(&token);
        if !exists {
            return; // Envoy cancels a context's calls when it is destroyed.
        }
        let headers = response.headers.len() as u32;
        let body = response.body.len() as u32;
        let trailers = response.trailers.len() as u32;
        state.call_response = Some(response);
        let _ = self.call(
            plugin,
            worker,
            context_id,
            Callback::HttpCallResponse,
            |e, s| {
                e.on_http_call_response
                    .as_ref()
                    .map(|f| f.call(s, (context_id, token, headers, body, trailers)))
            },
        );
        self.plugins[plugin].vms[worker]
            .store
            .data_mut()
            .call_response = None;
    }
}
