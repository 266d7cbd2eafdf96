//! Provider quotas: a fixed window of requests and tokens, and the
//! rate-limit headers hosted providers send with every answer.
//!
//! A hosted LLM API meters each account (per region, per model class) and
//! says where it stands on every answer: OpenAI with
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (the reset a
//! Go-style duration, `1s`, `6m0s`, `20ms`), Anthropic with
//! `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (the
//! reset an RFC 3339 instant). Once the quota is spent the answer is a 429
//! carrying the same headers, remaining 0. A gateway that fails over between
//! zones can read the remaining share falling and move traffic before the
//! first refusal; this module lets a drill show whether it does.
//!
//! The window is fixed, not the providers' continuously refilled bucket:
//! N requests (and/or T tokens) per W seconds, counted from the moment the
//! fault set was applied, each reset naming the current window's end. A
//! drill can then say exactly when refusals start and stop. A request is
//! charged when it is admitted (after the model check, before the capacity
//! limit and the fault draw), one request and its prompt tokens plus the
//! completion tokens it is going to produce; a refused request is not
//! charged. The window may start partly used (`quota_requests_used`,
//! `quota_tokens_used`), so a drill can begin near exhaustion without first
//! spending the quota.
//!
//! Time is passed in (`now`), so the window is tested without sleeping.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use crate::api::{Flavor, anthropic, openai};

/// What a quota allows per window, and what the first window starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Requests per window, if requests are limited.
    pub requests: Option<NonZeroU64>,
    /// Tokens (prompt and completion) per window, if tokens are limited.
    pub tokens: Option<NonZeroU64>,
    /// Length of a window (at least 1 s: the fault set's `quota_window_s`).
    pub window: Duration,
    /// Requests already used in the first window.
    pub requests_used: u64,
    /// Tokens already used in the first window.
    pub tokens_used: u64,
}

/// One limit as an answer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The limit per window.
    pub limit: u64,
    /// What is left of it in the current window.
    pub remaining: u64,
}

/// Where the quota stands, as of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    /// The request limit, if any.
    pub requests: Option<Usage>,
    /// The token limit, if any.
    pub tokens: Option<Usage>,
    /// When the current window ends (and both limits are back to full).
    pub window_end: Instant,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// No request left in the window.
    Requests,
    /// Fewer tokens left than the request needs.
    Tokens,
}

impl Exhausted {
    /// The limit's name in providers' messages and headers.
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// A quota's fixed windows and what has been used of the current one.
#[derive(Debug, Clone)]
pub struct Quota {
    limits: QuotaLimits,
    /// Start of the first window.
    epoch: Instant,
    /// Index of the window the counts belong to (0 = the first).
    window: u64,
    requests_used: u64,
    tokens_used: u64,
}

impl Quota {
    /// A quota whose first window starts at `now`, used as `limits` says.
    pub fn new(limits: QuotaLimits, now: Instant) -> Self {
        Self {
            limits,
            epoch: now,
            window: 0,
            requests_used: limits.requests_used,
            tokens_used: limits.tokens_used,
        }
    }

    /// The window `now` falls in; time before the epoch counts as the first.
    fn window_of(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        let window = self.limits.window.as_nanos().max(1);
        u64::try_from(elapsed / window).unwrap_or(u64::MAX)
    }

    /// Starts a new window, with nothing used, once `now` has left the current one.
    fn roll(&mut self, now: Instant) {
        let window = self.window_of(now);
        if window > self.window {
            self.window = window;
            self.requests_used = 0;
            self.tokens_used = 0;
        }
    }

    /// Where the quota stands at `now`, without charging anything.
    pub fn status(&mut self, now: Instant) -> QuotaStatus {
        self.roll(now);
        let usage = |limit: Option<NonZeroU64>, used: u64| {
            limit.map(|l| Usage {
                limit: l.get(),
                remaining: l.get().saturating_sub(used),
            })
        };
        let end = u32::try_from(self.window.saturating_add(1))
            .ok()
            .and_then(|n| self.limits.window.checked_mul(n))
            .and_then(|d| self.epoch.checked_add(d))
            .unwrap_or(now);
        QuotaStatus {
            requests: usage(self.limits.requests, self.requests_used),
            tokens: usage(self.limits.tokens, self.tokens_used),
            window_end: end,
        }
    }

