//! `[failover]` in the rendered Envoy: the proxy's own locality
//! (`--node-zone`), and Envoy's own zone failover for side-by-side drills
//! (`--native-failover`).
//!
//! sluice reads the zone it runs in from the bootstrap's `node.locality`
//! (`local_zone = "auto"`). Istio writes that itself for every sidecar; a
//! plain Envoy has none unless the bootstrap says so, which is what
//! `--node-zone` does (the region comes from the policy's zone of that name).
//!
//! `--native-failover` renders instead the strongest zone failover a user
//! could write with Envoy alone, so that a drill can run both on the same
//! traffic:
//! - each zone of a cluster becomes its own priority, in the order the
//!   policy prefers ([`zone_order`]), so traffic stays in the first healthy
//!   zone and spills to the next in proportion to the missing health, under
//!   Envoy's default overprovisioning factor (1.4, written out);
//! - health is what Envoy can observe: `outlier_detection` on real traffic
//!   ([`native_outlier_detection`]) and an active HTTP health check of
//!   `/health` ([`health_checks`]), handed to the workers as soon as it
//!   changes ([`common_lb_config`]);
//! - a failed attempt is retried on another host, and once a zone's
//!   endpoints have been tried, in the next priority ([`native_retry_policy`]).
//!
//! What Envoy has no counterpart for is left out: provider quotas and their
//! rate-limit headers, latency compared across zones, a dwell before
//! failing back, probes of a drained zone. `[outlier]` is replaced too
//! (Envoy's outlier detection is part of its failover), so `sluice.wasm` is
//! given the policy without either section.

use serde_json::{Value, json};
use sluice_core::config::{FailoverConfig, LocalZone, Policy};

/// How the render treats `[failover]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverMode {
    /// Nothing rendered for it: `sluice.wasm` enforces it (or does not yet).
    Sluice,
    /// Envoy's own priorities, health checks and retries (`--native-failover`).
    Native,
}

/// Envoy's default overprovisioning factor (×100): a priority keeps all its
/// traffic until fewer than 1/1.4 ≈ 71% of its endpoints are healthy, then
/// spills the missing share to the next.
pub const OVERPROVISIONING_FACTOR: u32 = 140;

/// The `node.locality` of a proxy in `zone`, its region from the policy.
///
/// A zone name several backends declare is one place; if they disagree on
/// its region, the first backend's wins, with a warning.
pub fn node_locality(policy: &Policy, zone: &str) -> anyhow::Result<Value> {
    let mut regions = policy
        .backends
        .iter()
        .flat_map(|b| &b.zones)
        .filter(|z| z.name == zone)
        .map(|z| z.region.as_str());
    let Some(region) = regions.next() else {
        let mut known: Vec<&str> = policy
            .backends
            .iter()
            .flat_map(|b| b.zones.iter().map(|z| z.name.as_str()))
            .collect();
        known.sort_unstable();
        known.dedup();
        anyhow::bail!(
            "--node-zone `{zone}`: no backend of the policy has a zone `{zone}` (its zones: {})",
            known.join(", ")
        );
    };
    if regions.any(|other| other != region) {
        eprintln!(
            "warning: --node-zone `{zone}`: backends put zone `{zone}` in different regions; the node's region is `{region}`, the first's"
        );
    }
    Ok(json!({ "region": region, "zone": zone }))
}

/// Every zone of the policy in the order failover prefers them: the local
/// zone (`node_zone`, else a named `local_zone`), then `order`, then the
/// rest in policy order, those in the first zone's region before the others.
/// Without `cross_region`, zones outside the first zone's region are left
/// out.
pub fn zone_order(policy: &Policy, f: &FailoverConfig, node_zone: Option<&str>) -> Vec<String> {
    // (zone, region) once each, in policy order.
    let mut all: Vec<(&str, &str)> = Vec::new();
    for z in policy.backends.iter().flat_map(|b| &b.zones) {
        if !all.iter().any(|(name, _)| *name == z.name) {
            all.push((z.name.as_str(), z.region.as_str()));
        }
    }
    let region_of = |zone: &str| all.iter().find(|(n, _)| *n == zone).map(|(_, r)| *r);
    let local = node_zone.or(match &f.local_zone {
        LocalZone::Named(z) => Some(z.as_str()),
        LocalZone::Auto => None,
    });
    let mut ordered: Vec<&str> = Vec::new();
    for zone in local.into_iter().chain(f.order.iter().map(String::as_str)) {
        if region_of(zone).is_some() && !ordered.contains(&zone) {
            ordered.push(zone);
        }
    }
    let home = ordered
        .first()
        .and_then(|z| region_of(z))
        .or_else(|| all.first().map(|(_, r)| *r));
    let rest = |same: bool| {
        all.iter()
            .filter(move |(_, r)| (Some(*r) == home) == same)
            .map(|(n, _)| *n)
    };
    for zone in rest(true).chain(rest(false)) {
        if !ordered.contains(&zone) {
            ordered.push(zone);
        }
    }
    ordered
        .into_iter()
        .filter(|z| f.cross_region || region_of(z) == home)
        .map(str::to_string)
        .collect()
}

