//! The engine as an upstream filter: one context per upstream attempt.
//!
//! Envoy (≥ 1.31) runs a Wasm filter placed in a cluster's `http_filters`
//! once per attempt, retries included, after the endpoint was picked
//! (`upstream.address` is set in its request-headers callback, and
//! `upstream.request_attempt_count` reads 1, 2, 3); with the same `vm_id`
//! it shares data with the request's instance. Outlier detection and retry
//! budgets judge endpoints by attempts, not by requests: a request retried
//! twice is three outcomes on possibly three endpoints.

use std::time::Duration;

use sluice_core::outcome::ResponseFlags;
use sluice_core::time::Timestamp;

/// Stream property (Envoy filter state) by which the request's instance
/// asks the per-attempt one to hold each attempt's response headers until
/// its first body byte (the first token of a stream). Envoy's router stops
/// an attempt's per-try timeout when it sees response headers; held back,
/// they keep the timer running, so the per-try timeout becomes a
/// first-token deadline and a silent endpoint is abandoned (and the request
/// retried elsewhere) before any byte reaches the client.
///
/// A property, not a header: every attempt of a request shares one header
/// map in Envoy 1.40, so a header the first attempt removed (to keep it
/// from the upstream) would be gone for the retries; filter state reaches
/// every attempt and never leaves the proxy, and a client cannot set it.
pub const FIRST_TOKEN_PROPERTY: &str = "sluice_first_token";

/// The root id of the per-attempt instance (`sluice render envoy` gives it
/// to the upstream filter; the request's instance has `sluice`).
pub use sluice_policy::ATTEMPT_ROOT_ID;

/// One upstream attempt, as it ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attempt {
    /// 1 for the first try, 2 for the first retry, …
    pub number: u32,
    /// The endpoint (`ip:port`) Envoy picked.
    pub endpoint: Option<String>,
    /// When the attempt started.
    pub started: Timestamp,
    /// The endpoint's status, if it answered.
    pub status: Option<u16>,
    /// Its first response byte.
    pub first_byte: Option<Timestamp>,
    /// Envoy's response flags for the attempt (resets, timeouts, connect
    /// failures).
    pub flags: ResponseFlags,
    /// On a 429: how long the endpoint asked not to be sent requests
    /// (`retry-after`, `x-ratelimit-reset-*`, `anthropic-ratelimit-*-reset`).
    pub cooldown: Option<Duration>,
    /// The quota the answer says is left (`x-ratelimit-remaining-*`,
    /// `anthropic-ratelimit-*-remaining`), read when a capability asks
    /// ([`super::Capability::reads_quota`]).
    pub headroom: Option<sluice_core::failover::Headroom>,
}

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use sluice_core::failover::headroom;
use sluice_core::outlier::reset::cooldown;

use super::root::Config;
use crate::host::{self, Map};
use crate::metrics::Counter;

/// What every attempt context of one configuration counts.
pub(crate) struct AttemptMetrics {
    /// Attempts seen (`sluice.attempts`).
    attempts: Counter,
    /// Attempts after the first (`sluice.attempt_retries`).
    retries: Counter,
}

impl AttemptMetrics {
    pub(crate) fn define() -> Self {
        AttemptMetrics {
            attempts: Counter::define("sluice.attempts"),
            retries: Counter::define("sluice.attempt_retries"),
        }
    }
}

/// The per-attempt context: observes, then tells every capability.
pub(crate) struct AttemptHttp {
    config: Option<Rc<Config>>,
    metrics: Rc<AttemptMetrics>,
    attempt: Attempt,
    finished: bool,
    /// Hold response headers until the first body byte ([`FIRST_TOKEN_PROPERTY`]).
    hold: bool,
    /// Response headers are held now.
    holding: bool,
    /// The response reached its end (headers, body or trailers said so).
    ended: bool,
}

impl AttemptHttp {
    pub(crate) fn new(config: Option<Rc<Config>>, metrics: Rc<AttemptMetrics>) -> Self {
        AttemptHttp {
            config,
            metrics,
            attempt: Attempt::default(),
            finished: false,
            hold: false,
            holding: false,
            ended: false,
        }
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.attempt.flags =
            ResponseFlags::from_envoy_bits(host::property_u64(&["response", "flags"]).unwrap_or(0));
        // A success whose body never ended was cut: Envoy 1.40 shows this
        // context none of the upstream's reset flags, so the missing end is
        // the sign. Unless the client left (its `DC` flag), the endpoint
        // failed the attempt, as a reset before the headers would.
        let cut = !self.ended
            && self.attempt.status.is_some_and(|s| (200..300).contains(&s))
            && !self.attempt.flags.downstream_disconnect;
        if cut {
            self.attempt.flags.reset = true;
        }
        self.metrics.attempts.inc();
        if self.attempt.number > 1 {
            self.metrics.retries.inc();
        }
        if let Some(config) = &self.config {
            for cap in &config.caps {
                cap.attempt(&self.attempt);
            }
        }
    }
}

impl Context for AttemptHttp {
    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl HttpContext for AttemptHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.attempt.started = host::now();
        self.attempt.number = host::property_u64(&["upstream", "request_attempt_count"])
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1);
        self.attempt.endpoint = host::property_string(&["upstream", "address"]);
        // A host call per attempt, only when some capability may ask.
        self.hold = self.config.as_ref().is_some_and(|c| c.holds_first_token)
            && host::property(&[FIRST_TOKEN_PROPERTY]).is_some();
        if let Some(config) = &self.config {
            for cap in &config.caps {
                cap.attempt_started(&self.attempt);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let now = host::now();
        // One header read per attempt; the whole map only on a 429, for its
        // reset time, or when a capability reads rate-limit headers.
        let status: Option<u16> = host::header_bytes(Map::ResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.trim().parse().ok());
        self.attempt.status = status;
        let quota = self.config.as_ref().is_some_and(|c| c.reads_quota);
        if status == Some(429) || quota {
            let headers = host::headers(Map::ResponseHeaders).unwrap_or_default();
            if status == Some(429) {
                self.attempt.cooldown = cooldown(|name| headers.get(name), now);
            }
            if quota {
                self.attempt.headroom = headroom(|name| headers.get(name), now);
            }
        }
        // An error answer is judged by its status: told now, the
        // capabilities learn it before the router's retry is under way
        // (Envoy ends this context only with the whole request, after the
        // retry has been served).
        if status.is_some_and(|s| s == 429 || s >= 500) {
            self.attempt.first_byte.get_or_insert(now);
            self.finish();
            return Action::Continue;
        }
        if end_of_stream {
            self.ended = true;
            self.attempt.first_byte.get_or_insert(now);
            return Action::Continue;
        }
        // Only a success is held: an error answer is the router's to judge
        // (and retry) at once.
        if self.hold && status.is_some_and(|s| (200..300).contains(&s)) {
            self.holding = true;
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.ended |= end_of_stream;
        if body_size > 0 && self.attempt.first_byte.is_none() {
            self.attempt.first_byte = Some(host::now());
        }
        if self.holding && (body_size > 0 || end_of_stream) {
            // The first token (or the end): headers and this chunk go on
            // together, and the router's per-try timer stops.
            self.holding = false;
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.ended = true;
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}