    /// Charges one request of `tokens` tokens at `now` if both limits allow
    /// it; the status after the charge, or the limit that refused it with
    /// the status (nothing charged).
    pub fn admit(
        &mut self,
        now: Instant,
        tokens: u64,
    ) -> Result<QuotaStatus, (Exhausted, QuotaStatus)> {
        let before = self.status(now);
        if before.requests.is_some_and(|r| r.remaining == 0) {
            return Err((Exhausted::Requests, before));
        }
        if before.tokens.is_some_and(|t| t.remaining < tokens) {
            return Err((Exhausted::Tokens, before));
        }
        self.requests_used = self.requests_used.saturating_add(1);
        self.tokens_used = self.tokens_used.saturating_add(tokens);
        Ok(self.status(now))
    }
}

impl QuotaStatus {
    /// Time from `now` to the window's end.
    pub fn reset(&self, now: Instant) -> Duration {
        self.window_end.saturating_duration_since(now)
    }

    /// The provider's rate-limit headers for an answer in `flavor`'s API,
    /// at `now` (monotonic, for the reset) and `wall` (time since the Unix
    /// epoch, for Anthropic's reset instant).
    ///
    /// OpenAI: `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`,
    /// `x-ratelimit-reset-*` (time until the window ends, to the
    /// millisecond, rounded up). Anthropic: `anthropic-ratelimit-*-limit`,
    /// `-remaining`, `-reset` (the window's end, to the second, rounded up);
    /// tokens as the combined `tokens` family, not the input/output split.
    pub fn headers(
        &self,
        flavor: Flavor,
        now: Instant,
        wall: Duration,
    ) -> Vec<(&'static str, String)> {
        let reset = self.reset(now);
        let (names, reset) = match flavor {
            Flavor::OpenAi => (&OPENAI_HEADERS, openai::go_duration(reset)),
            Flavor::Anthropic => {
                let end_ms = wall
                    .as_millis()
                    .saturating_add(reset.as_nanos().div_ceil(1_000_000));
                let end_s = u64::try_from(end_ms.div_ceil(1000)).unwrap_or(u64::MAX);
                (&ANTHROPIC_HEADERS, anthropic::reset_instant(end_s, 0))
            }
        };
        let mut out = Vec::new();
        for (usage, [limit, remaining, reset_name]) in
            [self.requests, self.tokens].into_iter().zip(names)
        {
            if let Some(u) = usage {
                out.push((*limit, u.limit.to_string()));
                out.push((*remaining, u.remaining.to_string()));
                out.push((*reset_name, reset.clone()));
            }
        }
        out
    }
}

/// OpenAI's limit, remaining and reset headers: requests, then tokens.
const OPENAI_HEADERS: [[&str; 3]; 2] = [
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ],
    [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ],
];

