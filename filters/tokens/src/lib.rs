//! sluice's token-aware rate limiting filter.
//!
//! A thin adapter between Envoy's callbacks and `sluice_core::tokens`:
//!
//! 1. request headers: who is calling, which API; the body is held back
//!    (up to `max_body`) because what a request costs is written in it;
//! 2. request body, complete: estimate the cost (prompt + completion cap),
//!    reserve it in the tenant × model buckets kept in shared data (one
//!    state for all worker VMs), and either forward the request or answer
//!    429 in the client's API shape, before the upstream is ever called;
//! 3. response headers: the rate-limit headers of the reservation;
//! 4. response body: read the usage as it streams by (nothing is held back);
//! 5. end of the stream (`on_log`, which also runs after resets): refund or
//!    charge the difference between reserved and real usage, and free the
//!    concurrent-stream slot.

mod metrics;
mod slots;

use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_core::config::{Api, LargeBody, ModelFrom, Policy, TokensConfig};
use sluice_core::llm::{
    ApiShape, ErrorKind, Framing, RequestInfo, UsageFallback, UsageParser, UsageSource,
    chars_per_token_for, error_body, rewrite_body,
};
use sluice_core::tokens::{Decision, KeyId, Limiter, Plan, QuotaStatus, Ticket};
use sluice_filter_common::{identity, load_policy, now};

use metrics::{Labels, Metrics};
use slots::{SlotError, Slots};

const FILTER: &str = "sluice_tokens";

proxy_wasm::main! {{
    sluice_filter_common::panic::install(FILTER);
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TokensRoot::default()) });
}}

/// What every request of one configuration shares.
struct Config {
    policy: Policy,
    tokens: TokensConfig,
    limiter: Limiter,
    metrics: Metrics,
    slots: Slots,
}

#[derive(Default)]
struct TokensRoot {
    config: Option<Rc<Config>>,
}

impl Context for TokensRoot {}

impl RootContext for TokensRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration();
        let Some(policy) = load_policy(FILTER, bytes.as_deref()) else {
            return false;
        };
        let Some(tokens) = policy.tokens.clone() else {
            log::error!(
                "{FILTER}: the policy has no [tokens] section (or it is disabled): nothing to enforce"
            );
            return false;
        };
        let metrics = Metrics::define(&tokens);
        self.config = Some(Rc::new(Config {
            limiter: Limiter::new(&tokens),
            slots: Slots::new(tokens.max_keys.get()),
            metrics,
            tokens,
            policy,
        }));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(TokensHttp::new(config)))
    }
}

/// A request admitted under a quota, until it is settled.
struct Admitted {
    slot: u32,
    key: KeyId,
    ticket: Ticket,
    status: QuotaStatus,
    model: String,
    prompt_tokens: u64,
    /// The tenant × model counters, looked up once at admission.
    labels: Labels,
}

struct TokensHttp {
    config: Rc<Config>,
    path: String,
    authority: String,
    tenant: String,
    api: ApiShape,
    /// The request was judged (admitted, rejected, or not limited).
    decided: bool,
    admitted: Option<Admitted>,
    usage: Option<UsageParser>,
    upstream_status: Option<u16>,
}

impl TokensHttp {
    fn new(config: Rc<Config>) -> Self {
        Self {
            config,
            path: String::new(),
            authority: String::new(),
            tenant: String::new(),
            api: ApiShape::Other,
            decided: false,
            admitted: None,
            usage: None,
            upstream_status: None,
        }
    }

    /// The API whose error shape the client expects.
    fn vendor(&self) -> Api {
        self.api.vendor(Api::Openai)
    }

