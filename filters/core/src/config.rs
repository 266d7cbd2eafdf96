//! Validated configuration for every sluice capability.
//!
//! These types are what a policy file compiles into (see `sluice-policy`):
//! every value has been range-checked, every default filled in and every
//! cross-reference resolved, so the algorithms and filters consuming them
//! never re-validate. They serialize back to the policy's human spelling,
//! which is how `sluice explain` prints the effective policy.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::units::{ByteSize, Rate, Ratio, serialize_duration};

/// A whole policy: who the tenant is, which backends exist, and how each
/// capability protects them. A capability whose section is absent is off.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    /// Optional human name of the policy, shown in logs and explanations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub tenant: TenantIdentity,
    pub model: ModelSource,
    /// Backend requests go to when no route and no backend's model list
    /// matches: the named one, or the first backend.
    pub default_backend: String,
    #[serde(rename = "backend")]
    pub backends: Vec<Backend>,
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// The global `[failover]` section as written, defaults filled in. What
    /// applies to a backend is its [`Backend::failover`]: this section with
    /// the backend's `[backend.failover]` laid over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverConfig>,
}

impl Policy {
    /// The backend called `name`, if the policy declares it.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The backend that serves `model` by its model list, if any.
    pub fn backend_for_model(&self, model: &str) -> Option<&Backend> {
        self.backends
            .iter()
            .find(|b| b.models.iter().any(|p| p.matches(model)))
    }

    /// The backend a request goes to, as the policy routes it: the first
    /// explicit route whose match covers the request, else the backend whose
    /// model list names `model`, else `default_backend`. Every filter that
    /// must agree on where a request goes (the breaker's circuits, the
    /// token limiter's quotas) resolves it here.
    ///
    /// `None` only for a policy that never passed validation (no backends,
    /// or names that do not resolve).
    pub fn route(
        &self,
        path: &str,
        authority: &str,
        model: &str,
        tenant: &str,
    ) -> Option<&Backend> {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(path, authority, model, tenant))
            .and_then(|r| self.backend(&r.backend))
            .or_else(|| self.backend_for_model(model))
            .or_else(|| self.backend(&self.default_backend))
            .or_else(|| self.backends.first())
    }
}

/// How a request's tenant is identified.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TenantIdentity {
    #[serde(flatten)]
    pub source: TenantSource,
    /// Tenant assigned to requests that carry no identity.
    pub missing: String,
}

/// Where the tenant comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "from", rename_all = "kebab-case")]
pub enum TenantSource {
    /// The value of a request header, as is.
    Header { header: String },
    /// A hash of the API key (`authorization: Bearer …` or `x-api-key`).
    /// The tenant is `key-<first 16 hex digits of SHA-256>` unless `names`
    /// maps that hash to a name; the key itself is never stored or logged.
    ApiKey {
        #[serde(
            skip_serializing_if = "Vec::is_empty",
            serialize_with = "serialize_key_names"
        )]
        names: Vec<ApiKeyName>,
    },
}

/// A name given to the tenant owning an API key, by the key's hash.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiKeyName {
    /// `key-` followed by 16 lowercase hex digits (see `sluice hash-key`).
    pub hash: String,
    pub tenant: String,
}

/// Where the requested model comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSource {
    pub from: ModelFrom,
    /// Header read when `from = "header"`, and as a fallback when the body has
    /// no `model`.
    pub header: String,
    /// Model assumed when a request names none; without it such a request is
    /// accounted under the model `unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFrom {
    /// The `model` field of the JSON request body.
    Body,
    /// A request header.
    Header,
}

/// A model-name pattern: an exact name, or a prefix followed by `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern from its spelling (`"gpt-4o"`, `"gpt-4o-*"`, `"*"`).
    pub fn new(spelling: impl Into<String>) -> Self {
        Self(spelling.into())
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => self.0 == value,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// An upstream LLM service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backend {
    pub name: String,
    /// The API the upstream speaks; sets the shape of sluice's own replies.
    pub api: Api,
    pub models: Vec<Pattern>,
    /// Envoy route timeout for requests to this backend (0s: none).
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    #[serde(rename = "zone")]
    pub zones: Vec<Zone>,
    /// Effective capability settings for this backend: the global section
    /// with this backend's overrides applied. `None` when the capability is
    /// off for it (printed as `enabled = false`).
    #[serde(serialize_with = "serialize_section")]
    pub outlier: Option<OutlierConfig>,
    #[serde(serialize_with = "serialize_section")]
    pub breaker: Option<BreakerConfig>,
    #[serde(serialize_with = "serialize_section")]
    pub retry: Option<RetryConfig>,
    #[serde(serialize_with = "serialize_section")]
    pub failover: Option<FailoverConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    Openai,
    Anthropic,
}

