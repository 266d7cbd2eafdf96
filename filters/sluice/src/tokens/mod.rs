//! Token-aware rate limiting (`[tokens]`): the engine's hooks over
//! `sluice_core::tokens`, whose module docs explain the algorithm and its
//! overshoot bound.
//!
//! - **admit**: the request's cost (estimated prompt + completion cap, from
//!   the engine's one body parse) is reserved in the tenant × model buckets
//!   of the first matching quota rule, in shared data; a request that does
//!   not fit is answered 429 in the client's API shape before the upstream
//!   is called, a malformed one 400, an oversized one 413 (or estimated
//!   from its length). OpenAI streams get `stream_options.include_usage`.
//! - **response headers**: the reservation's rate-limit headers;
//! - **done** (also after resets, and after a later capability turned the
//!   request away): the usage the engine read from the response is settled
//!   against the reservation, and the stream slot freed.

mod metrics;
mod slots;

use std::rc::Rc;

use log::{debug, warn};
use sluice_core::config::{LargeBody, Policy, StateErrorPolicy, TokensConfig};
use sluice_core::llm::{
    ErrorKind, LocalReply, RequestInfo, UsageFallback, UsageSource, chars_per_token_for,
};
use sluice_core::time::Timestamp;
use sluice_core::tokens::{Decision, KeyId, Limiter, Plan, QuotaStatus, Ticket};
use sluice_filter_common::engine::{
    Admission, Admitted, BodyRead, Capability, Flow, Observation, Verdict,
};

use metrics::{Labels, Metrics};
use slots::{Held, Place, Region, SlotError, Slots};

/// Slots reserved per tenant the policy names (its models' keys).
const NAMED_SLOTS_PER_TENANT: u32 = 16;

/// Response header saying sluice's token limiter answered.
const LIMITED_HEADER: &str = "x-sluice-limited";

/// The `[tokens]` capability of one policy.
pub struct Tokens {
    inner: Rc<Inner>,
}

/// What the capability and its flows share.
struct Inner {
    tokens: TokensConfig,
    limiter: Limiter,
    metrics: Metrics,
    slots: Slots,
    /// Tenants some rule names exactly: their keys have slots of their own.
    named: Vec<String>,
}

impl Tokens {
    /// The capability, if the policy enables `[tokens]`.
    pub fn from_policy(policy: &Policy) -> Option<Self> {
        let tokens = policy.tokens.clone()?;
        let mut named: Vec<String> = tokens
            .quotas
            .iter()
            .flat_map(|q| q.matcher.tenants.iter())
            .filter(|p| !p.as_str().ends_with('*'))
            .map(|p| p.as_str().to_string())
            .collect();
        named.sort();
        named.dedup();
        let named_slots = u32::try_from(named.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(NAMED_SLOTS_PER_TENANT);
        Some(Tokens {
            inner: Rc::new(Inner {
                limiter: Limiter::new(&tokens),
                metrics: Metrics::define(&tokens),
                slots: Slots::new(tokens.max_keys.get(), named_slots),
                tokens,
                named,
            }),
        })
    }
}

impl Capability for Tokens {
    fn name(&self) -> &'static str {
        "tokens"
    }

    fn reads_usage(&self) -> bool {
        true
    }

    fn reads_prompt(&self) -> bool {
        true
    }

