//! The limiter: from a parsed request to a reservation, a decision, and the
//! settlement once the real usage is known.

use std::fmt;
use std::time::Duration;

use super::bucket::{Gcra, Shortfall};
use super::headers::{LimitStatus, QuotaStatus, go_duration};
use super::state::KeyState;
use crate::config::{Match, OverCap, TokensConfig};
use crate::llm::{ApiShape, Cap, CapField, ErrorKind, RequestInfo, Rewrite};
use crate::time::Timestamp;
use crate::units::HumanDuration;

/// A key idle for this long has its stream count reset: a worker VM that
/// died (or was reloaded) never released its streams, and this is how such a
/// leak heals. Longer than any sane generation on a key that is otherwise
/// silent.
pub const STREAM_LEASE: Duration = Duration::from_secs(15 * 60);

/// The index of a quota in the policy's `[[tokens.quota]]` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuotaId(pub u32);

/// A quota's limits, ready to compute with.
#[derive(Clone, Debug)]
struct Limits {
    /// The rule's stable identity (`Quota::identity`): what its keys are
    /// made of, so a reload that moves the rule keeps its buckets.
    identity: u64,
    matcher: Match,
    tokens: Vec<Gcra>,
    requests: Option<Gcra>,
    streams: Option<u32>,
    max_completion: Option<u64>,
    over_cap: OverCap,
}

/// The token limiter for one policy: the quotas and the request rules.
#[derive(Clone, Debug)]
pub struct Limiter {
    quotas: Vec<Limits>,
    default_max_tokens: u64,
    include_usage: bool,
    ietf_headers: bool,
}

/// What a request reserves, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The prompt estimate.
    pub prompt_tokens: u64,
    /// The completion cap (the client's, clamped, or `default_max_tokens`).
    pub completion_tokens: u64,
}

impl Reservation {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// What to do with a request before any limit is consulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Reserve this much; apply `rewrite` to the body if it is not empty.
    Forward {
        reservation: Reservation,
        rewrite: Rewrite,
    },
    /// Answer at once: `kind.status()` with an [`error_body`](crate::llm::error_body).
    Reject { kind: ErrorKind, message: String },
}

/// A request admitted: what it holds until it is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub quota: QuotaId,
    /// Tokens reserved in every token bucket of the quota.
    pub reserved: u64,
    /// Whether it counts in the key's in-flight requests (to release at the
    /// end): every admission against a rule does.
    pub holds_stream: bool,
}

/// The outcome of [`Limiter::reserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward the request; keep the ticket for the settlement and send
    /// `status`'s headers with the response.
    Admitted { ticket: Ticket, status: QuotaStatus },
    /// Answer 429.
    Rejected(Rejection),
}

/// Which limit turned a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// A token limit; `window` is its period.
    Tokens {
        window: Duration,
        limit: u64,
    },
    Requests {
        window: Duration,
        limit: u64,
    },
    ConcurrentStreams {
        limit: u32,
    },
}

/// A request turned away, with what the 429 needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub limited: Limited,
    /// Tokens the request would have reserved.
    pub requested: u64,
    /// Tokens available under `limited` (negative: in debt); 0 for streams.
    pub available: i64,
    /// When enough will have refilled for this request; `None` when it never
    /// can (it asks for more than the bucket holds: shorten the prompt or
    /// the cap) or when it waits for a stream to end.
    pub retry_after: Option<Duration>,
    /// The quota's state (unchanged by the rejection), for the headers.
    pub status: QuotaStatus,
}

impl Rejection {
    /// The error to answer with.
    pub fn error_kind(&self) -> ErrorKind {
        match self.limited {
            Limited::Tokens { .. } => ErrorKind::RateLimitTokens,
            Limited::Requests { .. } => ErrorKind::RateLimitRequests,
            Limited::ConcurrentStreams { .. } => ErrorKind::ConcurrentStreams,
        }
    }

    /// An OpenAI-like message naming the model and the numbers.
    pub fn message(&self, model: &str) -> String {
        RejectionMessage {
            rejection: self,
            model,
        }
        .to_string()
    }
}

struct RejectionMessage<'a> {
    rejection: &'a Rejection,
    model: &'a str,
}

