//! `[outlier]` in the rendered Envoy: sluice's endpoint picking, or Envoy's
//! own outlier detection for side-by-side drills.
//!
//! sluice ejects endpoints itself: `sluice.wasm` names the endpoint a
//! request goes to (then its fallbacks) in [`DESTINATION_HEADER`], which the
//! cluster's `override_host` load balancing policy follows, one entry per
//! attempt; the engine sets the router's retry and per-try headers itself,
//! per request. Each attempt's outcome is observed where it happens, by the
//! module as the cluster's upstream filter. Envoy 1.40 behaviour this relies
//! on is listed in filters/README.md ("Per-attempt visibility").
//!
//! `--native-outlier` renders instead what a user would write with Envoy
//! alone from the same section: `outlier_detection` on the clusters and a
//! route retry policy that moves to another host. Envoy has no counterpart
//! for the latency detectors, phi accrual or the 429 cool-down, so those keys
//! are not rendered, and the filter is given the policy without `[outlier]`
//! so that it does not act on outliers too.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_core::config::OutlierConfig;
use sluice_core::units::Ratio;

/// Request header naming the endpoints of a request, first choice first
/// (`ip:port,ip:port,…`): the Gateway API Inference Extension's name.
pub use sluice_core::outlier::DESTINATION_HEADER;

/// How the render treats a backend's `[outlier]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierMode {
    /// Rendered as if absent: `sluice.wasm` does not enforce it yet.
    Off,
    /// sluice picks endpoints: `override_host` and the attempt filter.
    Sluice,
    /// Envoy's own `outlier_detection` and route retries (`--native-outlier`).
    Native,
}

/// Load balancing of a cluster whose endpoints sluice picks: the endpoint
/// named in [`DESTINATION_HEADER`] (each retry takes the next entry), else,
/// when the header is absent or names no endpoint of the cluster, least
/// request, which suits requests as uneven as LLM calls better than round
/// robin.
pub fn override_host_policy() -> Value {
    json!({ "policies": [{ "typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": [{ "header": DESTINATION_HEADER }],
            "fallback_policy": { "policies": [{ "typed_extension_config": {
                "name": "envoy.load_balancing_policies.least_request",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
                }
            }}]}
        }
    }}]})
}

/// Retries in flight Envoy allows on a cluster `[outlier]` retries on: its
/// request limit (`max_requests`' default).
pub const MAX_RETRIES_IN_FLIGHT: u32 = 1024;

/// The circuit breaker of a cluster `[outlier]` retries on, either way.
///
/// Envoy allows 3 retries in flight per cluster by default
/// (`max_retries`); past that a failed attempt is not retried and its
/// failure reaches the client (`upstream_rq_retry_overflow`): a 429 the
/// next endpoint would have answered, or a 504 at the first-token deadline.
/// A retry stays in flight for as long as the stream it moved lasts, so LLM
/// traffic reaches 3 at once as soon as one endpoint of a busy backend
/// turns bad (the demo's lab did with six clients). A request has one
/// attempt in flight at a time and at most `retries` retries, each on
/// another endpoint, so retries in flight never outnumber requests in
/// flight: the limit becomes the cluster's request limit. Retry budgets
/// across requests are `[retry]`'s.
pub fn retry_circuit_breaker() -> Value {
    json!({ "thresholds": [{ "priority": "DEFAULT", "max_retries": MAX_RETRIES_IN_FLIGHT }] })
}