    /// The model: the body's (or the header's, when the policy reads the
    /// header), else the header, else the policy's default, else `unknown`.
    fn model(&self, info: &RequestInfo) -> String {
        let header = || identity::request_header(&self.config.policy.model.header);
        let chosen = match self.config.policy.model.from {
            ModelFrom::Body => info.model.clone().or_else(header),
            ModelFrom::Header => header().or_else(|| info.model.clone()),
        };
        chosen
            .or_else(|| self.config.policy.model.default.clone())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Decides on a parsed request; true when it may go on.
    fn decide(&mut self, info: &RequestInfo, body: Option<&[u8]>) -> bool {
        self.decided = true;
        let config = Rc::clone(&self.config);
        let model = self.model(info);
        let Some(quota) =
            config
                .limiter
                .quota_for(&self.path, &self.authority, &model, &self.tenant)
        else {
            return true;
        };
        let (reservation, rewrite) = match config.limiter.plan(quota, info) {
            Plan::Forward {
                reservation,
                rewrite,
            } => (reservation, rewrite),
            Plan::Reject { kind, message } => {
                config.metrics.invalid.inc();
                self.reply(kind, &message, &[]);
                return false;
            }
        };
        let now = now();
        let key = KeyId::new(quota, &self.tenant, &model);
        let outcome = config.slots.update(key, now, |state| {
            config.limiter.reserve(state, now, quota, &reservation)
        });
        let (slot, decision) = match outcome {
            Ok(done) => done,
            Err(e) => return self.degraded(e),
        };
        let labels = config.metrics.labels(&self.tenant, &model);
        match decision {
            Decision::Rejected(rejection) => {
                labels.rejected.inc();
                let headers = config
                    .limiter
                    .headers(&rejection.status, rejection.retry_after);
                let message = rejection.message(&model);
                self.reply(rejection.error_kind(), &message, &headers);
                false
            }
            Decision::Admitted { ticket, status } => {
                labels.admitted.inc();
                labels.reserved.add(ticket.reserved);
                if let Some(body) = body
                    && !rewrite.is_empty()
                    && let Some(new_body) = rewrite_body(body, &rewrite)
                {
                    self.set_http_request_body(0, body.len(), &new_body);
                    // The length changed; Envoy recomputes it when it is absent.
                    self.set_http_request_header("content-length", None);
                }
                self.admitted = Some(Admitted {
                    slot,
                    key,
                    ticket,
                    status,
                    model,
                    prompt_tokens: reservation.prompt_tokens,
                    labels,
                });
                true
            }
        }
    }

    /// Shared data failed us (a host error, or other workers kept winning
    /// the compare-and-swap): the request goes on unlimited rather than
    /// failing, and a metric says so.
    fn degraded(&mut self, e: SlotError) -> bool {
        warn!("{FILTER}: quota state unavailable ({e}); request forwarded unlimited");
        self.config.metrics.state_errors.inc();
        true
    }

    /// Answers the request with sluice's own error, in the client's shape.
    fn reply(&self, kind: ErrorKind, message: &str, headers: &[(&'static str, String)]) {
        let body = error_body(self.vendor(), kind, message);
        let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.push(("content-type", "application/json"));
        all.push(("x-sluice-limited", "tokens"));
        self.send_http_response(u32::from(kind.status()), all, Some(body.as_bytes()));
    }

    /// Settles the request once: refund or charge, release the stream slot.
    fn settle(&mut self) {
        let Some(admitted) = self.admitted.take() else {
            return;
        };
        let config = Rc::clone(&self.config);
        let report = self.usage.take().map(|parser| {
            parser.finish(&UsageFallback {
                prompt_tokens: admitted.prompt_tokens,
                chars_per_token: chars_per_token_for(&config.tokens, &admitted.model),
            })
        });
        // An upstream that failed (or never answered) generated nothing that
        // can be measured: charge what it reported, else nothing beyond the
        // prompt it was sent.
        let succeeded = self
            .upstream_status
            .is_some_and(|s| (200..300).contains(&s));
        let actual = match &report {
            Some(r) if succeeded || r.source != UsageSource::Estimated => r.usage.total_tokens,
            _ => 0,
        };
        let labels = admitted.labels;
        if let Some(r) = &report {
            if r.clamped {
                config.metrics.absurd_usage.inc();
            }
            if r.source == UsageSource::Estimated && succeeded {
                config.metrics.estimated_usage.inc();
            }
            if r.framing_errors > 0 {
                config
                    .metrics
                    .framing_errors
                    .add(u64::from(r.framing_errors));
            }
        }
        let now = now();
        let ticket = admitted.ticket;
        let result = config
            .slots
            .update_owned(admitted.slot, admitted.key, |state| {
                config.limiter.finish(state, now, &ticket, Some(actual))
            });
        match result {
            Ok(Some(Some(settled))) if settled.delta < 0 => {
                labels.refunded.add(settled.delta.unsigned_abs())
            }
            Ok(Some(Some(settled))) => labels.charged.add(settled.delta.unsigned_abs()),
            // Nothing to settle, or the key was evicted meanwhile (its
            // buckets went with it).
            Ok(_) => {}
            Err(e) => {
                warn!(
                    "{FILTER}: could not settle a reservation ({e}); the bucket keeps the reservation"
                );
                config.metrics.state_errors.inc();
            }
        }
        debug!(
            "{FILTER}: settled {} reserved {} used {actual}",
            self.tenant, ticket.reserved
        );
    }
}

impl Context for TokensHttp {}

impl HttpContext for TokensHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        self.api = ApiShape::from_path(&path);
        self.path = path;
        if self.api == ApiShape::Other {
            self.decided = true;
            return Action::Continue;
        }
        self.authority = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        self.tenant = identity::tenant(&self.config.policy.tenant);
        let max_body = self.config.tokens.max_body.0;
        let length = self
            .get_http_request_header("content-length")
            .and_then(|l| l.trim().parse::<u64>().ok());
        if end_of_stream {
            let info = RequestInfo::parse(&self.path, b"", &self.config.tokens);
            return if self.decide(&info, None) {
                Action::Continue
            } else {
                Action::Pause
            };
        }
        if let Some(length) = length
            && length > max_body
        {
            return self.too_large(length);
        }
        // Hold the headers until the body says what the request costs.
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.decided {
            return Action::Continue;
        }
        let size = u64::try_from(body_size).unwrap_or(u64::MAX);
        if size > self.config.tokens.max_body.0 {
            return self.too_large(size);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let info = RequestInfo::parse(&self.path, &body, &self.config.tokens);
        if self.decide(&info, Some(&body)) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.upstream_status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse().ok());
        let Some(admitted) = &self.admitted else {
            return Action::Continue;
        };
        for (name, value) in self.config.limiter.headers(&admitted.status, None) {
            self.set_http_response_header(name, Some(&value));
        }
        let content_type = self.get_http_response_header("content-type");
        self.usage = Some(UsageParser::new(Framing::from_content_type(
            content_type.as_deref(),
        )));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.usage.is_some()
            && body_size > 0
            && let Some(chunk) = self.get_http_response_body(0, body_size)
            && let Some(parser) = self.usage.as_mut()
        {
            parser.feed(&chunk);
        }
        if end_of_stream {
            self.settle();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Runs for every stream, also after a reset or a local reply: the
        // last chance to settle.
        self.settle();
    }
}

impl TokensHttp {
    /// A body larger than `max_body`: 413, or an estimate from its length.
    fn too_large(&mut self, length: u64) -> Action {
        match self.config.tokens.on_large_body {
            LargeBody::Reject => {
                self.decided = true;
                self.config.metrics.too_large.inc();
                let message = format!(
                    "request body of {length} bytes is larger than the {} this gateway inspects",
                    self.config.tokens.max_body
                );
                self.reply(ErrorKind::TooLarge, &message, &[]);
                Action::Pause
            }
            LargeBody::Estimate => {
                let info = RequestInfo::from_length(&self.path, length, &self.config.tokens);
                if self.decide(&info, None) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
        }
    }
}