/// Where a backend runs: one locality, served by an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Zone {
    pub name: String,
    pub region: String,
    /// The Envoy cluster holding this zone's endpoints (default: the backend's name,
    /// so that all zones of a backend are localities of one cluster).
    pub cluster: String,
    /// Static endpoints (`host:port`); empty when the cluster is defined
    /// elsewhere (EDS, Istio).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The provider quota behind this zone (the account's limit in its
    /// region), in requests per minute: `[failover]` spills new requests
    /// away as this proxy's use nears it (`max_utilization`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<NonZeroU32>,
    /// The same quota in tokens per minute (prompt and completion, as the
    /// responses' `usage` reports them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<NonZeroU32>,
}

/// An explicit routing rule, tried in file order before model-based routing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    #[serde(rename = "match")]
    pub matcher: Match,
    pub backend: String,
}

/// Which requests a rule covers. Every non-empty list must match (one of its
/// entries); an empty list matches anything.
#[derive(Clone, Debug, PartialEq, Default, Serialize)]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub path_prefix: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authority: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<Pattern>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<Pattern>,
}

impl Match {
    /// Whether a request with these attributes is covered.
    pub fn matches(&self, path: &str, authority: &str, model: &str, tenant: &str) -> bool {
        (self.path_prefix.is_empty() || self.path_prefix.iter().any(|p| path.starts_with(p)))
            && (self.authority.is_empty() || self.authority.iter().any(|a| a == authority))
            && (self.models.is_empty() || self.models.iter().any(|p| p.matches(model)))
            && (self.tenants.is_empty() || self.tenants.iter().any(|p| p.matches(tenant)))
    }

    /// Whether the rule covers every request.
    pub fn is_catch_all(&self) -> bool {
        self.path_prefix.is_empty()
            && self.authority.is_empty()
            && self.models.is_empty()
            && self.tenants.is_empty()
    }
}

/// Endpoint outlier detection and endpoint picking that understand LLM
/// traffic (see `sluice_core::outlier`). Every detector is optional: a zero
/// threshold switches it off.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutlierConfig {
    /// Time constant of the decaying request and failure counts that rates
    /// are judged on (Envoy's `interval`, default 10s).
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// Time constant of the decaying time-to-first-token and per-token
    /// estimates (latency must be judged faster than rates).
    #[serde(serialize_with = "serialize_duration")]
    pub latency_window: Duration,
    /// Failed attempts in a row (5xx, reset, connect failure, timeout, no
    /// first token in time) that eject an endpoint; 0 disables (Envoy's
    /// `consecutive_5xx`, default 5).
    pub consecutive_errors: u32,
    /// Failure share (over `interval`) that ejects an endpoint; 0% disables
    /// (Envoy's `failure_percentage_threshold`, default 85%).
    pub failure_rate: Ratio,
    /// Attempts an endpoint must have served (decayed over `interval`)
    /// before its rates are judged (Envoy's `*_request_volume`).
    pub min_requests: u32,
    /// Success-rate outliers: an endpoint whose success rate is below the
    /// peers' mean minus this many standard deviations is ejected; 0
    /// disables (Envoy's `success_rate_stdev_factor` / 1000, default 1.9).
    pub success_rate_stdev: f64,
    /// Endpoints with enough data a peer comparison (success rate, latency)
    /// needs (Envoy's `success_rate_minimum_hosts`).
    pub min_hosts: u32,
    /// Latency outliers: an endpoint whose time to first token or time per
    /// output token exceeds this multiple of its peers' median is ejected;
    /// 0 disables.
    pub latency_factor: f64,
    /// Latency samples (decayed over `latency_window`) an endpoint needs
    /// before its latency is judged.
    pub min_samples: u32,
    /// A time to first token below this is never an outlier, whatever the
    /// peers do (a 3× of 20 ms harms nobody).
    #[serde(serialize_with = "serialize_duration")]
    pub ttft_floor: Duration,
    /// A time per output token below this is never an outlier.
    #[serde(serialize_with = "serialize_duration")]
    pub tpot_floor: Duration,
    /// Phi accrual on a busy endpoint's gaps between successes: ejected
    /// when φ exceeds this while it has attempts outstanding; 0 disables
    /// (Akka's default threshold is 8).
    pub phi_threshold: f64,
    /// How long an endpoint that answered 429 gets no new requests when its
    /// answer names no reset time (`retry-after`, `x-ratelimit-reset-*`,
    /// `anthropic-ratelimit-*-reset`); 0s ignores 429s.
    #[serde(serialize_with = "serialize_duration")]
    pub cooldown_429: Duration,
    /// Cap on a reset time an endpoint names for itself.
    #[serde(serialize_with = "serialize_duration")]
    pub max_cooldown: Duration,
    /// A streamed attempt with no first token after this is abandoned
    /// before anything reaches the client and retried on another endpoint;
    /// 0s disables.
    #[serde(serialize_with = "serialize_duration")]
    pub first_token_timeout: Duration,
    /// Attempts on other endpoints after one fails (error, 429, reset, no
    /// first token in time), before anything reached the client.
    pub retries: u32,
    /// First ejection length, multiplied by the number of recent ejections
    /// (Envoy's `base_ejection_time`, 30s).
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection_time: Duration,
    /// Cap on the ejection length (Envoy's `max_ejection_time`, 300s).
    #[serde(serialize_with = "serialize_duration")]
    pub max_ejection_time: Duration,
    /// Random spread of ejection lengths (± this share), so endpoints
    /// ejected together do not return together.
    pub jitter: Ratio,
    /// Most of a backend's endpoints that may be ejected at once; at least
    /// one may always be, never the last (Envoy's `max_ejection_percent`).
    pub max_ejection: Ratio,
    /// Successful requests an ejected endpoint must serve, as a probe, to
    /// return; a failed probe ejects it again, for longer.
    pub probes: NonZeroU32,
}

