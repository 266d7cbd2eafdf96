//! Rate-limit response headers: OpenAI's `x-ratelimit-*`, Anthropic's
//! `anthropic-ratelimit-*`, and the IETF draft's `RateLimit` /
//! `RateLimit-Policy`.
//!
//! Anthropic sends `anthropic-ratelimit-{requests,tokens,input-tokens,
//! output-tokens}-{limit,remaining,reset}`, the reset as an RFC 3339
//! instant. sluice limits input and output tokens together, so the
//! `input-tokens` and `output-tokens` headers carry the combined limit: each
//! kind alone can use no more than it.
//!
//! OpenAI sends, for the limit closest to exhaustion, `x-ratelimit-limit-*`
//! (the limit), `x-ratelimit-remaining-*` (what is left) and
//! `x-ratelimit-reset-*` (time until the limit is back to its initial state,
//! as a Go-style duration: `6m0s`, `1s`, `20ms`, `3.89s`), for `tokens` and
//! for `requests`.
//!
//! draft-ietf-httpapi-ratelimit-headers-11 (May 2026) defines
//! `RateLimit-Policy: "name";q=<quota>;w=<window s>[;qu=<unit>]` and
//! `RateLimit: "name";r=<remaining>;t=<seconds>`, both Structured Field
//! lists with string item names. sluice names a policy by what it counts and
//! its window (`"tokens-1m"`, `"tokens-1d"`, `"requests-1m"`) and marks token
//! policies `qu="tokens"`: the draft's registry has only `requests`,
//! `content-bytes` and `concurrent-requests`, and without a unit a client
//! would read a token quota as requests.

use std::fmt::Write;
use std::time::Duration;

use crate::config::Api;
use crate::time::Timestamp;
use crate::units::HumanDuration;

/// One limit's state as a client should see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    /// The limit per window (tokens or requests).
    pub limit: u64,
    /// The limit's period.
    pub window: Duration,
    /// What can be taken now (0 when in debt).
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// Every limit of a quota, right after a decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Token limits, in the quota's order.
    pub tokens: Vec<LimitStatus>,
    pub requests: Option<LimitStatus>,
}

impl QuotaStatus {
    /// The token limit closest to exhaustion: the least remaining, then the
    /// longest reset.
    pub fn binding_tokens(&self) -> Option<&LimitStatus> {
        self.tokens
            .iter()
            .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
    }

    /// Response headers for this status; `retry_after` adds `retry-after`
    /// (whole seconds, rounded up) to a rejection; `ietf` adds `ratelimit`
    /// and `ratelimit-policy`. Header names are lowercase, as HTTP/2 needs.
    pub fn headers(
        &self,
        retry_after: Option<Duration>,
        ietf: bool,
    ) -> Vec<(&'static str, String)> {
        self.headers_for(Api::Openai, Timestamp::ZERO, retry_after, ietf)
    }

