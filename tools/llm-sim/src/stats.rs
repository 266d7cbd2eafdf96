//! Counters a test or the lab reads from `GET /_sim/stats`.
//!
//! They let an end-to-end test check what actually reached an upstream (how
//! many attempts a retry policy made, how many tokens were produced before a
//! cut) instead of inferring it from the client side. Plain relaxed atomics:
//! a snapshot is not a consistent cut across counters, which is fine for
//! counters that only grow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

use crate::quota::QuotaStatus;

/// Highest status code counted individually; anything above is counted as 599.
const MAX_STATUS: usize = 599;

/// The live counters of one server.
#[derive(Debug)]
pub struct Stats {
    requests: AtomicU64,
    inference_requests: AtomicU64,
    by_status: Box<[AtomicU64]>,
    in_flight: AtomicI64,
    tokens_produced: AtomicU64,
    prompt_tokens: AtomicU64,
    rejected_overloaded: AtomicU64,
    aborted: AtomicU64,
    connections_accepted: AtomicU64,
    gzipped: AtomicU64,
    blackholed: AtomicU64,
    rejected_quota: AtomicU64,
}

/// A point-in-time copy of [`Stats`], as served by the control port.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Requests received on the API port (any path).
    pub requests: u64,
    /// Inference requests received (`POST` to `/v1/chat/completions`,
    /// `/v1/completions` or `/v1/messages`): what a proxy's retries and
    /// probes add up to, without its health checks.
    #[serde(default)]
    pub inference_requests: u64,
    /// Responses by status code (as a decimal string key).
    pub by_status: BTreeMap<String, u64>,
    /// Requests received whose response has not finished yet.
    pub in_flight: i64,
    /// Requests waiting in the capacity queue.
    pub queued: u64,
    /// Completion tokens generated (including those of cut streams).
    pub tokens_produced: u64,
    /// Prompt tokens of the requests that generated.
    pub prompt_tokens: u64,
    /// Requests turned away by the capacity limit (429).
    pub rejected_overloaded: u64,
    /// Responses cut on purpose by the abort fault.
    pub aborted: u64,
    /// Connections accepted on the API port.
    pub connections_accepted: u64,
    /// Answers sent gzip-compressed (`accept-encoding: gzip` or `--gzip-always`).
    pub gzipped: u64,
    /// Inference requests the blackhole fault held (counted when the hold starts).
    pub blackholed: u64,
    /// Requests refused by the quota (429).
    pub rejected_quota: u64,
    /// Requests left in the quota's current window (`null`: no request limit).
    pub quota_requests_remaining: Option<u64>,
    /// Tokens left in the quota's current window (`null`: no token limit).
    pub quota_tokens_remaining: Option<u64>,
    /// Whether the API listener is open now.
    pub listening: bool,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            inference_requests: AtomicU64::new(0),
            by_status: (0..=MAX_STATUS).map(|_| AtomicU64::new(0)).collect(),
            in_flight: AtomicI64::new(0),
            tokens_produced: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            rejected_overloaded: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            gzipped: AtomicU64::new(0),
            blackholed: AtomicU64::new(0),
            rejected_quota: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// Counts a received request, now in flight.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a received inference request (after [`Stats::request_started`]).
    pub fn inference_started(&self) {
        self.inference_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks one request finished (pair of [`Stats::request_started`]).
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a response status.
    pub fn status(&self, status: u16) {
        let idx = usize::from(status).min(MAX_STATUS);
        if let Some(c) = self.by_status.get(idx) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `n` generated completion tokens.
    pub fn tokens(&self, n: u64) {
        self.tokens_produced.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts the prompt tokens of a request that generates.
    pub fn prompt(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a capacity rejection.
    pub fn overloaded(&self) {
        self.rejected_overloaded.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response cut by the abort fault.
    pub fn aborted(&self) {
        self.aborted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an answer sent gzip-compressed.
    pub fn gzipped(&self) {
        self.gzipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request the blackhole starts holding.
    pub fn blackholed(&self) {
        self.blackholed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request the quota refused.
    pub fn quota_refused(&self) {
        self.rejected_quota.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted connection.
    pub fn connection(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the counters; `queued`, `listening` and the `quota` come
    /// from their owners.
    pub fn snapshot(
        &self,
        queued: usize,
        listening: bool,
        quota: Option<&QuotaStatus>,
    ) -> StatsSnapshot {
        let by_status = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| (code.to_string(), n))
            })
            .collect();
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            inference_requests: self.inference_requests.load(Ordering::Relaxed),
            by_status,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: queued as u64,
            tokens_produced: self.tokens_produced.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            rejected_overloaded: self.rejected_overloaded.load(Ordering::Relaxed),
            aborted: self.aborted.load(Ordering::Relaxed),
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            gzipped: self.gzipped.load(Ordering::Relaxed),
            blackholed: self.blackholed.load(Ordering::Relaxed),
            rejected_quota: self.rejected_quota.load(Ordering::Relaxed),
            quota_requests_remaining: quota.and_then(|q| q.requests).map(|u| u.remaining),
            quota_tokens_remaining: quota.and_then(|q| q.tokens).map(|u| u.remaining),
            listening,
        }
    }
}
