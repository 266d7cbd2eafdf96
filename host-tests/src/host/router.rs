//! The router at the end of the request chain: route and cluster selection,
//! `override_host`, upstream attempts and retries.
//!
//! sluice acts on traffic only through mechanisms Envoy's router already has
//! (a header the route matches, `override_host`, `x-envoy-retry-on` /
//! `x-envoy-max-retries`), so the harness must reproduce how the router reads
//! them: from the request headers as the *last* filter left them, with the
//! route re-resolved, one `override_host` entry per attempt, and Envoy's
//! jittered exponential back-off between retries. A filter whose headers the
//! router would ignore must fail here, not first in the Envoy lab.

use std::rc::Rc;
use std::time::Duration;

use super::chain::{Dir, Frame};
use super::{Event, Host, RouteConfig, StreamId};
use crate::abi::response_flags;
use crate::headers::HeaderMap;
use crate::stream_data::UpstreamHost;
use crate::upstream::{AttemptPlan, ResponsePlan};
use crate::vm::LocalReply;

/// The router's view of a stream: the route's choices and the current attempt.
#[derive(Default)]
pub(super) struct RouterState {
    pub(super) body: Vec<u8>,
    pub(super) started: bool,
    pub(super) cluster: Option<String>,
    pub(super) override_hosts: Vec<String>,
    pub(super) retry_on: Vec<String>,
    pub(super) retriable_codes: Vec<u32>,
    pub(super) retries_left: u32,
    /// The request's `x-envoy-upstream-rq-per-try-timeout-ms`, which
    /// overrides the route's `per_try_timeout` (Envoy reads it from the
    /// headers as they reach the router, so a filter can set it).
    pub(super) per_try_timeout: Option<Duration>,
    pub(super) retried: bool,
    pub(super) attempt: u64,
    /// Bumped per attempt and when the stream stops: stale events are dropped.
    pub(super) generation: u64,
    pub(super) plan: Option<Rc<ResponsePlan>>,
    /// The current attempt's response headers reached the router (the
    /// per-try timeout no longer applies).
    pub(super) headers_received: bool,
    /// Upstream filters hold the whole of the current attempt's body.
    pub(super) upstream_body_complete: bool,
}

impl Host {
    /// Picks the cluster and the retry policy from the request headers as the
    /// filters left them, then makes the first attempt.
    pub(super) fn route(&mut self, id: StreamId) {
        let route = self.options.route.clone();
        let s = self.streams.get_mut(&id).expect("stream");
        if s.router.started {
            return;
        }
        s.router.started = true;
        s.response.upstream_request_headers = Some(s.data.borrow().request_headers.clone());
        s.response.upstream_request_body = s.router.body.clone();
        let headers = s
            .response
            .upstream_request_headers
            .as_ref()
            .expect("just set");
        let cluster = Self::select_cluster(&route, headers);
        let Some(cluster) = cluster else {
            s.data.borrow_mut().info.response_flags |= response_flags::NO_ROUTE_FOUND;
            return self.router_reply(id, 404, "", "route_not_found");
        };
        if !self.clusters.contains_key(&cluster) {
            // The route was resolved again: no cluster, no `xds.cluster_name`.
            s.data.borrow_mut().info.cluster_name = None;
            s.data.borrow_mut().info.response_flags |= response_flags::NO_CLUSTER_FOUND;
            return self.router_reply(id, 503, "", "cluster_not_found");
        }
        s.data.borrow_mut().info.cluster_name = Some(cluster.clone());
        s.router.cluster = Some(cluster);
        s.router.override_hosts = headers
            .get(&route.override_host_header)
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        s.router.retry_on = headers
            .get("x-envoy-retry-on")
            .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default();
        s.router.retriable_codes = headers
            .get("x-envoy-retriable-status-codes")
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        let default_retries = u32::from(!s.router.retry_on.is_empty());
        s.router.retries_left = headers
            .get("x-envoy-max-retries")
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_retries);
        if s.router.retry_on.is_empty() {
            s.router.retries_left = 0;
        }
        s.router.per_try_timeout = headers
            .get("x-envoy-upstream-rq-per-try-timeout-ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        self.attempt(id);
    }

    /// The cluster the route picks for these request headers.
    pub(super) fn select_cluster(route: &RouteConfig, headers: &HeaderMap) -> Option<String> {
        route
            .cluster_header
            .as_ref()
            .and_then(|h| headers.get(h).map(str::to_owned))
            .or(route.default_cluster.clone())
    }

    pub(super) fn route_cluster(&self, headers: &HeaderMap) -> Option<String> {
        Self::select_cluster(&self.options.route, headers)
    }