    fn admit(&self, admission: &mut Admission<'_>) -> Admitted {
        let inner = &self.inner;
        let request = admission.request;
        let cfg = &inner.tokens;
        let mut info = match &request.body {
            BodyRead::Read { info, .. } => info.clone(),
            BodyRead::TooLarge { length } => match cfg.on_large_body {
                LargeBody::Reject => {
                    inner.metrics.too_large.inc();
                    let message = format!(
                        "request body of {length} bytes is larger than the {} this gateway inspects",
                        cfg.max_body
                    );
                    return reply(LocalReply::error(
                        request.api,
                        ErrorKind::TooLarge,
                        &message,
                        [(LIMITED_HEADER, "tokens".to_string())],
                    ));
                }
                LargeBody::Estimate => RequestInfo::from_length(&request.path, *length, cfg),
            },
        };
        if matches!(request.body, BodyRead::Read { .. }) {
            info.prompt_tokens = info.prompt_tokens_for(cfg, &request.model);
        }
        let Some(quota) = inner.limiter.quota_for(
            &request.path,
            &request.authority,
            &request.model,
            &request.tenant,
        ) else {
            return Admitted::pass();
        };
        let (reservation, rewrite) = match inner.limiter.plan(quota, &info) {
            Plan::Forward {
                reservation,
                rewrite,
            } => (reservation, rewrite),
            Plan::Reject { kind, message } => {
                inner.metrics.invalid.inc();
                return reply(LocalReply::error(
                    request.api,
                    kind,
                    &message,
                    [(LIMITED_HEADER, "tokens".to_string())],
                ));
            }
        };
        let now = admission.now;
        let rule = inner.limiter.identity(quota);
        let key = KeyId::new(rule, &request.tenant, &request.model);
        let region = if inner.named.binary_search(&request.tenant).is_ok() {
            Region::Named
        } else {
            Region::Open
        };
        let outcome = inner.slots.update(key, rule, region, now, |state| {
            inner.limiter.reserve(state, now, quota, &reservation)
        });
        let (held, decision) = match outcome {
            Ok(done) => done,
            Err(e) => return state_error(cfg, &inner.metrics, &e, request.api),
        };
        if matches!(held.place, Place::Overflow(_)) {
            inner.metrics.overflowed.inc();
        }
        let labels = inner.metrics.labels(&request.tenant, &request.model);
        match decision {
            Decision::Rejected(rejection) => {
                labels.rejected.inc();
                let mut headers = inner.limiter.headers_for(
                    request.api,
                    now,
                    &rejection.status,
                    rejection.retry_after,
                );
                headers.push((LIMITED_HEADER, "tokens".to_string()));
                let message = rejection.message(&request.model);
                reply(LocalReply::error(
                    request.api,
                    rejection.error_kind(),
                    &message,
                    headers,
                ))
            }
            Decision::Admitted { ticket, status } => {
                labels.admitted.inc();
                labels.reserved.add(ticket.reserved);
                if request.bytes().is_some() {
                    admission.edits.rewrite = rewrite;
                }
                // A compressed answer cannot be read for its usage: ask the
                // upstream for none (Envoy's compressor filter, before sluice
                // in the chain, still compresses for a client that asked).
                admission
                    .edits
                    .request_headers
                    .push(("accept-encoding".to_string(), None));
                Admitted {
                    verdict: Verdict::Go,
                    flow: Some(Box::new(TokensFlow {
                        inner: Rc::clone(&self.inner),
                        held,
                        ticket,
                        status,
                        api: request.api,
                        admitted_at: now,
                        tenant: request.tenant.clone(),
                        model: request.model.clone(),
                        prompt_tokens: reservation.prompt_tokens,
                        labels,
                        settled: false,
                    })),
                }
            }
        }
    }
}

fn reply(reply: LocalReply) -> Admitted {
    Admitted {
        verdict: Verdict::Reply(reply),
        flow: None,
    }
}

/// Shared data failed us (a host error, or other workers kept winning the
/// compare-and-swap on this key): `on_state_error` says whether the request
/// is refused (503, the default: contention is no reason to admit without
/// limit) or goes on unlimited. A metric counts it either way.
fn state_error(
    cfg: &TokensConfig,
    metrics: &Metrics,
    e: &SlotError,
    api: sluice_core::config::Api,
) -> Admitted {
    metrics.state_errors.inc();
    match cfg.on_state_error {
        StateErrorPolicy::Allow => {
            warn!("sluice tokens: quota state unavailable ({e}); request forwarded unlimited");
            Admitted::pass()
        }
        StateErrorPolicy::Deny => {
            warn!("sluice tokens: quota state unavailable ({e}); request refused");
            reply(LocalReply::error(
                api,
                ErrorKind::Unavailable {
                    code: "quota-state-unavailable",
                },
                "sluice: the quota state is unavailable; retry shortly",
                [
                    ("retry-after", "1".to_string()),
                    (LIMITED_HEADER, "tokens".to_string()),
                ],
            ))
        }
    }
}