/// Circuit breaking, bulkheads and what to answer when they act.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerConfig {
    #[serde(flatten)]
    pub mode: BreakerMode,
    /// What a circuit covers.
    pub scope: BreakerScope,
    /// Outcomes counted as failures.
    pub failure_on: Vec<FailureKind>,
    /// Time to first token above which a call counts as slow.
    #[serde(serialize_with = "serialize_duration")]
    pub slow_ttft: Duration,
    /// Mean time per output token above which a stream counts as slow.
    #[serde(serialize_with = "serialize_duration")]
    pub slow_tpot: Duration,
    /// How long a tripped circuit stays open the first time
    /// (resilience4j's `waitDurationInOpenState`, 60s).
    #[serde(serialize_with = "serialize_duration")]
    pub open_for: Duration,
    /// Cap on the open time, which grows by `backoff` on each repeated trip.
    #[serde(serialize_with = "serialize_duration")]
    pub max_open_for: Duration,
    /// Growth factor of the open time on repeated trips (≥ 1).
    pub backoff: f64,
    /// Random spread applied to the open time (± this share).
    pub jitter: Ratio,
    /// Calls let through while half-open
    /// (resilience4j's `permittedNumberOfCallsInHalfOpenState`, 10).
    pub half_open_probes: NonZeroU32,
    pub bulkhead: BulkheadConfig,
    pub degrade: DegradeConfig,
}

/// How a circuit decides to open.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum BreakerMode {
    /// `failures` failures in a row open the circuit.
    Consecutive {
        #[serde(rename = "consecutive_failures")]
        failures: NonZeroU32,
    },
    /// Failure or slow-call share over a sliding window (resilience4j).
    Rate {
        window: Window,
        /// Calls the window must hold before it is judged
        /// (resilience4j's `minimumNumberOfCalls`, 100).
        min_calls: NonZeroU32,
        /// resilience4j's `failureRateThreshold`, 50%.
        failure_rate: Ratio,
        /// resilience4j's `slowCallRateThreshold`, 100%.
        slow_rate: Ratio,
    },
    /// Client-side adaptive throttling (Google SRE book, "Handling
    /// Overload"): reject with probability
    /// `max(0, (requests − k·accepts) / (requests + 1))`, capped.
    Adaptive {
        /// The SRE book's K (2).
        k: f64,
        /// History the counts cover (the SRE book's 2 minutes).
        #[serde(serialize_with = "serialize_duration")]
        window: Duration,
        /// Highest rejection probability (Envoy admission_control's
        /// `max_rejection_probability`, 80%).
        max_reject: Ratio,
    },
}