/// The priority of each zone of one cluster: its rank, among the cluster's
/// zones, in `order` (0 = preferred; dense, as Envoy wants priorities
/// without gaps). `None` for a zone `order` leaves out (another region,
/// without `cross_region`).
pub fn priorities<'z>(zones: &[&'z str], order: &[String]) -> Vec<(&'z str, Option<u32>)> {
    let mut ranked: Vec<&str> = order
        .iter()
        .map(String::as_str)
        .filter(|o| zones.contains(o))
        .collect();
    ranked.dedup();
    zones
        .iter()
        .map(|z| {
            let p = ranked
                .iter()
                .position(|r| r == z)
                .and_then(|p| u32::try_from(p).ok());
            (*z, p)
        })
        .collect()
}

/// Envoy's outlier detection as native failover needs it.
///
/// - `consecutive_5xx: 5`: five failures in a row eject an endpoint at
///   once (inline, not at the next interval), few enough to empty a zone
///   that fails every request within a few requests per endpoint;
/// - `interval: 1s`: ejections are reviewed (and ended) every second;
/// - `base_ejection_time: 30s`: an ejected endpoint stays out as long as
///   sluice waits before failing back (`failback_after`'s default), longer
///   on each new ejection;
/// - `max_ejection_percent: 100`: Envoy's default, 10%, would never eject
///   a whole zone, and a zone whose endpoints cannot all go never fails over;
/// - `successful_active_health_check_uneject_host: false`: otherwise the
///   next passing `/health` check brings back an endpoint whose health page
///   answers while its inference fails (a gray failure), every second.
pub fn native_outlier_detection() -> Value {
    json!({
        "consecutive_5xx": 5,
        "interval": "1s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 100,
        "successful_active_health_check_uneject_host": false,
    })
}

/// The cluster's `common_lb_config` under native failover.
///
/// `update_merge_window: 0s`: Envoy merges the health changes of a cluster
/// that come within a second of each other (the default window) and hands
/// them to the workers at the window's end, which holds an ejection back:
/// measured in Envoy 1.40, a zone whose two endpoints were both ejected
/// within 0.35 s of a fault kept receiving new requests until 1.25 s after
/// it. Delivered at once, a zone stops getting requests when its last
/// endpoint is ejected. (The merge saves work on clusters of thousands of
/// hosts; a backend's zones hold a handful.) `healthy_panic_threshold` is
/// Envoy's default, written out: below 50% healthy over all priorities,
/// Envoy spreads over every endpoint, its counterpart of sluice's panic.
pub fn common_lb_config() -> Value {
    json!({
        "update_merge_window": "0s",
        "healthy_panic_threshold": { "value": 50.0 },
    })
}

/// An active HTTP health check of every endpoint: `GET /health` every
/// second (1 s timeout), two failures mark it unhealthy and two successes
/// healthy again. It sees a dead or unreachable server within about two
/// seconds without any traffic to it, but not one whose health page
/// answers while inference fails: that is the outlier detection's part.
///
/// `no_traffic_interval` is the interval too: Envoy's default (60 s) applies
/// until the cluster's first request, so an endpoint whose first check
/// failed at start-up (a check times out while Envoy's main thread is still
/// compiling Wasm modules) would stay unhealthy for a minute, and with every
/// endpoint unhealthy the balancer panics and spreads over all zones.
pub fn health_checks() -> Value {
    json!([{
        "timeout": "1s",
        "interval": "1s",
        "no_traffic_interval": "1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "http_health_check": { "path": "/health" },
    }])
}

/// Envoy's retry priority that spreads a request's retries over the
/// priorities: after `update_frequency` attempts (2: the first try and a
/// retry on the zone's other endpoint, see `previous_hosts`), the priorities
/// tried so far are excluded, so the next retry goes to the next zone.
pub fn retry_priority() -> Value {
    json!({
        "name": "envoy.retry_priorities.previous_priorities",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
            "update_frequency": 2,
        },
    })
}