/// Envoy's `outlier_detection` from the section's keys.
///
/// Errors in a row (5xx, resets, connect failures and timeouts: Envoy counts
/// local-origin failures as 5xx unless told to split them), the error rate
/// over each interval, and success rate against the peers (mean − k·σ),
/// each as the policy sets it (0 disables). `failure_percentage_minimum_hosts`
/// is 1 (Envoy's default, 5, would silently disable the rate for smaller
/// pools, which the policy does not say).
pub fn native_outlier_detection(o: &OutlierConfig) -> Value {
    let mut detection = json!({
        "interval": duration(o.interval),
        "base_ejection_time": duration(o.base_ejection_time),
        "max_ejection_time": duration(o.max_ejection_time),
        "max_ejection_percent": percent(o.max_ejection),
        "failure_percentage_threshold": percent(o.failure_rate),
        "failure_percentage_request_volume": o.min_requests,
        "failure_percentage_minimum_hosts": 1,
        "enforcing_failure_percentage": if o.failure_rate.get() > 0.0 { 100 } else { 0 },
        "enforcing_success_rate": if o.success_rate_stdev > 0.0 { 100 } else { 0 },
        "success_rate_minimum_hosts": o.min_hosts,
        "success_rate_request_volume": o.min_requests,
        "success_rate_stdev_factor": (o.success_rate_stdev * 1000.0).round() as u32,
    });
    if o.consecutive_errors == 0 {
        detection["enforcing_consecutive_5xx"] = json!(0);
    } else {
        detection["consecutive_5xx"] = json!(o.consecutive_errors);
        detection["enforcing_consecutive_5xx"] = json!(100);
    }
    detection
}

/// The route retry policy that goes with native outlier detection: what
/// sluice's engine asks of the router per request, written once for the
/// route. `retries` retries, each on a host not tried yet, for 5xx, resets,
/// connect failures and 429s; with a `first_token_timeout`, that as the
/// `per_try_timeout`.
///
/// Natively a per-try timeout stops at the response headers, which an LLM
/// server sends before the first token of a stream: it catches an endpoint
/// that sends nothing (a blackhole), not one that stalls after its headers
/// (see filters/README.md). It also applies to non-streaming requests, whose
/// headers come with the whole answer: a user who sets it accepts that a
/// long non-streaming generation is cut at it.
pub fn native_retry_policy(o: &OutlierConfig) -> Value {
    let mut policy = json!({
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": 2,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            }
        }],
        // Envoy's default re-picks once when the predicate refuses a host; a
        // few more keep a small pool from landing on a tried host again.
        "host_selection_retry_max_attempts": 3,
    });
    policy["num_retries"] = json!(o.retries);
    if !o.first_token_timeout.is_zero() {
        policy["per_try_timeout"] = json!(duration(o.first_token_timeout));
    }
    policy
}

/// A protobuf JSON duration: `"10s"`, `"0.250s"`.
fn duration(d: Duration) -> String {
    match d.subsec_millis() {
        0 => format!("{}s", d.as_secs()),
        ms => format!("{}.{ms:03}s", d.as_secs()),
    }
}

/// A ratio as Envoy's whole percentage (`UInt32`, 0–100), rounded.
fn percent(r: Ratio) -> u32 {
    // In [0, 100] by construction of `Ratio`.
    (r.get() * 100.0).round().clamp(0.0, 100.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        let text = r#"
            [[backend]]
            name = "b"
            models = ["*"]
            [[backend.zone]]
            name = "z"
            [outlier]
            interval = "2500ms"
            consecutive_errors = 3
            failure_rate = "85.4%"
            min_requests = 20
            success_rate_stdev = 0
            max_ejection = "25%"
        "#;
        sluice_policy::parse_toml("t.toml", text)
            .unwrap()
            .outlier
            .unwrap()
    }

    #[test]
    fn native_detection_maps_every_key_envoy_has() {
        let d = native_outlier_detection(&config());
        assert_eq!(
            d,
            json!({
                "interval": "2.500s",
                "base_ejection_time": "30s",
                "max_ejection_time": "300s",
                "max_ejection_percent": 25,
                "consecutive_5xx": 3,
                "enforcing_consecutive_5xx": 100,
                "failure_percentage_threshold": 85,
                "failure_percentage_request_volume": 20,
                "failure_percentage_minimum_hosts": 1,
                "enforcing_failure_percentage": 100,
                "enforcing_success_rate": 0,
                "success_rate_minimum_hosts": 3,
                "success_rate_request_volume": 20,
                "success_rate_stdev_factor": 0,
            })
        );
    }

    #[test]
    fn zero_consecutive_errors_disables_that_rule() {
        let d = native_outlier_detection(&OutlierConfig {
            consecutive_errors: 0,
            ..config()
        });
        assert_eq!(d["enforcing_consecutive_5xx"], json!(0));
        assert!(d.get("consecutive_5xx").is_none());
    }
}
