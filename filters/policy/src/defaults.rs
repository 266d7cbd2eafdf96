//! Every default of the policy language, in one place, with where it comes from.
//!
//! Where Envoy, Linkerd/Finagle, resilience4j or Google's SRE book have a
//! well-known default for the same knob, sluice uses it; the rest are sluice's
//! own choices for LLM traffic, said so below.

use std::time::Duration;

use sluice_core::units::Ratio;

use crate::raw::{FailureKind, OnStateError};

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Header naming the tenant (sluice; the common convention).
pub const TENANT_HEADER: &str = "x-tenant-id";
/// Tenant of requests that carry no identity (sluice).
pub const TENANT_MISSING: &str = "anonymous";
/// Header naming the model when it is not read from the body (sluice).
pub const MODEL_HEADER: &str = "x-model";
/// Region of a zone that names none (sluice).
pub const REGION: &str = "default";
/// Route timeout: Envoy's 15s default cuts long generations short, so sluice
/// allows 5 minutes.
pub const BACKEND_TIMEOUT: Duration = secs(300);

/// Envoy outlier detection `interval`: the time constant of the decaying
/// request and failure counts.
pub const OUTLIER_INTERVAL: Duration = secs(10);
/// sluice: the time constant of the latency estimates. Short, so that a
/// slow endpoint is seen within seconds, not within an interval.
pub const OUTLIER_LATENCY_WINDOW: Duration = secs(2);
/// Envoy `consecutive_5xx`.
pub const OUTLIER_CONSECUTIVE_ERRORS: u32 = 5;
/// Envoy `failure_percentage_threshold`.
pub const OUTLIER_FAILURE_RATE: Ratio = Ratio::percent(85);
/// Envoy's `*_request_volume` are 50 and 100 requests per 10 s; an LLM
/// endpoint serves far fewer, longer requests.
pub const OUTLIER_MIN_REQUESTS: u32 = 20;
/// Envoy `success_rate_stdev_factor` (1900) / 1000.
pub const OUTLIER_SUCCESS_RATE_STDEV: f64 = 1.9;
/// Envoy's `success_rate_minimum_hosts` is 5; LLM backends often have 3 or 4
/// endpoints, and the median of 3 is already robust to one outlier.
pub const OUTLIER_MIN_HOSTS: u32 = 3;
/// sluice: latency above this multiple of the peers' median is an outlier.
pub const OUTLIER_LATENCY_FACTOR: f64 = 3.0;
/// sluice: latency samples before an endpoint's latency is judged.
pub const OUTLIER_MIN_SAMPLES: u32 = 5;
/// sluice: a time to first token below this is never an outlier.
pub const OUTLIER_TTFT_FLOOR: Duration = millis(200);
/// sluice: a time per output token below this is never an outlier.
pub const OUTLIER_TPOT_FLOOR: Duration = millis(20);
/// Akka's phi accrual threshold.
pub const OUTLIER_PHI_THRESHOLD: f64 = 8.0;
/// sluice: how long a 429 that names no reset time benches an endpoint.
pub const OUTLIER_COOLDOWN_429: Duration = secs(5);
/// sluice: the longest reset time an endpoint may name for itself.
pub const OUTLIER_MAX_COOLDOWN: Duration = secs(60);
/// sluice: no first-token deadline unless the policy sets one (a long
/// prompt's prefill can legitimately take seconds).
pub const OUTLIER_FIRST_TOKEN_TIMEOUT: Duration = Duration::ZERO;
/// sluice: attempts on other endpoints after a failed one.
pub const OUTLIER_RETRIES: u32 = 2;
/// Envoy `base_ejection_time`.
pub const OUTLIER_BASE_EJECTION: Duration = secs(30);
/// Envoy `max_ejection_time`.
pub const OUTLIER_MAX_EJECTION: Duration = secs(300);
/// Envoy `max_ejection_time_jitter` is absolute; sluice spreads by a share.
pub const OUTLIER_JITTER: Ratio = Ratio::percent(10);
/// Envoy `max_ejection_percent`.
pub const OUTLIER_MAX_EJECTION_SHARE: Ratio = Ratio::percent(10);
/// sluice: successful probes that return an ejected endpoint.
pub const OUTLIER_PROBES: u32 = 3;
/// sluice: time to first token above which a response is slow.
pub const SLOW_TTFT: Duration = secs(10);
/// sluice: mean time per output token above which a stream is slow
/// (5 tokens/s, well below any healthy server).
pub const SLOW_TPOT: Duration = millis(200);