/// The route retry policy of native failover: two retries on 5xx, resets,
/// connect failures and 429s, each on a host not tried yet, moving to the
/// next zone once a zone has been tried ([`retry_priority`]). No per-try
/// timeout: the policy language has no fixed one to give.
pub fn native_retry_policy() -> Value {
    json!({
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": 2,
        "retry_host_predicate": [previous_hosts()],
        // Envoy's default re-picks once when the predicate refuses a host; a
        // few more keep a small zone from landing on a tried host again.
        "host_selection_retry_max_attempts": 3,
        "retry_priority": retry_priority(),
    })
}

/// Adds [`retry_priority`] (and the `previous_hosts` predicate, when
/// missing) to a route retry policy another section rendered (`[retry]`),
/// so its retries also move across zones.
pub fn spread_over_zones(policy: &mut Value) {
    policy["retry_priority"] = retry_priority();
    let has_previous_hosts = policy["retry_host_predicate"]
        .as_array()
        .is_some_and(|p| p.iter().any(|h| h["name"] == previous_hosts()["name"]));
    if !has_previous_hosts {
        policy["retry_host_predicate"] = json!([previous_hosts()]);
    }
}

fn previous_hosts() -> Value {
    json!({
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONES: &str = r#"
[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region-1"
  [[backend.zone]]
  name = "zone-c"
  region = "region-2"
  [[backend.zone]]
  name = "zone-b"
  region = "region-1"

[[backend]]
name = "small"
models = ["small"]
  [[backend.zone]]
  name = "zone-d"
  region = "region-2"

[outlier]
"#;

    fn policy(failover: &str) -> Policy {
        sluice_policy::parse_toml("p.toml", &format!("{ZONES}\n[failover]\n{failover}")).unwrap()
    }

    fn order(failover: &str, node_zone: Option<&str>) -> Vec<String> {
        let p = policy(failover);
        zone_order(&p, p.failover.as_ref().unwrap(), node_zone)
    }

    #[test]
    fn the_local_zone_then_order_then_the_same_region_first() {
        // Auto, no node zone: policy order, the first zone's region first.
        assert_eq!(order("", None), ["zone-a", "zone-b", "zone-c", "zone-d"]);
        // The node's zone comes first, and its region.
        assert_eq!(
            order("", Some("zone-c")),
            ["zone-c", "zone-d", "zone-a", "zone-b"]
        );
        // A named local zone, when no node zone is given.
        assert_eq!(
            order(r#"local_zone = "zone-b""#, None),
            ["zone-b", "zone-a", "zone-c", "zone-d"]
        );
        assert_eq!(
            order(r#"local_zone = "zone-b""#, Some("zone-a")),
            ["zone-a", "zone-b", "zone-c", "zone-d"]
        );
        // `order` after the local zone, then the rest.
        assert_eq!(
            order(r#"order = ["zone-d", "zone-b"]"#, Some("zone-a")),
            ["zone-a", "zone-d", "zone-b", "zone-c"]
        );
        // Without cross_region, only the local region.
        assert_eq!(
            order("cross_region = false", Some("zone-b")),
            ["zone-b", "zone-a"]
        );
    }

    #[test]
    fn each_zone_of_a_cluster_gets_its_rank() {
        let order: Vec<String> = ["zone-b", "zone-x", "zone-a", "zone-c"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            priorities(&["zone-a", "zone-b", "zone-c"], &order),
            [
                ("zone-a", Some(1)),
                ("zone-b", Some(0)),
                ("zone-c", Some(2))
            ]
        );
        assert_eq!(
            priorities(&["zone-a", "zone-d"], &order),
            [("zone-a", Some(0)), ("zone-d", None)]
        );
    }

    #[test]
    fn the_node_locality_takes_its_region_from_the_policy() {
        let p = policy("");
        assert_eq!(
            node_locality(&p, "zone-c").unwrap(),
            json!({ "region": "region-2", "zone": "zone-c" })
        );
        let err = node_locality(&p, "zone-z").unwrap_err().to_string();
        assert!(
            err.contains("no backend of the policy has a zone `zone-z`"),
            "{err}"
        );
        assert!(err.contains("zone-a, zone-b, zone-c, zone-d"), "{err}");
    }

    #[test]
    fn a_retry_policy_of_another_section_is_spread_over_the_zones() {
        let mut p = json!({ "retry_on": "5xx", "num_retries": 0 });
        spread_over_zones(&mut p);
        assert_eq!(
            p["retry_priority"]["name"],
            "envoy.retry_priorities.previous_priorities"
        );
        assert_eq!(
            p["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        let mut q = native_retry_policy();
        let before = q.clone();
        spread_over_zones(&mut q);
        assert_eq!(q, before);
    }
}