    pub(super) fn attempt(&mut self, id: StreamId) {
        let elapsed = self.elapsed();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.router.attempt += 1;
        s.router.generation += 1;
        s.router.headers_received = false;
        s.router.upstream_body_complete = false;
        let generation = s.router.generation;
        let attempt = s.router.attempt;
        s.data.borrow_mut().info.attempt_count = attempt;
        let cluster_name = s.router.cluster.clone().unwrap_or_default();
        let wanted = s.router.override_hosts.get(attempt as usize - 1).cloned();
        let Some(cluster) = self.clusters.get_mut(&cluster_name) else {
            return;
        };
        // override_host: this attempt's entry if the cluster has it, else the fallback policy.
        let index = wanted
            .and_then(|a| cluster.index_of(&a))
            .or_else(|| cluster.next_round_robin());
        let Some(index) = index else {
            s.data.borrow_mut().info.response_flags |= response_flags::NO_HEALTHY_UPSTREAM;
            return self.router_reply(id, 503, "no healthy upstream", "no_healthy_upstream");
        };
        let endpoint = &cluster.endpoints[index];
        s.data.borrow_mut().info.upstream_host = Some(UpstreamHost {
            address: endpoint.address.clone(),
            locality: endpoint.locality.clone(),
        });
        s.response.upstream = Some(endpoint.address.clone());
        s.response.attempts = attempt;
        let plan = endpoint.behavior.plan(elapsed, &mut self.rng);
        match plan {
            AttemptPlan::ConnectFailure { after_ns } => {
                s.router.plan = None;
                self.schedule_in(
                    after_ns,
                    Event::AttemptConnectFailure {
                        stream: id,
                        generation,
                    },
                );
            }
            AttemptPlan::Respond(plan) => {
                let at = plan.first_byte_ns;
                s.router.plan = Some(Rc::new(plan));
                self.schedule_in(
                    at,
                    Event::AttemptHeaders {
                        stream: id,
                        generation,
                    },
                );
            }
        }
        let per_try = self
            .streams
            .get(&id)
            .and_then(|s| s.router.per_try_timeout)
            .or(self.options.route.per_try_timeout);
        if let Some(timeout) = per_try {
            self.schedule_in(
                timeout.as_nanos() as u64,
                Event::PerTryTimeout {
                    stream: id,
                    generation,
                },
            );
        }
        self.start_upstream_filters(id);
    }

    /// The route's per-try timeout: an attempt whose headers have not reached
    /// the router is abandoned, and retried or answered 504.
    pub(super) fn on_per_try_timeout(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.router.generation != generation
            || s.done
            || s.local_reply_sent
            || s.router.headers_received
        {
            return;
        }
        // A timeout counts as a 504 for the retry policy.
        let retry = s.router.retries_left > 0 && Self::retriable(&s.router, Some(504));
        s.router.generation += 1;
        self.end_upstream_filters(id);
        if retry && self.maybe_retry(id, Some(504)) {
            return;
        }
        if let Some(s) = self.streams.get(&id) {
            s.data.borrow_mut().info.response_flags |= response_flags::UPSTREAM_REQUEST_TIMEOUT;
        }
        self.router_reply(
            id,
            504,
            "upstream request timeout",
            "upstream_per_try_timeout",
        );
    }

    /// Whether the router retries this outcome (`None` status = connect failure or reset).
    pub(super) fn retriable(router: &RouterState, status: Option<u32>) -> bool {
        router
            .retry_on
            .iter()
            .any(|policy| match (policy.as_str(), status) {
                ("5xx", None)
                | ("reset", None)
                | ("connect-failure", None)
                | ("gateway-error", None) => true,
                ("5xx", Some(s)) => s >= 500,
                ("gateway-error", Some(s)) => matches!(s, 502..=504),
                ("retriable-4xx", Some(s)) => s == 409,
                ("retriable-status-codes", Some(s)) => router.retriable_codes.contains(&s),
                _ => false,
            })
    }

    /// Schedules a retry if the policy allows one; returns whether it did.
    pub(super) fn maybe_retry(&mut self, id: StreamId, status: Option<u32>) -> bool {
        let route = self.options.route.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if s.router.retries_left == 0 || !Self::retriable(&s.router, status) {
            if s.router.retried
                || (s.router.retries_left == 0
                    && !s.router.retry_on.is_empty()
                    && Self::retriable(&s.router, status))
            {
                s.data.borrow_mut().info.response_flags |=
                    response_flags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
            }
            return false;
        }
        s.router.retries_left -= 1;
        s.router.retried = true;
        let retry_index = s.router.attempt as u32; // 1 for the first retry
        let generation = s.router.generation;
        // Envoy's jittered exponential back-off: uniform in [0, min(base·2^n, max)).
        let ceiling = route.retry_base_interval.as_nanos() as u64 * (1u64 << retry_index.min(20));
        let ceiling = ceiling.min(route.retry_max_interval.as_nanos() as u64);
        let delay = self.rng.below(ceiling.max(1));
        self.schedule_in(
            delay,
            Event::Retry {
                stream: id,
                generation,
            },
        );
        true
    }