/// resilience4j `failureRateThreshold`.
pub const BREAKER_FAILURE_RATE: Ratio = Ratio::percent(50);
/// resilience4j `slowCallRateThreshold`.
pub const BREAKER_SLOW_RATE: Ratio = Ratio::percent(100);
/// resilience4j `slidingWindowSize` (count-based).
pub const BREAKER_WINDOW_CALLS: u32 = 100;
/// resilience4j `minimumNumberOfCalls`.
pub const BREAKER_MIN_CALLS: u32 = 100;
/// Envoy `consecutive_5xx`, used for the consecutive mode.
pub const BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// resilience4j `waitDurationInOpenState`.
pub const BREAKER_OPEN_FOR: Duration = secs(60);
/// sluice: cap on the growing open time (5× the first).
pub const BREAKER_MAX_OPEN_FOR: Duration = secs(300);
/// resilience4j's exponential back-off multiplier for the open state.
pub const BREAKER_BACKOFF: f64 = 2.0;
/// sluice: ±10% spread so workers and proxies do not probe in lockstep.
pub const BREAKER_JITTER: Ratio = Ratio::percent(10);
/// resilience4j `permittedNumberOfCallsInHalfOpenState`.
pub const BREAKER_HALF_OPEN_PROBES: u32 = 10;
/// sluice: what counts as a failure (an upstream 429 does not, by default:
/// it usually means a quota, not a sick server).
pub const BREAKER_FAILURE_ON: [FailureKind; 4] = [
    FailureKind::Status5xx,
    FailureKind::Reset,
    FailureKind::ConnectFailure,
    FailureKind::Timeout,
];
/// Google SRE book, "Handling Overload": K = 2.
pub const ADAPTIVE_K: f64 = 2.0;
/// Google SRE book: two minutes of history.
pub const ADAPTIVE_WINDOW: Duration = secs(120);
/// Envoy admission_control `max_rejection_probability`.
pub const ADAPTIVE_MAX_REJECT: Ratio = Ratio::percent(80);
/// Envoy circuit breaker `max_requests`.
pub const BULKHEAD_MAX_IN_FLIGHT: u32 = 1024;
/// resilience4j bulkhead `maxWaitDuration` 0: no waiting.
pub const BULKHEAD_QUEUE: u32 = 0;
pub const BULKHEAD_MAX_WAIT: Duration = secs(0);
/// sluice: `retry-after` sent with fail-fast answers.
pub const DEGRADE_RETRY_AFTER: Duration = secs(5);

/// OpenAI's rule of thumb: about 4 characters per token of English text.
pub const CHARS_PER_TOKEN: f64 = 4.0;
/// sluice: completion reserved when the client sets no cap.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// sluice: request bodies buffered for inspection.
pub const MAX_BODY: u64 = 1 << 20;
/// sluice: tenant × model keys tracked at once.
pub const MAX_KEYS: u32 = 10_000;
/// sluice: a request the limiter cannot account for is turned away, so that
/// a host error or contention on shared state never admits without limit.
pub const ON_STATE_ERROR: OnStateError = OnStateError::Deny;

/// Linkerd / Finagle retry budget `retryRatio` / `percentCanRetry`.
pub const RETRY_BUDGET: Ratio = Ratio::percent(20);
/// Linkerd / Finagle `minRetriesPerSecond`.
pub const RETRY_MIN_PER_SECOND: u32 = 10;
/// Linkerd / Finagle budget `ttl`.
pub const RETRY_TTL: Duration = secs(10);
/// Envoy `num_retries`.
pub const RETRY_MAX_RETRIES: u32 = 1;
/// Envoy's `retry_on` vocabulary; sluice retries what is safe to repeat.
pub const RETRY_ON: [FailureKind; 3] = [
    FailureKind::GatewayError,
    FailureKind::Reset,
    FailureKind::ConnectFailure,
];
/// Envoy retry back-off `base_interval` (the cap defaults to 10× it, as in Envoy).
pub const RETRY_BACKOFF_BASE: Duration = millis(25);

/// Envoy's overprovisioning factor 1.4: a locality spills once fewer than
/// 1/1.4 ≈ 71% of its endpoints are healthy.
pub const FAILOVER_MIN_HEALTHY: Ratio = Ratio::percent(71);
/// sluice: quota use above which new requests spill to the next zone.
pub const FAILOVER_MAX_UTILIZATION: Ratio = Ratio::percent(90);
/// sluice: hysteresis before failing back.
pub const FAILOVER_FAILBACK_AFTER: Duration = secs(30);
/// sluice: one request per second (per proxy) tells whether a drained zone
/// recovered, at under 1% of a busy proxy's traffic.
pub const FAILOVER_PROBE_INTERVAL: Duration = secs(1);