/// A sliding window, by number of calls or by time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Window {
    Calls(NonZeroU32),
    #[serde(serialize_with = "serialize_duration")]
    Time(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerScope {
    /// One circuit per backend × model.
    BackendModel,
    /// One circuit per backend × model × endpoint.
    Endpoint,
}

/// An upstream outcome that counts as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Any 5xx status.
    #[serde(rename = "5xx")]
    Status5xx,
    /// 502, 503, 504.
    GatewayError,
    /// An upstream 429 (overload, not a tenant's quota).
    #[serde(rename = "429")]
    Status429,
    /// The upstream reset the stream.
    Reset,
    /// The connection could not be made.
    ConnectFailure,
    /// The upstream did not answer in time.
    Timeout,
}

/// Caps on concurrent requests, so one tenant or model cannot take them all.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BulkheadConfig {
    /// In-flight requests per backend × model (Envoy's circuit breaker
    /// `max_requests`, 1024).
    pub max_in_flight: NonZeroU32,
    /// In-flight requests per tenant and backend × model; `None`: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_tenant: Option<NonZeroU32>,
    /// Per-tenant overrides of `max_in_flight_per_tenant`.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_tenant_limits"
    )]
    pub tenants: Vec<TenantLimit>,
    /// Requests that may wait for a slot; 0 rejects at once
    /// (resilience4j's `maxWaitDuration` 0).
    pub queue: u32,
    /// Longest wait in the queue before the request is degraded.
    #[serde(serialize_with = "serialize_duration")]
    pub max_wait: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TenantLimit {
    pub tenant: String,
    pub max_in_flight: NonZeroU32,
}

/// What a request gets when the breaker or bulkhead turns it away.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DegradeConfig {
    #[serde(flatten)]
    pub action: DegradeAction,
    /// `retry-after` given with fail-fast answers.
    #[serde(serialize_with = "serialize_duration")]
    pub retry_after: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum DegradeAction {
    /// 503 with `retry-after` and an error body in the client's API shape.
    FailFast,
    /// Rewrite `model` and route to the backend serving it.
    FallbackModel {
        #[serde(rename = "fallback_model")]
        model: String,
        #[serde(rename = "fallback_backend")]
        backend: String,
    },
    /// A fixed answer in the client's API shape, streamed when asked to.
    Static {
        #[serde(rename = "static_text")]
        text: String,
    },
}

/// Token-aware rate limiting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokensConfig {
    /// Characters per token when estimating a prompt (4 unless a model
    /// override says otherwise).
    pub chars_per_token: f64,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_pairs"
    )]
    pub model_chars_per_token: Vec<(Pattern, f64)>,
    /// Completion cap reserved when the client sets none.
    pub default_max_tokens: NonZeroU32,
    /// Request bodies are buffered up to this size.
    pub max_body: ByteSize,
    pub on_large_body: LargeBody,
    /// Add `stream_options.include_usage = true` to streaming OpenAI requests
    /// so the real usage can be reconciled.
    pub include_usage: bool,
    /// Send the IETF `RateLimit`/`RateLimit-Policy` headers besides OpenAI's.
    pub ietf_headers: bool,
    /// Tenant × model keys tracked at once; the idlest are evicted beyond it.
    pub max_keys: NonZeroU32,
    /// What happens to a request when the shared quota state cannot be read
    /// or written (a host error, or compare-and-swap races lost until the
    /// retry bound).
    pub on_state_error: StateErrorPolicy,
    #[serde(rename = "quota")]
    pub quotas: Vec<Quota>,
}

/// The token limiter's answer when its shared state is unavailable.
///
/// `Deny` by default: under a flood of writers to one key, admitting without
/// limit would turn contention into exactly the overload a quota exists to
/// stop. `Allow` prefers availability over the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateErrorPolicy {
    /// Turn the request away, as if its quota were exhausted.
    Deny,
    /// Let the request through, unlimited.
    Allow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LargeBody {
    /// Answer 413.
    Reject,
    /// Estimate the prompt from `content-length`.
    Estimate,
}