impl fmt::Display for RejectionMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.rejection;
        match r.limited {
            Limited::Tokens { window, limit } => {
                let what = if r.retry_after.is_none() {
                    "Request too large"
                } else {
                    "Rate limit reached"
                };
                write!(
                    f,
                    "{what} for {} on tokens per {}: Limit {limit}, Available {}, Requested {}.",
                    self.model,
                    HumanDuration(window),
                    r.available.max(0),
                    r.requested
                )?;
            }
            Limited::Requests { window, limit } => write!(
                f,
                "Rate limit reached for {} on requests per {}: Limit {limit}.",
                self.model,
                HumanDuration(window)
            )?,
            Limited::ConcurrentStreams { limit } => write!(
                f,
                "Too many concurrent requests for {}: Limit {limit}.",
                self.model
            )?,
        }
        match r.retry_after {
            Some(wait) => write!(f, " Please try again in {}.", go_duration(wait)),
            None if matches!(r.limited, Limited::Tokens { .. }) => {
                f.write_str(" Reduce the prompt or the maximum tokens requested.")
            }
            None => f.write_str(" Please try again when a request completes."),
        }
    }
}

/// The outcome of [`Limiter::reconcile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconciliation {
    /// `actual − reserved`: positive was charged on top (debt possible),
    /// negative was refunded.
    pub delta: i64,
}

