//! `[retry]` in the rendered Envoy: sluice's retry budget, or Envoy's own
//! retry policy and retry budget for side-by-side drills.
//!
//! sluice bounds retries with a budget per backend × zone (a share of the
//! requests of the last `ttl`, plus a floor; `sluice_core::retry`):
//! `sluice.wasm` sets each request's `x-envoy-max-retries` and
//! `x-envoy-retry-on` from it, the per-attempt instance on every cluster
//! deposits first attempts and charges retries, and a failure that reaches
//! the client while the budget is spent says `x-should-retry: false`. The
//! route keeps what Envoy cannot take per request ([`route_policy`]).
//!
//! `--native-retry` renders instead what a user would write with Envoy
//! alone from the same section ([`native_retry_policy`],
//! [`native_circuit_breaker`]): a route retry policy with the section's
//! conditions and `max_retries`, and Envoy's retry budget on the clusters.
//! Envoy's budget is a different thing: it caps retries *in flight* at
//! `budget_percent` of the requests in flight (at least
//! `min_retry_concurrency`), so it bounds concurrency, not how many
//! retries the upstream receives over time, and it says nothing to
//! clients: their SDKs retry on top. The filter is given the policy
//! without `[retry]`, so that it does not budget retries too.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_core::config::RetryConfig;

/// How the render treats a backend's `[retry]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryMode {
    /// Rendered as if absent: `sluice.wasm` does not enforce it.
    Off,
    /// sluice's budget: per-request router headers, the route's back-off.
    Sluice,
    /// Envoy's own route retries and retry budget (`--native-retry`).
    Native,
}

/// Envoy's default `min_retry_concurrency`, and the least rendered.
pub const MIN_RETRY_CONCURRENCY: u32 = 3;

/// The route's part of sluice's `[retry]`: what Envoy cannot take per
/// request.
///
/// sluice.wasm sets each request's retry count and conditions from the
/// budget (`x-envoy-max-retries`, `x-envoy-retry-on`); the route keeps
/// none of its own (`num_retries: 0`: a request sluice did not plan is not
/// retried), picks a host not tried yet for each retry (a 429 is never
/// retried on the endpoint that sent it), and backs off as the policy says,
/// waiting for an upstream's `retry-after` when `honor_retry_after` is set.
pub fn route_policy(r: &RetryConfig) -> Value {
    let mut policy = common(r);
    policy["retry_on"] = json!("5xx");
    policy["num_retries"] = json!(0);
    policy
}

/// The route retry policy Envoy alone would run for `[retry]`.
///
/// `retry_on` in Envoy's words as sluice's plan writes them
/// ([`sluice_core::retry::plan`]; `timeout` is retried as `reset`, which
/// covers a per-try timeout, since a route cannot tell streams apart),
/// with `retriable_status_codes: [429]` when `429` is listed;
/// `num_retries` is `max_retries` (0 when no condition is left), each
/// retry on a host not tried yet, with the section's back-off and
/// `retry-after`. `per_try_timeout` comes from `--native-outlier`'s
/// `first_token_timeout`, when there is one.
///
/// With sluice's own `[outlier]` (no `--native-outlier`), sluice.wasm still
/// sets `x-envoy-max-retries` (the fallbacks it named) and adds its
/// conditions per request, which Envoy's router prefers to the route's.
pub fn native_retry_policy(r: &RetryConfig, per_try_timeout: Option<Duration>) -> Value {
    let plan = sluice_core::retry::plan(r, f64::INFINITY, true, 0);
    let mut policy = common(r);
    policy["retry_on"] = json!(plan.retry_on);
    policy["num_retries"] = json!(plan.max_retries);
    if plan.retriable_status_codes.is_some() {
        policy["retriable_status_codes"] = json!([429]);
    }
    if let Some(t) = per_try_timeout.filter(|t| !t.is_zero()) {
        policy["per_try_timeout"] = json!(seconds(t));
    }
    policy
}

/// Envoy's retry budget for the cluster of a `[retry]` backend: retries in
/// flight at most `budget` of the requests in flight (active and pending),
/// and never fewer than `max(3, min_retries_per_second)` (Envoy's default
/// floor is 3; sluice's floor is a rate, the nearest Envoy has is a count
/// in flight). Envoy ignores the `max_retries` threshold when a budget is
/// set.
pub fn native_circuit_breaker(r: &RetryConfig) -> Value {
    json!({ "thresholds": [{
        "priority": "DEFAULT",
        "retry_budget": {
            "budget_percent": { "value": budget_percent(r) },
            "min_retry_concurrency": r.min_retries_per_second.max(MIN_RETRY_CONCURRENCY),
        },
    }]})
}