/// Limits for every tenant × model pair a rule matches (the first matching
/// rule in file order applies).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Quota {
    /// Optional name of the rule, unique among the rules. It is the rule's
    /// identity (see [`Quota::identity`]): with a name, the rule keeps its
    /// state when its match or limits change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matcher: Match,
    /// Token limits, each over its own period.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent_streams: Option<NonZeroU32>,
    /// Largest completion a request may ask for; larger asks are answered 400
    /// (`over_cap = "reject"`) or lowered to it (`"clamp"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<NonZeroU32>,
    pub over_cap: OverCap,
    /// Most tokens admitted at once (bucket capacity); defaults to the
    /// shortest period's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverCap {
    Reject,
    Clamp,
}

impl Quota {
    /// A stable 64-bit identity of the rule, for keying its shared state:
    /// the first 8 bytes of a SHA-256 of the rule's `name` when it has one,
    /// else of its match and its limits. It never depends on the rule's
    /// position, so a reload that reorders the rules keeps every rule's
    /// state.
    ///
    /// Without a name, changing the rule's match or any of its limits
    /// (`tokens`, `requests`, `concurrent_streams`, `burst`,
    /// `max_completion_tokens`, `over_cap`) makes it a new rule with fresh
    /// state; give it a `name` to keep its state across such changes.
    pub fn identity(&self) -> u64 {
        let mut h = Sha256::new();
        match &self.name {
            Some(name) => {
                // Domain tags keep a name apart from any rule's encoding.
                h.update(b"sluice.quota.name\0");
                hash_str(&mut h, name);
            }
            None => {
                h.update(b"sluice.quota.rule\0");
                let m = &self.matcher;
                hash_list(&mut h, m.tenants.iter().map(Pattern::as_str));
                hash_list(&mut h, m.models.iter().map(Pattern::as_str));
                hash_list(&mut h, m.path_prefix.iter().map(String::as_str));
                hash_list(&mut h, m.authority.iter().map(String::as_str));
                hash_len(&mut h, self.tokens.len());
                for rate in &self.tokens {
                    hash_rate(&mut h, rate);
                }
                hash_option(&mut h, self.requests.as_ref(), hash_rate);
                hash_option(&mut h, self.concurrent_streams, |h, n| {
                    h.update(n.get().to_le_bytes())
                });
                hash_option(&mut h, self.burst, |h, n| h.update(n.to_le_bytes()));
                hash_option(&mut h, self.max_completion_tokens, |h, n| {
                    h.update(n.get().to_le_bytes())
                });
                h.update([match self.over_cap {
                    OverCap::Reject => 0u8,
                    OverCap::Clamp => 1,
                }]);
            }
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

// The canonical encoding behind `Quota::identity`: every variable-length
// item is length-prefixed and every optional one tagged, so that no two
// different rules encode alike (("ab", "c") is not ("a", "bc")).

fn hash_len(h: &mut Sha256, len: usize) {
    h.update(u64::try_from(len).unwrap_or(u64::MAX).to_le_bytes());
}

fn hash_str(h: &mut Sha256, s: &str) {
    hash_len(h, s.len());
    h.update(s.as_bytes());
}

fn hash_list<'a>(h: &mut Sha256, items: impl ExactSizeIterator<Item = &'a str>) {
    hash_len(h, items.len());
    for item in items {
        hash_str(h, item);
    }
}

fn hash_rate(h: &mut Sha256, rate: &Rate) {
    h.update(rate.amount.to_le_bytes());
    h.update(rate.period.as_nanos().to_le_bytes());
}

fn hash_option<T>(h: &mut Sha256, value: Option<T>, hash: impl FnOnce(&mut Sha256, T)) {
    match value {
        Some(v) => {
            h.update([1u8]);
            hash(h, v);
        }
        None => h.update([0u8]),
    }
}

/// Retry budgets: retries are allowed while they stay a small share of traffic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryConfig {
    /// Retries allowed as a share of requests (Linkerd/Finagle, 20%).
    pub budget: Ratio,
    /// Retries always allowed per second (Linkerd/Finagle, 10).
    pub min_retries_per_second: u32,
    /// How long a request counts toward the budget (Linkerd/Finagle, 10s).
    #[serde(serialize_with = "serialize_duration")]
    pub ttl: Duration,
    /// Retries per request (Envoy's `num_retries`, 1).
    pub max_retries: u32,
    pub retry_on: Vec<FailureKind>,
    /// First back-off interval (Envoy's `base_interval`, 25ms).
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_base: Duration,
    /// Back-off cap (Envoy's default: 10 × base).
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
    /// Wait at least an upstream's `retry-after` before retrying.
    pub honor_retry_after: bool,
    /// Tokens of a typical request (prompt estimate plus completion cap):
    /// a request deposits, and its retry withdraws, its tokens over this,
    /// so retrying a huge prompt costs what many small ones do. 0: every
    /// request weighs 1.
    pub typical_request_tokens: u32,
}

/// Zone and region failover.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailoverConfig {
    /// Zone traffic prefers: the proxy's own (`node.locality`) or a named one.
    pub local_zone: LocalZone,
    /// Zones in order of preference after the local one; zones not listed
    /// follow, same region first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// Healthy share of a zone's endpoints below which traffic spills to the
    /// next zone (Envoy's overprovisioning factor 1.4 spills below 1/1.4 ≈ 71%).
    pub min_healthy: Ratio,
    /// Quota use of a zone above which new requests spill over.
    pub max_utilization: Ratio,
    pub spill: Spill,
    /// Time a zone must stay healthy before traffic fails back to it.
    #[serde(serialize_with = "serialize_duration")]
    pub failback_after: Duration,
    /// How often (per proxy) one request is sent to a zone that gets no
    /// traffic, to learn whether it recovered.
    #[serde(serialize_with = "serialize_duration")]
    pub probe_interval: Duration,
    /// Whether traffic may leave the local region.
    pub cross_region: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LocalZone {
    /// From the proxy's `node.locality`.
    Auto,
    Named(String),
}

impl Serialize for LocalZone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LocalZone::Auto => s.serialize_str("auto"),
            LocalZone::Named(zone) => s.serialize_str(zone),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spill {
    /// Shift the missing share of healthy capacity, as Envoy's priority load does.
    Gradual,
    /// Move all traffic to the next zone.
    All,
}

/// A backend's section: the table, or `enabled = false` when off.
fn serialize_section<T: Serialize, S: serde::Serializer>(
    section: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    match section {
        Some(t) => t.serialize(s),
        None => {
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry("enabled", &false)?;
            map.end()
        }
    }
}

/// Pairs as a table, in order (`"pattern" = value`).
fn serialize_pairs<S: serde::Serializer>(
    pairs: &[(Pattern, f64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k.as_str(), v)))
}