impl Limiter {
    /// The limiter for a validated token configuration.
    ///
    /// Bucket capacities: each token limit holds its own amount, except the
    /// shortest period, which holds `burst` when the quota sets it; requests
    /// hold their amount.
    pub fn new(cfg: &TokensConfig) -> Self {
        let quotas = cfg
            .quotas
            .iter()
            .map(|q| {
                let shortest = q
                    .tokens
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, r)| r.period)
                    .map(|(i, _)| i);
                let tokens = q
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let capacity = match q.burst {
                            Some(b) if Some(i) == shortest => b,
                            _ => r.amount,
                        };
                        Gcra::new(*r, capacity)
                    })
                    .collect();
                Limits {
                    identity: q.identity(),
                    matcher: q.matcher.clone(),
                    tokens,
                    requests: q.requests.map(|r| Gcra::new(r, r.amount)),
                    streams: q.concurrent_streams.map(|n| n.get()),
                    max_completion: q.max_completion_tokens.map(|n| u64::from(n.get())),
                    over_cap: q.over_cap,
                }
            })
            .collect();
        Limiter {
            quotas,
            default_max_tokens: u64::from(cfg.default_max_tokens.get()),
            include_usage: cfg.include_usage,
            ietf_headers: cfg.ietf_headers,
        }
    }

    /// The first quota whose `match` covers the request, if any (none: the
    /// request is not limited).
    pub fn quota_for(
        &self,
        path: &str,
        authority: &str,
        model: &str,
        tenant: &str,
    ) -> Option<QuotaId> {
        self.quotas
            .iter()
            .position(|q| q.matcher.matches(path, authority, model, tenant))
            .and_then(|i| u32::try_from(i).ok())
            .map(QuotaId)
    }

    /// The stable identity of `quota`'s rule (0 for an id from another
    /// policy), to key its state with ([`super::KeyId::new`]).
    pub fn identity(&self, quota: QuotaId) -> u64 {
        self.limits(quota).map_or(0, |l| l.identity)
    }

    fn limits(&self, quota: QuotaId) -> Option<&Limits> {
        self.quotas.get(usize::try_from(quota.0).ok()?)
    }

    /// What `info` reserves under `quota`, and the body edits to make.
    ///
    /// - A body problem or an invalid cap → 400 naming the field.
    /// - A cap above the quota's `max_completion_tokens` → 400
    ///   (`over_cap = "reject"`) or lowered to it (`"clamp"`, with a rewrite).
    /// - No cap → `default_max_tokens` (at most `max_completion_tokens`) is
    ///   reserved; with `over_cap = "clamp"` and a `max_completion_tokens`
    ///   that cap is also written into the body, so the upstream cannot
    ///   generate past the reservation. Otherwise the upstream may generate
    ///   more than was reserved, and the excess is charged afterwards.
    /// - Paths that are none of the four APIs reserve the prompt only.
    /// - OpenAI streams without `include_usage` get it when the policy's
    ///   `include_usage` is on.
    pub fn plan(&self, quota: QuotaId, info: &RequestInfo) -> Plan {
        if let Some(problem) = info.problem {
            return Plan::Reject {
                kind: ErrorKind::InvalidRequest {
                    param: problem.param(),
                },
                message: problem.message(),
            };
        }
        let limits = self.limits(quota);
        let max_completion = limits.and_then(|l| l.max_completion);
        let over_cap = limits.map_or(OverCap::Reject, |l| l.over_cap);
        let mut rewrite = Rewrite {
            include_usage: self.include_usage && info.lacks_stream_usage(),
            clamp: None,
        };
        let completion_tokens = match info.cap {
            Cap::Invalid { field } => {
                return Plan::Reject {
                    kind: ErrorKind::InvalidRequest {
                        param: Some(field.name()),
                    },
                    message: format!(
                        "Invalid '{}': expected an integer between 1 and {}.",
                        field.name(),
                        crate::llm::MAX_SANE_TOKENS
                    ),
                };
            }
            Cap::Given { field, tokens } => match max_completion {
                Some(max) if tokens > max => match over_cap {
                    OverCap::Reject => {
                        return Plan::Reject {
                            kind: ErrorKind::InvalidRequest {
                                param: Some(field.name()),
                            },
                            message: format!(
                                "'{}' is {tokens}, above this deployment's limit of {max}.",
                                field.name()
                            ),
                        };
                    }
                    OverCap::Clamp => {
                        rewrite.clamp = Some((field, max));
                        max
                    }
                },
                _ => tokens,
            },
            Cap::Absent if info.api == ApiShape::Other => 0,
            Cap::Absent => {
                let reserved = max_completion
                    .map_or(self.default_max_tokens, |m| m.min(self.default_max_tokens));
                if over_cap == OverCap::Clamp
                    && max_completion.is_some()
                    && let Some(field) = default_cap_field(info.api)
                {
                    rewrite.clamp = Some((field, reserved));
                }
                reserved
            }
        };
        Plan::Forward {
            reservation: Reservation {
                prompt_tokens: info.prompt_tokens,
                // Each completion (`n`, `best_of`, each prompt of a batch)
                // may run to the cap.
                completion_tokens: completion_tokens.saturating_mul(info.completions.max(1)),
            },
            rewrite,
        }
    }

    /// Admits the request if every limit of `quota` has room for it, and
    /// takes the room (all or nothing: a rejection changes no bucket).
    /// Without a matching quota (an id from another policy) it admits and
    /// holds nothing.
    pub fn reserve(
        &self,
        state: &mut KeyState,
        now: Timestamp,
        quota: QuotaId,
        reservation: &Reservation,
    ) -> Decision {
        let cost = reservation.total();
        let Some(limits) = self.limits(quota) else {
            return Decision::Admitted {
                ticket: Ticket {
                    quota,
                    reserved: 0,
                    holds_stream: false,
                },
                status: QuotaStatus::default(),
            };
        };
        let t = now.as_nanos();
        state.tokens.resize(limits.tokens.len(), 0);
        if now.since(Timestamp(state.touched)) > STREAM_LEASE {
            state.streams = 0;
        }

        let mut worst: Option<(Limited, Shortfall, i64)> = None;
        let mut consider = |limited: Limited, shortfall: Shortfall, available: i64| {
            let worse = match (&worst, shortfall) {
                (None, _) => true,
                (Some((_, Shortfall::Never, _)), _) => false,
                (Some(_), Shortfall::Never) => true,
                (Some((_, Shortfall::Wait(a), _)), Shortfall::Wait(b)) => b > *a,
            };
            if worse {
                worst = Some((limited, shortfall, available));
            }
        };
        for (i, g) in limits.tokens.iter().enumerate() {
            // Checked here, taken below with `charge`, which computes the
            // same instant `try_take` would return.
            if let Err(s) = g.try_take(state.tokens[i], t, cost) {
                consider(
                    Limited::Tokens {
                        window: g.period(),
                        limit: g.amount(),
                    },
                    s,
                    g.available(state.tokens[i], t),
                );
            }
        }
        let mut new_requests = state.requests;
        if let Some(g) = &limits.requests {
            match g.try_take(state.requests, t, 1) {
                Ok(tat) => new_requests = tat,
                Err(s) => consider(
                    Limited::Requests {
                        window: g.period(),
                        limit: g.amount(),
                    },
                    s,
                    g.available(state.requests, t),
                ),
            }
        }
        if let Some(max) = limits.streams
            && state.streams >= max
            && worst.is_none()
        {
            worst = Some((
                Limited::ConcurrentStreams { limit: max },
                Shortfall::Never,
                0,
            ));
        }
        if let Some((limited, shortfall, available)) = worst {
            return Decision::Rejected(Rejection {
                limited,
                requested: cost,
                available,
                retry_after: match shortfall {
                    Shortfall::Wait(w) => Some(w),
                    Shortfall::Never => None,
                },
                status: self.status_of(limits, state, t),
            });
        }
        for (g, tat) in limits.tokens.iter().zip(state.tokens.iter_mut()) {
            *tat = g.charge(*tat, t, cost);
        }
        state.requests = new_requests;
        // Every admitted request counts as in flight until it is settled,
        // limited or not: a key with a request in flight is never at rest,
        // so its slot cannot be taken before the settlement finds it.
        let holds_stream = true;
        state.streams = state.streams.saturating_add(1);
        state.touched = state.touched.max(t);
        Decision::Admitted {
            ticket: Ticket {
                quota,
                reserved: cost,
                holds_stream,
            },
            status: self.status_of(limits, state, t),
        }
    }

    /// Settles a reservation with the tokens really used: refunds
    /// `reserved − actual` or charges `actual − reserved` (which may put the
    /// buckets in debt) in every token bucket of the ticket's quota.
    pub fn reconcile(
        &self,
        state: &mut KeyState,
        now: Timestamp,
        ticket: &Ticket,
        actual: u64,
    ) -> Reconciliation {
        let delta = i128::from(actual) - i128::from(ticket.reserved);
        let delta = i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN });
        let Some(limits) = self.limits(ticket.quota) else {
            return Reconciliation { delta };
        };
        let t = now.as_nanos();
        state.tokens.resize(limits.tokens.len(), 0);
        for (g, tat) in limits.tokens.iter().zip(state.tokens.iter_mut()) {
            *tat = if actual >= ticket.reserved {
                g.charge(*tat, t, actual - ticket.reserved)
            } else {
                g.refund(*tat, t, ticket.reserved - actual)
            };
        }
        state.touched = state.touched.max(t);
        Reconciliation { delta }
    }

    /// Gives back the ticket's concurrent-stream slot, if it holds one.
    pub fn release(&self, state: &mut KeyState, ticket: &Ticket) {
        if ticket.holds_stream {
            state.streams = state.streams.saturating_sub(1);
        }
    }

    /// [`reconcile`](Self::reconcile) (when the usage is known) and
    /// [`release`](Self::release) in one update, for the end of a request.
    pub fn finish(
        &self,
        state: &mut KeyState,
        now: Timestamp,
        ticket: &Ticket,
        actual: Option<u64>,
    ) -> Option<Reconciliation> {
        let settled = actual.map(|a| self.reconcile(state, now, ticket, a));
        self.release(state, ticket);
        settled
    }

    /// The quota's state at `now`, for headers.
    pub fn status(&self, state: &KeyState, now: Timestamp, quota: QuotaId) -> QuotaStatus {
        match self.limits(quota) {
            Some(limits) => self.status_of(limits, state, now.as_nanos()),
            None => QuotaStatus::default(),
        }
    }

    /// Response headers for `status` (see [`QuotaStatus::headers`]), with
    /// the IETF ones when the policy asks for them.
    pub fn headers(
        &self,
        status: &QuotaStatus,
        retry_after: Option<Duration>,
    ) -> Vec<(&'static str, String)> {
        status.headers(retry_after, self.ietf_headers)
    }

    /// [`Limiter::headers`] in the shape `api`'s clients read, Anthropic's
    /// reset instants counted from `now`.
    pub fn headers_for(
        &self,
        api: crate::config::Api,
        now: Timestamp,
        status: &QuotaStatus,
        retry_after: Option<Duration>,
    ) -> Vec<(&'static str, String)> {
        status.headers_for(api, now, retry_after, self.ietf_headers)
    }

    fn status_of(&self, limits: &Limits, state: &KeyState, t: u64) -> QuotaStatus {
        let status = |g: &Gcra, tat: u64| LimitStatus {
            limit: g.amount(),
            window: g.period(),
            remaining: u64::try_from(g.available(tat, t)).unwrap_or(0),
            reset: g.time_to_full(tat, t),
        };
        QuotaStatus {
            tokens: limits
                .tokens
                .iter()
                .enumerate()
                .map(|(i, g)| status(g, state.tokens.get(i).copied().unwrap_or(0)))
                .collect(),
            requests: limits.requests.as_ref().map(|g| status(g, state.requests)),
        }
    }
}

/// The field sluice writes a cap into when the client gave none.
fn default_cap_field(api: ApiShape) -> Option<CapField> {
    match api {
        ApiShape::ChatCompletions => Some(CapField::MaxCompletionTokens),
        ApiShape::Completions | ApiShape::Messages => Some(CapField::MaxTokens),
        ApiShape::Responses => Some(CapField::MaxOutputTokens),
        ApiShape::Other => None,
    }
}