/// A request admitted under a quota, until it is settled.
struct TokensFlow {
    inner: Rc<Inner>,
    /// Where its reservation was made (its slot, or the rule's overflow).
    held: Held,
    ticket: Ticket,
    status: QuotaStatus,
    /// The client's API (the shape of the rate-limit headers).
    api: sluice_core::config::Api,
    admitted_at: Timestamp,
    tenant: String,
    model: String,
    prompt_tokens: u64,
    /// The tenant × model counters, looked up once at admission.
    labels: Labels,
    settled: bool,
}

impl Flow for TokensFlow {
    fn response_headers(
        &mut self,
        _observation: &Observation,
        add: &mut Vec<(&'static str, String)>,
    ) {
        add.extend(
            self.inner
                .limiter
                .headers_for(self.api, self.admitted_at, &self.status, None),
        );
    }

    fn done(&mut self, observation: &mut Observation, now: Timestamp) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let inner = Rc::clone(&self.inner);
        let report = observation.take_usage().map(|parser| {
            parser.finish(&UsageFallback {
                prompt_tokens: self.prompt_tokens,
                chars_per_token: chars_per_token_for(&inner.tokens, &self.model),
            })
        });
        // An upstream that failed (or never answered) generated nothing that
        // can be measured: charge what it reported, else nothing beyond the
        // prompt it was sent.
        let succeeded = observation.succeeded();
        let actual = match &report {
            Some(r) if succeeded || r.source != UsageSource::Estimated => r.usage.total_tokens,
            // Compressed although sluice asked for no encoding: the usage is
            // unreadable, so the whole reservation stands.
            _ if observation.compressed && succeeded => self.ticket.reserved,
            _ => 0,
        };
        observation.settled_tokens = Some(actual);
        if observation.compressed {
            inner.metrics.compressed.inc();
        }
        if let Some(r) = &report {
            if r.clamped {
                inner.metrics.absurd_usage.inc();
            }
            if r.source == UsageSource::Estimated && succeeded {
                inner.metrics.estimated_usage.inc();
            }
            inner
                .metrics
                .framing_errors
                .add(u64::from(r.framing_errors));
        }
        let ticket = self.ticket;
        let result = inner.slots.update_held(self.held, |state| {
            inner.limiter.finish(state, now, &ticket, Some(actual))
        });
        // What the buckets keep for this request: the reservation, settled
        // to the real usage when the settlement landed.
        let billed = match &result {
            Ok(Some(Some(settled))) => ticket.reserved.saturating_add_signed(settled.delta),
            _ => ticket.reserved,
        };
        self.labels.billed.add(billed);
        match result {
            Ok(Some(Some(settled))) if settled.delta < 0 => {
                self.labels.refunded.add(settled.delta.unsigned_abs())
            }
            Ok(Some(Some(settled))) => self.labels.charged.add(settled.delta.unsigned_abs()),
            // Nothing to settle, or the key lost its slot meanwhile, which
            // only a key at rest does: nothing was owed.
            Ok(_) => {}
            Err(e) => {
                warn!(
                    "sluice tokens: could not settle a reservation ({e}); the bucket keeps the reservation"
                );
                inner.metrics.state_errors.inc();
            }
        }
        debug!(
            "sluice tokens: settled {} reserved {} used {actual}",
            self.tenant, ticket.reserved
        );
    }
}