/// What both renders share: a host not tried yet for each retry, the
/// back-off, and the upstream's `retry-after`.
fn common(r: &RetryConfig) -> Value {
    let mut policy = json!({
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            }
        }],
        // Envoy's default re-picks once when the predicate refuses a host; a
        // few more keep a small pool from landing on a tried host again.
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {
            "base_interval": seconds(r.backoff_base),
            "max_interval": seconds(r.backoff_max),
        },
    });
    if r.honor_retry_after {
        policy["rate_limited_retry_back_off"] = json!({
            "reset_headers": [{ "name": "retry-after", "format": "SECONDS" }],
            "max_interval": seconds(r.backoff_max.max(Duration::from_secs(1))),
        });
    }
    policy
}

/// A protobuf JSON duration in seconds: `"0.025s"`, `"1s"`.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// The budget as Envoy's `Percent` value (0–100), without the float noise
/// of `0.07 × 100`.
fn budget_percent(r: &RetryConfig) -> f64 {
    (r.budget.get() * 100.0 * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(section: &str) -> RetryConfig {
        let text = format!(
            r#"
            [[backend]]
            name = "b"
            models = ["*"]
            [[backend.zone]]
            name = "z"
            [retry]
            {section}
        "#
        );
        sluice_policy::parse_toml("t.toml", &text)
            .unwrap()
            .retry
            .unwrap()
    }

    fn predicate(policy: &Value) -> &Value {
        &policy["retry_host_predicate"][0]["name"]
    }

    #[test]
    fn the_sluice_route_retries_nothing_it_did_not_plan() {
        let p = route_policy(&config(""));
        assert_eq!(p["num_retries"], 0);
        assert_eq!(p["retry_on"], "5xx");
        assert_eq!(*predicate(&p), "envoy.retry_host_predicates.previous_hosts");
        assert_eq!(
            p["retry_back_off"],
            json!({ "base_interval": "0.025s", "max_interval": "0.25s" })
        );
        assert_eq!(p["rate_limited_retry_back_off"]["max_interval"], "1s");
    }

    #[test]
    fn native_defaults_are_the_sections_defaults_in_envoys_words() {
        let p = native_retry_policy(&config(""), None);
        assert_eq!(
            p,
            json!({
                "retry_on": "gateway-error,reset,connect-failure",
                "num_retries": 1,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    }
                }],
                "host_selection_retry_max_attempts": 3,
                "retry_back_off": { "base_interval": "0.025s", "max_interval": "0.25s" },
                "rate_limited_retry_back_off": {
                    "reset_headers": [{ "name": "retry-after", "format": "SECONDS" }],
                    "max_interval": "1s",
                },
            })
        );
    }

    #[test]
    fn native_maps_every_condition_like_the_plan() {
        let p = native_retry_policy(
            &config(
                r#"max_retries = 3
                retry_on = ["5xx", "429", "timeout", "reset", "connect-failure"]
                backoff_base = "100ms"
                backoff_max = "2s"
                honor_retry_after = false"#,
            ),
            Some(Duration::from_millis(1500)),
        );
        // `timeout` and `reset` are one condition for Envoy.
        assert_eq!(
            p["retry_on"],
            "5xx,retriable-status-codes,reset,connect-failure"
        );
        assert_eq!(p["retriable_status_codes"], json!([429]));
        assert_eq!(p["num_retries"], 3);
        assert_eq!(p["per_try_timeout"], "1.5s");
        assert_eq!(
            p["retry_back_off"],
            json!({ "base_interval": "0.1s", "max_interval": "2s" })
        );
        assert!(p.get("rate_limited_retry_back_off").is_none());
        assert_eq!(*predicate(&p), "envoy.retry_host_predicates.previous_hosts");
    }

    #[test]
    fn native_without_a_retriable_condition_retries_nothing() {
        let p = native_retry_policy(&config("max_retries = 0\nretry_on = []"), None);
        assert_eq!(p["num_retries"], 0);
        assert_eq!(p["retry_on"], "");
        assert!(p.get("retriable_status_codes").is_none());
        let zero_timeout = native_retry_policy(&config(""), Some(Duration::ZERO));
        assert!(zero_timeout.get("per_try_timeout").is_none());
    }

    #[test]
    fn native_budget_is_envoys_share_of_requests_in_flight() {
        assert_eq!(
            native_circuit_breaker(&config("")),
            json!({ "thresholds": [{
                "priority": "DEFAULT",
                "retry_budget": {
                    "budget_percent": { "value": 20.0 },
                    "min_retry_concurrency": 10,
                },
            }]})
        );
        let small = native_circuit_breaker(&config(
            r#"budget = "7%"
            min_retries_per_second = 1"#,
        ));
        let budget = &small["thresholds"][0]["retry_budget"];
        assert_eq!(budget["budget_percent"]["value"], 7.0);
        assert_eq!(budget["min_retry_concurrency"], MIN_RETRY_CONCURRENCY);
    }
}