/// Anthropic's limit, remaining and reset headers: requests, then tokens.
const ANTHROPIC_HEADERS: [[&str; 3]; 2] = [
    [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ],
];

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: u64, tokens: u64, window_s: u64) -> QuotaLimits {
        QuotaLimits {
            requests: NonZeroU64::new(requests),
            tokens: NonZeroU64::new(tokens),
            window: Duration::from_secs(window_s),
            requests_used: 0,
            tokens_used: 0,
        }
    }

    #[test]
    fn a_window_of_n_requests_refuses_the_next_until_it_ends() {
        let t0 = Instant::now();
        let mut q = Quota::new(limits(3, 0, 10), t0);
        for left in [2, 1, 0] {
            let s = q.admit(t0 + Duration::from_secs(1), 7).unwrap();
            assert_eq!(
                s.requests,
                Some(Usage {
                    limit: 3,
                    remaining: left
                })
            );
            assert_eq!(s.tokens, None);
            assert_eq!(s.window_end, t0 + Duration::from_secs(10));
        }
        let (which, s) = q.admit(t0 + Duration::from_millis(9_999), 1).unwrap_err();
        assert_eq!(which, Exhausted::Requests);
        assert_eq!(s.requests.unwrap().remaining, 0);
        assert_eq!(
            s.reset(t0 + Duration::from_millis(9_999)),
            Duration::from_millis(1)
        );
        // The next window starts full and ends a window later.
        let s = q.admit(t0 + Duration::from_secs(10), 1).unwrap();
        assert_eq!(s.requests.unwrap().remaining, 2);
        assert_eq!(s.window_end, t0 + Duration::from_secs(20));
        // Windows that passed unused are skipped, not replayed.
        let s = q.status(t0 + Duration::from_secs(95));
        assert_eq!(s.requests.unwrap().remaining, 3);
        assert_eq!(s.window_end, t0 + Duration::from_secs(100));
    }

    #[test]
    fn tokens_are_charged_whole_and_a_request_that_does_not_fit_is_refused() {
        let t0 = Instant::now();
        let mut q = Quota::new(limits(0, 100, 60), t0);
        assert_eq!(q.admit(t0, 60).unwrap().tokens.unwrap().remaining, 40);
        let (which, s) = q.admit(t0, 41).unwrap_err();
        assert_eq!(which, Exhausted::Tokens);
        assert_eq!(s.tokens.unwrap().remaining, 40, "a refusal charges nothing");
        assert_eq!(q.admit(t0, 40).unwrap().tokens.unwrap().remaining, 0);
        assert!(
            q.admit(t0, 0).is_ok(),
            "no request limit, nothing left to take"
        );
    }

    #[test]
    fn the_first_window_may_start_partly_used() {
        let t0 = Instant::now();
        let mut q = Quota::new(
            QuotaLimits {
                requests_used: 9,
                tokens_used: 500,
                ..limits(10, 1000, 1)
            },
            t0,
        );
        let s = q.admit(t0, 100).unwrap();
        assert_eq!(s.requests.unwrap().remaining, 0);
        assert_eq!(s.tokens.unwrap().remaining, 400);
        assert_eq!(q.admit(t0, 1).unwrap_err().0, Exhausted::Requests);
        let s = q.status(t0 + Duration::from_secs(1));
        assert_eq!(s.requests.unwrap().remaining, 10);
        assert_eq!(s.tokens.unwrap().remaining, 1000);
    }

    #[test]
    fn time_before_the_epoch_is_the_first_window() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut q = Quota::new(limits(1, 0, 2), t0);
        let s = q.status(t0 - Duration::from_secs(1));
        assert_eq!(s.window_end, t0 + Duration::from_secs(2));
        assert_eq!(s.reset(t0 - Duration::from_secs(1)), Duration::from_secs(3));
    }

    fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn openai_headers_name_both_limits_and_the_time_to_the_window_end() {
        let t0 = Instant::now();
        let mut q = Quota::new(limits(100, 5000, 60), t0);
        let s = q.admit(t0, 30).unwrap();
        let h = s.headers(
            Flavor::OpenAi,
            t0 + Duration::from_millis(1500),
            Duration::ZERO,
        );
        assert_eq!(h.len(), 6);
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("100"));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("99"));
        assert_eq!(header(&h, "x-ratelimit-reset-requests"), Some("58.5s"));
        assert_eq!(header(&h, "x-ratelimit-limit-tokens"), Some("5000"));
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("4970"));
        assert_eq!(header(&h, "x-ratelimit-reset-tokens"), Some("58.5s"));
        // Only the limits that are set.
        let mut q = Quota::new(limits(5, 0, 60), t0);
        let h = q.status(t0).headers(Flavor::OpenAi, t0, Duration::ZERO);
        assert_eq!(h.len(), 3);
        assert_eq!(header(&h, "x-ratelimit-reset-requests"), Some("1m0s"));
        assert_eq!(header(&h, "x-ratelimit-limit-tokens"), None);
    }

    #[test]
    fn anthropic_headers_name_the_window_end_as_an_instant() {
        let t0 = Instant::now();
        let mut q = Quota::new(limits(50, 1000, 60), t0);
        let s = q.admit(t0, 10).unwrap();
        // Wall clock 2026-11-29T19:02:39.250Z, 0.5 s into the window: it
        // ends 59.5 s later, at 19:03:38.750, written as the next second.
        let wall = Duration::from_millis(1_795_978_959_250);
        let h = s.headers(Flavor::Anthropic, t0 + Duration::from_millis(500), wall);
        assert_eq!(h.len(), 6);
        assert_eq!(header(&h, "anthropic-ratelimit-requests-limit"), Some("50"));
        assert_eq!(
            header(&h, "anthropic-ratelimit-requests-remaining"),
            Some("49")
        );
        assert_eq!(
            header(&h, "anthropic-ratelimit-requests-reset"),
            Some("2026-11-29T19:03:39Z")
        );
        assert_eq!(
            header(&h, "anthropic-ratelimit-tokens-remaining"),
            Some("990")
        );
        assert_eq!(
            header(&h, "anthropic-ratelimit-tokens-reset"),
            Some("2026-11-29T19:03:39Z")
        );
        assert!(h.iter().all(|(n, _)| !n.starts_with("x-ratelimit")));
    }
}