    pub(super) fn on_attempt_headers(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        let Some(plan) = s.router.plan.clone() else {
            return;
        };
        let service_time = (self.now_ns() - s.response.started_ns) / 1_000_000;
        let mut headers = HeaderMap::new();
        headers.add(":status", &plan.status.to_string());
        for (k, v) in &plan.headers {
            headers.add(k, v);
        }
        for (k, v) in &plan.raw_headers {
            headers.add_bytes(k, v);
        }
        headers.add("x-envoy-upstream-service-time", &service_time.to_string());
        if self.has_upstream_filters(id) {
            // The body keeps coming whatever the upstream filters do with
            // the headers; they see the response before the router.
            self.schedule_attempt_body(id, generation, &plan);
            return self.upstream_response_headers(id, headers, &plan);
        }
        if self.maybe_retry(id, Some(plan.status)) {
            return;
        }
        let s = self.streams.get_mut(&id).expect("stream");
        s.router.headers_received = true;
        {
            let mut data = s.data.borrow_mut();
            data.response_headers = headers;
            data.info.response_code = Some(plan.status);
            data.info.response_code_details = Some("via_upstream".into());
        }
        let eos = plan.chunks.is_empty() && plan.trailers.is_none();
        self.start_response(id);
        self.push(id, Dir::Response, 0, Frame::Headers { eos });
        self.schedule_attempt_body(id, generation, &plan);
    }

    /// Schedules the attempt's body chunks (and its reset, if planned).
    fn schedule_attempt_body(&mut self, id: StreamId, generation: u64, plan: &ResponsePlan) {
        let mut last = 0;
        for (index, (offset, _)) in plan.chunks.iter().enumerate() {
            if plan.reset_after_chunks.is_some_and(|n| index >= n) {
                break;
            }
            last = *offset;
            self.schedule_in(
                *offset,
                Event::AttemptChunk {
                    stream: id,
                    generation,
                    index,
                },
            );
        }
        if plan
            .reset_after_chunks
            .is_some_and(|n| n < plan.chunks.len())
        {
            self.schedule_in(
                last + 1,
                Event::AttemptReset {
                    stream: id,
                    generation,
                },
            );
        }
    }

    pub(super) fn on_attempt_chunk(&mut self, id: StreamId, generation: u64, index: usize) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        let Some(plan) = s.router.plan.as_ref() else {
            return;
        };
        let Some((_, bytes)) = plan.chunks.get(index) else {
            return;
        };
        let bytes = bytes.clone();
        let last = index + 1 == plan.chunks.len() && plan.trailers.is_none();
        if self.has_upstream_filters(id) {
            self.upstream_response_body(id, bytes, false);
            if last
                && self
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.router.generation == generation)
            {
                self.upstream_response_body(id, Vec::new(), true);
            }
            return;
        }
        // As on the request side: each chunk with end_stream false, then an
        // empty end_stream call when the upstream's message is complete.
        self.push(id, Dir::Response, 0, Frame::Data { bytes, eos: false });
        if last && !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Response,
                0,
                Frame::Data {
                    bytes: Vec::new(),
                    eos: true,
                },
            );
        }
    }

    pub(super) fn on_connect_failure(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        if self.maybe_retry(id, None) {
            return;
        }
        if let Some(s) = self.streams.get(&id) {
            s.data.borrow_mut().info.response_flags |= response_flags::UPSTREAM_CONNECTION_FAILURE;
        }
        self.router_reply(
            id,
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            "upstream_reset_before_response_started{connection_failure}",
        );
    }

    pub(super) fn on_attempt_reset(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done {
            return;
        }
        {
            let mut data = s.data.borrow_mut();
            data.info.response_flags |= response_flags::UPSTREAM_REMOTE_RESET;
            data.info.response_code_details =
                Some("upstream_reset_after_response_started{remote_reset}".into());
        }
        self.complete(id, true);
    }

    /// A reply generated by the router itself (no route, no cluster, upstream failure).
    pub(super) fn router_reply(&mut self, id: StreamId, status: u32, body: &str, details: &str) {
        self.send_local_reply(
            id,
            LocalReply {
                status,
                details: details.into(),
                body: body.as_bytes().to_vec(),
                headers: Vec::new(),
                grpc_status: -1,
            },
        );
    }
}

impl Host {
    /// A retry's back-off elapsed: make the next attempt unless the stream
    /// moved on (a newer attempt, a local reply, or the end).
    pub(super) fn on_retry(&mut self, id: StreamId, generation: u64) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.router.generation == generation && !s.done && !s.local_reply_sent)
        {
            self.attempt(id);
        }
    }
}