fn serialize_tenant_limits<S: serde::Serializer>(
    limits: &[TenantLimit],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(limits.iter().map(|l| (l.tenant.as_str(), l.max_in_flight)))
}

fn serialize_key_names<S: serde::Serializer>(
    names: &[ApiKeyName],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(names.iter().map(|n| (n.hash.as_str(), n.tenant.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, models: &[&str]) -> Backend {
        Backend {
            name: name.into(),
            api: Api::Openai,
            models: models.iter().map(|m| Pattern::new(*m)).collect(),
            timeout: Duration::from_secs(60),
            zones: Vec::new(),
            outlier: None,
            breaker: None,
            retry: None,
            failover: None,
        }
    }

    fn policy() -> Policy {
        Policy {
            name: None,
            tenant: TenantIdentity {
                source: TenantSource::Header {
                    header: "x-tenant-id".into(),
                },
                missing: "anonymous".into(),
            },
            model: ModelSource {
                from: ModelFrom::Body,
                header: "x-model".into(),
                default: None,
            },
            default_backend: "primary".into(),
            backends: vec![
                backend("primary", &["gpt-4o", "gpt-4o-2024-*"]),
                backend("fallback", &["gpt-4o-mini"]),
                backend("batch", &[]),
            ],
            routes: vec![Route {
                matcher: Match {
                    tenants: vec![Pattern::new("batch-*")],
                    ..Match::default()
                },
                backend: "batch".into(),
            }],
            outlier: None,
            breaker: None,
            tokens: None,
            retry: None,
            failover: None,
        }
    }

    fn rate(amount: u64, secs: u64) -> Rate {
        Rate {
            amount,
            period: Duration::from_secs(secs),
        }
    }

    fn quota(name: Option<&str>, tenants: &[&str], tokens: u64) -> Quota {
        Quota {
            name: name.map(Into::into),
            matcher: Match {
                tenants: tenants.iter().map(|t| Pattern::new(*t)).collect(),
                ..Match::default()
            },
            tokens: vec![rate(tokens, 60)],
            requests: None,
            concurrent_streams: None,
            max_completion_tokens: None,
            over_cap: OverCap::Reject,
            burst: None,
        }
    }

    #[test]
    fn a_named_rule_is_identified_by_its_name_alone() {
        let a = quota(Some("acme"), &["acme"], 60_000);
        // `printf 'sluice.quota.name\0\x04\0\0\0\0\0\0\0acme' | sha256sum`,
        // first 8 bytes little-endian: the encoding is part of the state's
        // key, so a change to it must be deliberate.
        assert_eq!(a.identity(), 7_229_214_935_087_146_002);
        let mut changed = quota(Some("acme"), &["acme", "acme-*"], 120_000);
        changed.burst = Some(200_000);
        changed.over_cap = OverCap::Clamp;
        assert_eq!(changed.identity(), a.identity());
        assert_ne!(
            quota(Some("acme2"), &["acme"], 60_000).identity(),
            a.identity()
        );
    }

    #[test]
    fn an_unnamed_rule_is_identified_by_its_match_and_limits() {
        let base = quota(None, &["acme"], 60_000);
        assert_eq!(base.identity(), quota(None, &["acme"], 60_000).identity());
        let mut variants = vec![
            quota(None, &["acme"], 60_001),
            quota(None, &["acme", "beta"], 60_000),
            quota(None, &[], 60_000),
            quota(Some("acme"), &["acme"], 60_000),
        ];
        let mut v = base.clone();
        v.matcher = Match {
            models: vec![Pattern::new("acme")],
            ..Match::default()
        };
        variants.push(v);
        let mut v = base.clone();
        v.tokens.push(rate(1_000_000, 86_400));
        variants.push(v);
        let mut v = base.clone();
        v.tokens = vec![rate(60_000, 3_600)];
        variants.push(v);
        let mut v = base.clone();
        v.requests = Some(rate(100, 60));
        variants.push(v);
        let mut v = base.clone();
        v.concurrent_streams = NonZeroU32::new(8);
        variants.push(v);
        let mut v = base.clone();
        v.max_completion_tokens = NonZeroU32::new(8);
        variants.push(v);
        let mut v = base.clone();
        v.burst = Some(8);
        variants.push(v);
        let mut v = base.clone();
        v.over_cap = OverCap::Clamp;
        variants.push(v);
        let mut ids: Vec<u64> = variants.iter().map(Quota::identity).collect();
        ids.push(base.identity());
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "two different rules share an identity");
    }

    #[test]
    fn list_boundaries_are_part_of_an_identity() {
        let ab_c = quota(None, &["ab", "c"], 60_000);
        let a_bc = quota(None, &["a", "bc"], 60_000);
        assert_ne!(ab_c.identity(), a_bc.identity());
        // The same spelling in another list is another rule.
        let mut model = quota(None, &[], 60_000);
        model.matcher.models = vec![Pattern::new("ab")];
        let mut tenant = quota(None, &[], 60_000);
        tenant.matcher.tenants = vec![Pattern::new("ab")];
        assert_ne!(model.identity(), tenant.identity());
        // A burst of 8 is not a completion cap of 8.
        let mut burst = quota(None, &[], 60_000);
        burst.burst = Some(8);
        let mut cap = quota(None, &[], 60_000);
        cap.max_completion_tokens = NonZeroU32::new(8);
        assert_ne!(burst.identity(), cap.identity());
    }

    #[test]
    fn routes_then_models_then_the_default() {
        let p = policy();
        let to = |model: &str, tenant: &str| {
            p.route("/v1/chat/completions", "llm", model, tenant)
                .map(|b| b.name.as_str())
        };
        assert_eq!(to("gpt-4o", "batch-nightly"), Some("batch"));
        assert_eq!(to("gpt-4o-2024-08-06", "acme"), Some("primary"));
        assert_eq!(to("gpt-4o-mini", "acme"), Some("fallback"));
        assert_eq!(to("llama", "acme"), Some("primary"));
        let mut broken = policy();
        broken.default_backend = "gone".into();
        broken.routes.clear();
        assert_eq!(
            broken.route("/", "", "llama", "").map(|b| b.name.as_str()),
            Some("primary")
        );
    }
}
