//! `[tokens]` and `[[tokens.quota]]`: token-aware rate limits.
//!
//! Besides ranges, a quota must be satisfiable: every token limit and burst
//! must hold the largest completion a request may reserve, which needs the
//! section's `default_max_tokens`, so that check runs once the whole
//! section is compiled.
//!
//! A rule's optional `name` is its identity in shared state (see
//! `Quota::identity`), so each name may be used once.

use std::time::Duration;

use sluice_core::config::{self as cfg, Pattern, Policy, Quota, TokensConfig};
use sluice_core::units::{ByteSize, HumanDuration, Rate};

use super::{CompileError, Compiler, loc_of, or};
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw::{self, Document};

impl Compiler {
    pub(super) fn tokens(&mut self, raw: &raw::Tokens) -> TokensConfig {
        let l = &raw.loc;
        let chars_per_token = self.chars_per_token(
            or(&raw.chars_per_token, dflt::CHARS_PER_TOKEN),
            &loc_of(&raw.chars_per_token, l),
        );
        let model_chars_per_token = raw
            .model_chars_per_token
            .as_ref()
            .map(|m| {
                m.value
                    .0
                    .iter()
                    .map(|(p, r)| {
                        (
                            Pattern::new(p.value.clone()),
                            self.chars_per_token(r.value, &r.loc),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let default_max_tokens = self.nonzero(
            &raw.default_max_tokens,
            "default_max_tokens",
            dflt::DEFAULT_MAX_TOKENS,
            l,
        );
        let max_body = or(&raw.max_body, ByteSize(dflt::MAX_BODY));
        if max_body.0 < 1024 || max_body.0 > 64 << 20 {
            self.out_of_range(
                "max_body",
                "between 1KiB and 64MiB",
                max_body,
                &loc_of(&raw.max_body, l),
            );
        }
        let mut quotas: Vec<Quota> = Vec::new();
        for q in raw.quota.iter().flat_map(|q| &q.value) {
            let quota = self.quota(q, &quotas);
            quotas.push(quota);
        }
        TokensConfig {
            chars_per_token,
            model_chars_per_token,
            default_max_tokens,
            max_body,
            on_large_body: match or(&raw.on_large_body, raw::LargeBody::Reject) {
                raw::LargeBody::Reject => cfg::LargeBody::Reject,
                raw::LargeBody::Estimate => cfg::LargeBody::Estimate,
            },
            include_usage: or(&raw.include_usage, true),
            ietf_headers: or(&raw.ietf_headers, false),
            max_keys: self.nonzero(&raw.max_keys, "max_keys", dflt::MAX_KEYS, l),
            on_state_error: match or(&raw.on_state_error, dflt::ON_STATE_ERROR) {
                raw::OnStateError::Deny => cfg::StateErrorPolicy::Deny,
                raw::OnStateError::Allow => cfg::StateErrorPolicy::Allow,
            },
            quotas,
        }
    }

    fn chars_per_token(&mut self, value: f64, loc: &Loc) -> f64 {
        if !(0.5..=20.0).contains(&value) {
            self.out_of_range("chars_per_token", "between 0.5 and 20", value, loc);
            return dflt::CHARS_PER_TOKEN;
        }
        value
    }

    /// One rule; `before` are the rules above it, whose names it may not reuse.
    fn quota(&mut self, raw: &raw::Quota, before: &[Quota]) -> Quota {
        let l = &raw.loc;
        let name = raw.name.as_ref().map(|n| {
            self.check_name("quota", &n.value, &n.loc);
            if before.iter().any(|q| q.name.as_ref() == Some(&n.value)) {
                self.push(CompileError::Duplicate {
                    what: "quota",
                    name: n.value.clone(),
                    loc: n.loc.clone(),
                });
            }
            n.value.clone()
        });
        let tokens: Vec<Rate> = raw
            .tokens
            .as_ref()
            .map(|t| t.value.iter().map(|r| r.value).collect())
            .unwrap_or_default();
        let mut periods: Vec<Duration> = Vec::new();
        for r in raw.tokens.iter().flat_map(|t| &t.value) {
            if periods.contains(&r.value.period) {
                self.invalid(
                    &r.loc,
                    format!(
                        "two token limits over the same period ({})",
                        HumanDuration(r.value.period)
                    ),
                    Some("keep one limit per period"),
                );
            }
            periods.push(r.value.period);
        }
        let max_completion_tokens = raw
            .max_completion_tokens
            .as_ref()
            .map(|_| self.nonzero(&raw.max_completion_tokens, "max_completion_tokens", 1, l));
        let concurrent_streams = raw
            .concurrent_streams
            .as_ref()
            .map(|_| self.nonzero(&raw.concurrent_streams, "concurrent_streams", 1, l));
        if tokens.is_empty() && raw.requests.is_none() && concurrent_streams.is_none() {
            self.invalid(
                l,
                "this quota limits nothing",
                Some("set `tokens`, `requests` or `concurrent_streams`"),
            );
        }
        Quota {
            name,
            matcher: self.matcher(raw.matcher.as_ref().map(|m| &m.value)),
            tokens,
            requests: raw.requests.as_ref().map(|r| r.value),
            concurrent_streams,
            max_completion_tokens,
            over_cap: match or(&raw.over_cap, raw::OverCap::Reject) {
                raw::OverCap::Reject => cfg::OverCap::Reject,
                raw::OverCap::Clamp => cfg::OverCap::Clamp,
            },
            burst: raw.burst.as_ref().map(|b| b.value.0),
        }
    }

    /// Every token limit and burst must hold the largest completion a request
    /// may reserve, or such requests could never be admitted.
    pub(super) fn check_quota_caps(&mut self, doc: &Document, policy: &Policy) {
        let (Some(raw), Some(tokens)) = (&doc.tokens, &policy.tokens) else {
            return;
        };
        let raws = raw
            .value
            .quota
            .as_ref()
            .map(|q| q.value.as_slice())
            .unwrap_or_default();
        for (q, rq) in tokens.quotas.iter().zip(raws) {
            let cap = u64::from(
                q.max_completion_tokens
                    .unwrap_or(tokens.default_max_tokens)
                    .get(),
            );
            if let (Some(burst), Some(b)) = (q.burst, &rq.burst)
                && burst < cap
            {
                self.push(CompileError::BelowCompletionCap {
                    key: "burst",
                    found: burst,
                    cap,
                    loc: b.loc.clone(),
                });
            }
            for r in rq.tokens.iter().flat_map(|t| &t.value) {
                if r.value.amount < cap {
                    self.push(CompileError::BelowCompletionCap {
                        key: "tokens",
                        found: r.value.amount,
                        cap,
                        loc: r.loc.clone(),
                    });
                }
            }
        }
    }
}
