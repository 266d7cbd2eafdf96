//! The policy as written: every table and key of the language, unvalidated.
//!
//! Each struct here is one TOML table (or JSON object). Every field is
//! optional and remembers where it was written, so that compiling can fill
//! defaults, lay per-backend overrides over the global sections and point at
//! the exact place of a semantic error. The README documents each key.

use std::time::Duration;

use sluice_core::units::{ByteSize, Rate, Ratio};

use crate::decode::{Count, Map, Spanned, WindowSpec, keywords, raw_table};

raw_table! {
    /// The whole document.
    pub struct Document {
        /// Schema version; only 1 exists.
        version: u32,
        name: String,
        default_backend: String,
        tenant: Tenant,
        model: Model,
        backend: Vec<Backend>,
        route: Vec<Route>,
        outlier: Outlier,
        breaker: Breaker,
        tokens: Tokens,
        retry: Retry,
        failover: Failover,
    }
}

keywords!(TenantFrom { "header" => Header, "api-key" => ApiKey });

raw_table! {
    /// `[tenant]`: how a request's tenant is identified.
    pub struct Tenant {
        from: TenantFrom,
        header: String,
        missing: String,
        /// `[tenant.names]`: `"key-…" = "tenant"` for `from = "api-key"`.
        names: Map<String>,
    }
}

keywords!(ModelFrom { "body" => Body, "header" => Header });

raw_table! {
    /// `[model]`: where the requested model comes from.
    pub struct Model {
        from: ModelFrom,
        header: String,
        default: String,
    }
}

keywords!(Api { "openai" => Openai, "anthropic" => Anthropic });

raw_table! {
    /// `[[backend]]`: an upstream LLM service.
    pub struct Backend {
        name: String,
        api: Api,
        models: Vec<String>,
        timeout: Duration,
        zone: Vec<Zone>,
        outlier: Outlier,
        breaker: Breaker,
        retry: Retry,
        failover: Failover,
    }
}

raw_table! {
    /// `[[backend.zone]]`: one locality of a backend.
    pub struct Zone {
        name: String,
        region: String,
        cluster: String,
        endpoints: Vec<Spanned<String>>,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    }
}

raw_table! {
    /// `[[route]]`: an explicit routing rule.
    pub struct Route {
        matcher = "match": Match,
        backend: String,
    }
}

raw_table! {
    /// `match = { … }`: which requests a rule covers.
    pub struct Match {
        path_prefix: Vec<String>,
        authority: Vec<String>,
        models: Vec<String>,
        tenants: Vec<String>,
    }
}

raw_table! {
    /// `[outlier]`: endpoint ejection.
    pub struct Outlier {
        enabled: bool,
        interval: Duration,
        latency_window: Duration,
        consecutive_errors: u32,
        failure_rate: Ratio,
        min_requests: u32,
        success_rate_stdev: f64,
        min_hosts: u32,
        latency_factor: f64,
        min_samples: u32,
        ttft_floor: Duration,
        tpot_floor: Duration,
        phi_threshold: f64,
        cooldown_429: Duration,
        max_cooldown: Duration,
        first_token_timeout: Duration,
        retries: u32,
        base_ejection_time: Duration,
        max_ejection_time: Duration,
        jitter: Ratio,
        max_ejection: Ratio,
        probes: u32,
    }
}

keywords!(BreakerModeKind { "consecutive" => Consecutive, "rate" => Rate, "adaptive" => Adaptive });
keywords!(BreakerScope { "backend-model" => BackendModel, "endpoint" => Endpoint });
keywords!(FailureKind {
    "5xx" => Status5xx,
    "gateway-error" => GatewayError,
    "429" => Status429,
    "reset" => Reset,
    "connect-failure" => ConnectFailure,
    "timeout" => Timeout,
});

raw_table! {
    /// `[breaker]`: circuit breaking, bulkhead and degradation.
    pub struct Breaker {
        enabled: bool,
        mode: BreakerModeKind,
        scope: BreakerScope,
        failure_on: Vec<FailureKind>,
        consecutive_failures: u32,
        window: WindowSpec,
        min_calls: u32,
        failure_rate: Ratio,
        slow_rate: Ratio,
        slow_ttft: Duration,
        slow_tpot: Duration,
        open_for: Duration,
        max_open_for: Duration,
        backoff: f64,
        jitter: Ratio,
        half_open_probes: u32,
        k: f64,
        max_reject: Ratio,
        bulkhead: Bulkhead,
        degrade: Degrade,
    }
}

raw_table! {
    /// `[breaker.bulkhead]`: in-flight caps.
    pub struct Bulkhead {
        max_in_flight: u32,
        max_in_flight_per_tenant: u32,
        /// `[breaker.bulkhead.tenants]`: `tenant = cap`.
        tenants: Map<u32>,
        queue: u32,
        max_wait: Duration,
    }
}

keywords!(DegradeActionKind { "fail-fast" => FailFast, "fallback-model" => FallbackModel, "static" => Static });

raw_table! {
    /// `[breaker.degrade]`: the answer when a request is turned away.
    pub struct Degrade {
        action: DegradeActionKind,
        fallback_model: String,
        fallback_backend: String,
        static_text: String,
        retry_after: Duration,
    }
}

keywords!(LargeBody { "reject" => Reject, "estimate" => Estimate });
keywords!(OverCap { "reject" => Reject, "clamp" => Clamp });
keywords!(OnStateError { "deny" => Deny, "allow" => Allow });

raw_table! {
    /// `[tokens]`: token-aware rate limiting.
    pub struct Tokens {
        enabled: bool,
        chars_per_token: f64,
        /// `[tokens.model_chars_per_token]`: `"pattern" = ratio`.
        model_chars_per_token: Map<f64>,
        default_max_tokens: u32,
        max_body: ByteSize,
        on_large_body: LargeBody,
        include_usage: bool,
        ietf_headers: bool,
        max_keys: u32,
        on_state_error: OnStateError,
        quota: Vec<Quota>,
    }
}

raw_table! {
    /// `[[tokens.quota]]`: limits per tenant × model.
    pub struct Quota {
        name: String,
        matcher = "match": Match,
        tokens: Vec<Spanned<Rate>>,
        requests: Rate,
        concurrent_streams: u32,
        max_completion_tokens: u32,
        over_cap: OverCap,
        burst: Count,
    }
}

raw_table! {
    /// `[retry]`: retry budget and policy.
    pub struct Retry {
        enabled: bool,
        budget: Ratio,
        min_retries_per_second: u32,
        ttl: Duration,
        max_retries: u32,
        retry_on: Vec<FailureKind>,
        backoff_base: Duration,
        backoff_max: Duration,
        honor_retry_after: bool,
        typical_request_tokens: u32,
    }
}

keywords!(Spill { "gradual" => Gradual, "all" => All });

raw_table! {
    /// `[failover]`: zone and region failover.
    pub struct Failover {
        enabled: bool,
        local_zone: String,
        order: Vec<Spanned<String>>,
        min_healthy: Ratio,
        max_utilization: Ratio,
        spill: Spill,
        failback_after: Duration,
        probe_interval: Duration,
        cross_region: bool,
    }
}