    /// [`QuotaStatus::headers`] in the shape `api`'s clients read; `now`
    /// dates Anthropic's reset instants.
    pub fn headers_for(
        &self,
        api: Api,
        now: Timestamp,
        retry_after: Option<Duration>,
        ietf: bool,
    ) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(16);
        match api {
            Api::Openai => {
                if let Some(t) = self.binding_tokens() {
                    out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
                    out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
                    out.push(("x-ratelimit-reset-tokens", go_duration(t.reset)));
                }
                if let Some(r) = &self.requests {
                    out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
                    out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
                    out.push(("x-ratelimit-reset-requests", go_duration(r.reset)));
                }
            }
            Api::Anthropic => {
                if let Some(r) = &self.requests {
                    out.push(("anthropic-ratelimit-requests-limit", r.limit.to_string()));
                    out.push((
                        "anthropic-ratelimit-requests-remaining",
                        r.remaining.to_string(),
                    ));
                    out.push((
                        "anthropic-ratelimit-requests-reset",
                        (now + r.reset).rfc3339(),
                    ));
                }
                if let Some(t) = self.binding_tokens() {
                    let reset = (now + t.reset).rfc3339();
                    for [limit, remaining, at] in [
                        [
                            "anthropic-ratelimit-tokens-limit",
                            "anthropic-ratelimit-tokens-remaining",
                            "anthropic-ratelimit-tokens-reset",
                        ],
                        [
                            "anthropic-ratelimit-input-tokens-limit",
                            "anthropic-ratelimit-input-tokens-remaining",
                            "anthropic-ratelimit-input-tokens-reset",
                        ],
                        [
                            "anthropic-ratelimit-output-tokens-limit",
                            "anthropic-ratelimit-output-tokens-remaining",
                            "anthropic-ratelimit-output-tokens-reset",
                        ],
                    ] {
                        out.push((limit, t.limit.to_string()));
                        out.push((remaining, t.remaining.to_string()));
                        out.push((at, reset.clone()));
                    }
                }
            }
        }
        if let Some(wait) = retry_after {
            out.push(("retry-after", ceil_secs(wait).max(1).to_string()));
        }
        if ietf && (!self.tokens.is_empty() || self.requests.is_some()) {
            let mut policy = String::new();
            let mut current = String::new();
            let all = self
                .tokens
                .iter()
                .map(|s| ("tokens", s))
                .chain(self.requests.iter().map(|s| ("requests", s)));
            for (unit, s) in all {
                let sep = if policy.is_empty() { "" } else { ", " };
                let name = HumanDuration(s.window);
                let _ = write!(
                    policy,
                    "{sep}\"{unit}-{name}\";q={};w={}",
                    s.limit,
                    ceil_secs(s.window).max(1)
                );
                if unit == "tokens" {
                    policy.push_str(";qu=\"tokens\"");
                }
                let _ = write!(
                    current,
                    "{sep}\"{unit}-{name}\";r={};t={}",
                    s.remaining,
                    ceil_secs(s.reset)
                );
            }
            out.push(("ratelimit-policy", policy));
            out.push(("ratelimit", current));
        }
        out
    }
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A duration as Go prints it, to the millisecond (rounded up, so a client
/// waiting this long is never early): `0s`, `20ms`, `1s`, `1.5s`, `6m0s`,
/// `1h2m3.5s`.
pub fn go_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h{m}m");
    } else if m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{s}");
    if frac > 0 {
        let digits = format!("{frac:03}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(go_duration(ms(20)), "20ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(3890)), "3.89s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(3_723_500)), "1h2m3.5s");
        assert_eq!(go_duration(ms(7_200_000)), "2h0m0s");
        assert!(go_duration(Duration::MAX).ends_with('s'));
    }

    #[test]
    fn headers_for_a_quota() {
        let status = QuotaStatus {
            tokens: vec![
                LimitStatus {
                    limit: 200_000,
                    window: Duration::from_secs(60),
                    remaining: 150_000,
                    reset: Duration::from_secs(15),
                },
                LimitStatus {
                    limit: 5_000_000,
                    window: Duration::from_secs(86_400),
                    remaining: 100_000,
                    reset: Duration::from_secs(83_000),
                },
            ],
            requests: Some(LimitStatus {
                limit: 600,
                window: Duration::from_secs(60),
                remaining: 599,
                reset: Duration::from_millis(100),
            }),
        };
        let h = status.headers(Some(Duration::from_millis(1200)), true);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ratelimit-limit-tokens"), Some("5000000"));
        assert_eq!(get("x-ratelimit-remaining-tokens"), Some("100000"));
        assert_eq!(get("x-ratelimit-reset-tokens"), Some("23h3m20s"));
        assert_eq!(get("x-ratelimit-remaining-requests"), Some("599"));
        assert_eq!(get("x-ratelimit-reset-requests"), Some("100ms"));
        assert_eq!(get("retry-after"), Some("2"));
        assert_eq!(
            get("ratelimit-policy"),
            Some(
                "\"tokens-1m\";q=200000;w=60;qu=\"tokens\", \"tokens-1d\";q=5000000;w=86400;qu=\"tokens\", \"requests-1m\";q=600;w=60"
            )
        );
        assert_eq!(
            get("ratelimit"),
            Some(
                "\"tokens-1m\";r=150000;t=15, \"tokens-1d\";r=100000;t=83000, \"requests-1m\";r=599;t=1"
            )
        );
        assert!(
            status
                .headers(None, false)
                .iter()
                .all(|(k, _)| !k.starts_with("ratelimit") && *k != "retry-after")
        );
    }
}
