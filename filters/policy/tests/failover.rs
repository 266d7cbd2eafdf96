//! `[failover]`'s compile-time rules and what `explain` says about it.
//!
//! Each error is asserted with its message, its place (line:column) and
//! its hint, as a policy author sees them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers

use std::time::Duration;

use sluice_core::config::{FailoverConfig, LocalZone};
use sluice_policy::{Capability, Diagnostics, Policy, explain, parse_json, parse_toml};

/// `line:column: message` and the hint of each error, in text order.
fn errors(text: &str) -> Vec<(String, Option<String>)> {
    let d: Diagnostics = match parse_toml("p.toml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(d) => d,
    };
    d.items
        .iter()
        .map(|item| {
            let lc = d.line_col(item).expect("a TOML error has a place");
            (
                format!("{}:{}: {}", lc.line, lc.column, item.message),
                item.hint.clone(),
            )
        })
        .collect()
}

fn valid(text: &str) -> Policy {
    parse_toml("p.toml", text).unwrap_or_else(|d| panic!("{}", d.render(false)))
}

/// The `[failover]` lines of `explain`'s summary, without their prefix.
fn failover_lines(policy: &Policy) -> Vec<String> {
    explain::summary(policy)
        .into_iter()
        .filter_map(|l| l.strip_prefix("[failover] ").map(str::to_string))
        .collect()
}

/// One backend `pool` in zones a and b of region r1 (one endpoint each) and
/// c of region r2, then `rest`.
fn three_zones(rest: &str) -> String {
    format!(
        r#"[[backend]]
name = "pool"
models = ["*"]
  [[backend.zone]]
  name = "a"
  region = "r1"
  endpoints = ["10.0.0.1:8000"]
  [[backend.zone]]
  name = "b"
  region = "r1"
  endpoints = ["10.0.0.2:8000"]
  [[backend.zone]]
  name = "c"
  region = "r2"
  endpoints = ["10.0.0.3:8000"]
{rest}"#
    )
}

const NEEDS_OUTLIER_HINT: &str = "zone health is judged from [outlier]'s endpoint records (ejections, 429 benches, attempts, time to first token)";

/// How every hint about a backend failover cannot act on ends: a backend
/// that is not meant to fail over can say so.
const SWITCH_OFF: &str =
    "switch failover off for this backend with `enabled = false` in its `[backend.failover]`";

#[test]
fn failover_without_outlier_is_an_error_at_the_backend() {
    let e = errors(&three_zones("[failover]\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0].0,
        "2:8: backend `pool` has [outlier] off, but [failover] judges the health of its zones (`a`, `b`, `c`) from it"
    );
    assert_eq!(
        e[0].1.as_deref(),
        Some(
            format!(
                "{NEEDS_OUTLIER_HINT}; add `[outlier]` (its defaults are fine), or {SWITCH_OFF}"
            )
            .as_str()
        )
    );
}

#[test]
fn outlier_switched_off_is_an_error_where_it_is_switched_off() {
    // In the backend's override.
    let text = three_zones("  [backend.outlier]\n  enabled = false\n[outlier]\n[failover]\n");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0].0,
        "17:13: backend `pool` has [outlier] off, but [failover] judges the health of its zones (`a`, `b`, `c`) from it"
    );
    assert_eq!(
        e[0].1.as_deref(),
        Some(
            format!("{NEEDS_OUTLIER_HINT}; remove `enabled = false` here, or {SWITCH_OFF}")
                .as_str()
        )
    );
    // In the global section.
    let e = errors(&three_zones("[outlier]\nenabled = false\n[failover]\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].0
            .starts_with("17:11: backend `pool` has [outlier] off"),
        "{e:?}"
    );
    assert_eq!(
        e[0].1.as_deref(),
        Some(format!("{NEEDS_OUTLIER_HINT}; remove `enabled = false` here (or switch it on in this backend's `[backend.outlier]`), or {SWITCH_OFF}").as_str())
    );
    // A backend may switch it on for itself.
    valid(&three_zones(
        "  [backend.outlier]\n  enabled = true\n[outlier]\nenabled = false\n[failover]\n",
    ));
    valid(&three_zones("  [backend.outlier]\n[failover]\n"));
}

#[test]
fn json_policies_name_the_backend_by_pointer() {
    let json = r#"{"backend": [{"name": "pool", "models": "*", "zone": [
        {"name": "a", "endpoints": ["10.0.0.1:8000"]},
        {"name": "b", "endpoints": ["10.0.0.2:8000"]}]}],
        "failover": {}}"#;
    let d = parse_json("plugin", json).unwrap_err();
    assert_eq!(d.items.len(), 1);
    assert_eq!(d.items[0].loc.pointer, "/backend/0/name");
    assert!(d.items[0].message.contains("[outlier] off"));
}

/// Backends failover has nothing to do for need no `[outlier]`; explain
/// says why they are left alone.
#[test]
fn a_backend_with_fewer_than_two_zones_with_endpoints_is_left_alone() {
    let text = r#"
[[backend]]
name = "single"
models = ["a"]
  [[backend.zone]]
  name = "z1"
  endpoints = ["10.0.0.1:8000"]
[[backend]]
name = "eds"
models = ["b"]
  [[backend.zone]]
  name = "z1"
  [[backend.zone]]
  name = "z2"
[[backend]]
name = "partial"
models = ["c"]
  [[backend.zone]]
  name = "z1"
  [[backend.zone]]
  name = "z2"
  endpoints = ["10.0.0.2:8000"]
[failover]
"#;
    let policy = valid(text);
    let lines = failover_lines(&policy);
    assert!(
        lines.contains(&"backend single: one zone (z1), nothing to fail over, requests go to its zone as without [failover]".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"backend eds: no zone lists endpoints, so failover has none to name and Envoy's own balancing decides (list `endpoints`, or pass `sluice render envoy --endpoints`)".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"backend partial: only zone z2 lists endpoints, so failover has no other zone to name; the others are left to Envoy (list their `endpoints`, or pass `sluice render envoy --endpoints`)".to_string()),
        "{lines:#?}"
    );
}

#[test]
fn zones_in_two_clusters_are_an_error_at_the_cluster() {
    let text = r#"[[backend]]
name = "pool"
models = ["*"]
  [[backend.zone]]
  name = "a"
  endpoints = ["10.0.0.1:8000"]
  [[backend.zone]]
  name = "b"
  cluster = "pool-b"
  endpoints = ["10.0.0.2:8000"]
[outlier]
[failover]
"#;
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0].0,
        "9:13: backend `pool` has zones in two clusters (`a` in `pool`, `b` in `pool-b`), but [failover] needs all of a backend's zones in one"
    );
    assert_eq!(
        e[0].1.as_deref(),
        Some(
            format!("failover sends a request to another zone by naming its endpoints to the cluster's override_host load balancing, which picks only among its own cluster's endpoints; give every zone of `pool` the same `cluster` (or none: the default is the backend's name), or {SWITCH_OFF}").as_str()
        )
    );
    // The first zone names the odd cluster: the error points there.
    let text = text.replace("  cluster = \"pool-b\"\n", "").replace(
        "  name = \"a\"\n",
        "  name = \"a\"\n  cluster = \"pool-a\"\n",
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].0.starts_with(
            "6:13: backend `pool` has zones in two clusters (`a` in `pool-a`, `b` in `pool`)"
        ),
        "{e:?}"
    );
    // Without [failover], zones may be separate clusters; with it, one
    // named cluster for all zones is fine.
    valid(&text.replace("[failover]\n", ""));
    valid(&text.replace(
        "  name = \"b\"\n",
        "  name = \"b\"\n  cluster = \"pool-a\"\n",
    ));
}

#[test]
fn a_zone_named_twice_in_order_is_an_error_at_the_second() {
    let e = errors(&three_zones(
        "[outlier]\n[failover]\norder = [\"b\", \"a\", \"b\"]\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].0, "18:20: zone `b` is named twice in `order`");
    assert_eq!(
        e[0].1.as_deref(),
        Some("a zone has one place in the order of preference; remove one of them")
    );
}

#[test]
fn unknown_zones_in_local_zone_and_order_are_errors_with_suggestions() {
    // A second backend repeats zone `a`: the list of known zones names it once.
    let text = three_zones(
        "[[backend]]\nname = \"small\"\nmodels = [\"s\"]\n  [[backend.zone]]\n  name = \"a\"\n[outlier]\n[failover]\nlocal_zone = \"zone-a\"\norder = [\"bb\", \"x\"]\n",
    );
    let e = errors(&text);
    assert_eq!(
        e,
        [
            (
                "23:14: unknown zone `zone-a`".to_string(),
                Some("declared: a, b, c".to_string())
            ),
            (
                "24:10: unknown zone `bb`".to_string(),
                Some("did you mean `b`?".to_string())
            ),
            (
                "24:16: unknown zone `x`".to_string(),
                Some("declared: a, b, c".to_string())
            ),
        ]
    );
}

#[test]
fn the_local_zone_may_also_appear_in_order_and_auto_may_stay_in_its_region() {
    valid(&three_zones(
        "[outlier]\n[failover]\nlocal_zone = \"a\"\norder = [\"a\", \"c\"]\n",
    ));
    let policy = valid(&three_zones(
        "[outlier]\n[failover]\nlocal_zone = \"auto\"\ncross_region = false\n",
    ));
    let lines = failover_lines(&policy);
    assert!(
        lines.iter().any(|l| l.starts_with("backend pool: zone order: the proxy's zone")
            && l.contains("then the other zones of the proxy's region, never another region's (cross_region = false; `order` included); zones by region: r1: a, b; r2: c")),
        "{lines:#?}"
    );
}

#[test]
fn min_healthy_is_above_zero_and_at_most_all() {
    let e = errors(&three_zones(
        "[outlier]\n[failover]\nmin_healthy = \"0%\"\n",
    ));
    assert_eq!(
        e,
        [(
            "18:15: `min_healthy` must be above 0%, found 0%".to_string(),
            None
        )]
    );
    let e = errors(&three_zones(
        "[outlier]\n[failover]\nmin_healthy = \"120%\"\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0].0,
        "18:15: invalid percentage: `120%` is not between 0% and 100%"
    );
    assert_eq!(e[0].1.as_deref(), Some("write a percentage: \"20%\""));
    let policy = valid(&three_zones(
        "[outlier]\n[failover]\nmin_healthy = \"100%\"\n",
    ));
    assert_eq!(policy.failover.unwrap().min_healthy.get(), 1.0);
}

#[test]
fn every_error_of_a_file_comes_at_once() {
    let text = r#"[[backend]]
name = "pool"
models = ["*"]
  [[backend.zone]]
  name = "a"
  endpoints = ["10.0.0.1:8000"]
  [[backend.zone]]
  name = "b"
  cluster = "other"
  endpoints = ["10.0.0.2:8000"]
[failover]
order = ["a", "a"]
"#;
    let e: Vec<String> = errors(text).into_iter().map(|(m, _)| m).collect();
    assert_eq!(
        e,
        [
            "2:8: backend `pool` has [outlier] off, but [failover] judges the health of its zones (`a`, `b`) from it",
            "9:13: backend `pool` has zones in two clusters (`a` in `pool`, `b` in `other`), but [failover] needs all of a backend's zones in one",
            "12:15: zone `a` is named twice in `order`",
        ]
    );
}

#[test]
fn failover_is_enforced_and_learns_from_attempts() {
    assert!(Capability::Failover.is_enforced());
    assert!(Capability::Failover.learns_from_attempts());
    let policy = valid(&three_zones("[outlier]\n[failover]\n"));
    for line in explain::summary(&policy) {
        assert!(!line.contains("NOT ENFORCED"), "{line}");
    }
}

#[test]
fn explain_gives_a_named_local_zone_s_order_with_regions() {
    let policy = valid(&three_zones(
        "[outlier]\n[failover]\nlocal_zone = \"b\"\norder = [\"c\"]\n",
    ));
    let lines = failover_lines(&policy);
    assert!(
        lines.contains(
            &"backend pool: zone order: b (r1) [local_zone], then c (r2) [order], then a (r1) [local region]".to_string()
        ),
        "{lines:#?}"
    );
    // Staying in the region drops the other region, `order` included.
    let policy = valid(&three_zones(
        "[outlier]\n[failover]\nlocal_zone = \"b\"\norder = [\"c\"]\ncross_region = false\n",
    ));
    assert!(
        failover_lines(&policy).contains(
            &"backend pool: zone order: b (r1) [local_zone], then a (r1) [local region]; never c (r2) (another region, cross_region = false)".to_string()
        ),
        "{:#?}",
        failover_lines(&policy)
    );
    // Without `order`: the local region, then the others.
    let policy = valid(&three_zones("[outlier]\n[failover]\nlocal_zone = \"c\"\n"));
    assert!(
        failover_lines(&policy).contains(
            &"backend pool: zone order: c (r2) [local_zone], then a (r1) [other region], then b (r1) [other region]".to_string()
        ),
        "{:#?}",
        failover_lines(&policy)
    );
}

#[test]
fn explain_gives_the_triggers_with_their_numbers() {
    let policy = valid(&three_zones(
        r#"  [backend.outlier]
  latency_factor = 2.5
  ttft_floor = "300ms"
[failover]
min_healthy = "60%"
max_utilization = "80%"
failback_after = "45s"
probe_interval = "2s"
spill = "all"
"#,
    ));
    let lines = failover_lines(&policy);
    let all = lines.join("\n");
    for expected in [
        "x-sluice-zone: <zone>; reason=<preferred|spill|probe|panic|retry>",
        "override_host",
        "the first zone in order whose health is at least 60% takes every new request (spill = \"all\")",
        "a zone under 10% health is drained: it gets one probe request per 2s per proxy",
        "panic: requests spread over all of them (sluice_failover.<backend>.panic = 1, logged)",
        "rises only after 45s without a tick under 60%, at most once per 45s",
        "the share of its endpoints in rotation ([outlier]'s ejections and 429 benches)",
        "(1 − the share of its recent attempts that failed or got 429)",
        "quota (1 up to 80% use, falling to 0 at 100%; use is what the provider reports (x-ratelimit-remaining-*/-limit-*, anthropic-ratelimit-*-remaining/-limit); no zone gives requests_per_minute or tokens_per_minute)",
        "latency (0 when its time to first token is over 2.5× the best other zone's and over 300ms: [outlier]'s latency_factor and ttft_floor)",
    ] {
        assert!(all.contains(expected), "no `{expected}` in\n{all}");
    }
    // Gradual spill, and a zone's own quota.
    let text = three_zones("[outlier]\nlatency_factor = 0.0\n[failover]\n").replace(
        "  name = \"a\"\n",
        "  name = \"a\"\n  requests_per_minute = 600\n  tokens_per_minute = 200000\n",
    );
    let all = failover_lines(&valid(&text)).join("\n");
    for expected in [
        "each zone, in order, takes min(what is left, its health / 71%) of new requests (spill = \"gradual\", Envoy's priority load)",
        "use is the larger of what the provider reports (x-ratelimit-remaining-*/-limit-*, anthropic-ratelimit-*-remaining/-limit) and this proxy's use of the zone's requests_per_minute / tokens_per_minute (a: 600 requests/min, 200k tokens/min)",
        "latency (not counted: [outlier]'s latency_factor is 0)",
    ] {
        assert!(all.contains(expected), "no `{expected}` in\n{all}");
    }
}

/// What explain prints reads back as the same policy, zone quotas and
/// every failover key included.
#[test]
fn the_effective_policy_keeps_every_failover_value() {
    let text = three_zones(
        "[outlier]\n[failover]\nlocal_zone = \"b\"\norder = [\"c\", \"a\"]\nspill = \"all\"\ncross_region = false\nprobe_interval = \"250ms\"\n",
    )
    .replace("  name = \"c\"\n", "  name = \"c\"\n  requests_per_minute = 60\n  tokens_per_minute = 90000\n");
    let policy = valid(&text);
    let effective = explain::effective_toml(&policy).unwrap();
    assert_eq!(
        parse_toml("effective.toml", &effective).unwrap(),
        policy,
        "{effective}"
    );
}

/// A failover backend `pool` (zones a and b, `[backend.outlier]`) next to a
/// plain two-zone backend `primary` without `[outlier]`, then `rest`.
fn pool_and_primary(primary_rest: &str, rest: &str) -> String {
    format!(
        r#"[[backend]]
name = "pool"
models = ["pool-*"]
  [[backend.zone]]
  name = "a"
  region = "r1"
  endpoints = ["10.0.0.1:8000"]
  [[backend.zone]]
  name = "b"
  region = "r1"
  endpoints = ["10.0.0.2:8000"]
  [backend.outlier]
[[backend]]
name = "primary"
models = ["*"]
  [[backend.zone]]
  name = "a"
  region = "r1"
  endpoints = ["10.0.1.1:8000"]
  [[backend.zone]]
  name = "b"
  region = "r1"
  endpoints = ["10.0.1.2:8000"]
{primary_rest}[failover]
local_zone = "a"
{rest}"#
    )
}

const PRIMARY_OFF: &str = "  [backend.failover]\n  enabled = false\n";

#[test]
fn a_plain_multi_zone_backend_switched_out_of_failover_needs_no_outlier() {
    let policy = valid(&pool_and_primary(PRIMARY_OFF, ""));
    let pool = policy.backend("pool").unwrap();
    let primary = policy.backend("primary").unwrap();
    assert_eq!(pool.failover, policy.failover);
    assert!(pool.failover.is_some());
    assert_eq!(primary.failover, None);
    assert!(Capability::Failover.is_enabled_in(&policy));
    let lines = failover_lines(&policy);
    assert!(
        lines.contains(
            &"failover off for backend primary (enabled = false in its [backend.failover])"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"backend pool: zone order: a (r1) [local_zone], then b (r1) [local region]"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("backend primary")),
        "{lines:#?}"
    );
    // Switched off, its zones may also be separate clusters.
    valid(&pool_and_primary(PRIMARY_OFF, "").replace(
        "  endpoints = [\"10.0.1.2:8000\"]\n",
        "  endpoints = [\"10.0.1.2:8000\"]\n  cluster = \"primary-b\"\n",
    ));
}

#[test]
fn without_switching_it_out_the_plain_backend_is_an_error_at_its_name() {
    let e = errors(&pool_and_primary("", ""));
    assert_eq!(
        e,
        [(
            "14:8: backend `primary` has [outlier] off, but [failover] judges the health of its zones (`a`, `b`) from it".to_string(),
            Some(format!(
                "{NEEDS_OUTLIER_HINT}; add `[outlier]` (its defaults are fine), or {SWITCH_OFF}"
            ))
        )]
    );
    // `enabled = true` in its own section is no way out.
    let e = errors(&pool_and_primary(
        "  [backend.failover]\n  enabled = true\n",
        "",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].0.starts_with("14:8: backend `primary`"), "{e:?}");
}

#[test]
fn a_backend_override_shows_in_its_effective_failover_only() {
    let text = pool_and_primary(PRIMARY_OFF, "failback_after = \"45s\"\n").replace(
        "  [backend.outlier]\n",
        "  [backend.outlier]\n  [backend.failover]\n  failback_after = \"5s\"\n",
    );
    let policy = valid(&text);
    let global = policy.failover.clone().unwrap();
    let pool = policy.backend("pool").unwrap().failover.clone().unwrap();
    assert_eq!(global.failback_after, Duration::from_secs(45));
    assert_eq!(pool.failback_after, Duration::from_secs(5));
    // Keys the backend does not set come from the global section.
    assert_eq!(
        pool,
        FailoverConfig {
            failback_after: Duration::from_secs(5),
            ..global
        }
    );
    // Explain gives the backend its own numbers, after the global ones.
    let lines = failover_lines(&policy);
    assert!(
        lines.iter().any(|l| !l.starts_with("backend ")
            && l.contains("rises only after 45s without a tick under 71%")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("backend pool: ")
            && l.contains("rises only after 5s without a tick under 71%, at most once per 5s")),
        "{lines:#?}"
    );
    // The effective policy prints it in the backend's section and reads
    // back as the same policy.
    let effective = explain::effective_toml(&policy).unwrap();
    assert!(
        effective.contains("[backend.failover]\nlocal_zone = \"a\"\nmin_healthy = \"71%\""),
        "{effective}"
    );
    assert_eq!(
        parse_toml("effective.toml", &effective).unwrap(),
        policy,
        "{effective}"
    );
}

#[test]
fn a_backend_may_fail_over_without_the_global_section() {
    let text = pool_and_primary("", "")
        .replace("[failover]\nlocal_zone = \"a\"\n", "")
        .replace(
            "  [backend.outlier]\n",
            "  [backend.outlier]\n  [backend.failover]\n  order = [\"b\"]\n",
        );
    let policy = valid(&text);
    assert_eq!(policy.failover, None);
    assert!(policy.backend("primary").unwrap().failover.is_none());
    assert_eq!(
        policy
            .backend("pool")
            .unwrap()
            .failover
            .as_ref()
            .unwrap()
            .order,
        ["b"]
    );
    assert!(Capability::Failover.is_enabled_in(&policy));
    let lines = failover_lines(&policy);
    assert!(
        lines.contains(&"failover off for backend primary".to_string()),
        "{lines:#?}"
    );
    // With no global section, the backend's spill numbers are its own line.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("backend pool: each zone, in order, takes")),
        "{lines:#?}"
    );
    let effective = explain::effective_toml(&policy).unwrap();
    assert_eq!(parse_toml("effective.toml", &effective).unwrap(), policy);
    // A global section switched off stays off unless a backend switches it on.
    let off = pool_and_primary("", "enabled = false\n");
    let policy = valid(&off);
    assert!(!Capability::Failover.is_enabled_in(&policy));
    let on = off.replace(
        "  [backend.outlier]\n",
        "  [backend.outlier]\n  [backend.failover]\n  enabled = true\n",
    );
    let policy = valid(&on);
    assert_eq!(
        policy
            .backend("pool")
            .unwrap()
            .failover
            .as_ref()
            .unwrap()
            .local_zone,
        LocalZone::Named("a".into())
    );
    assert!(policy.backend("primary").unwrap().failover.is_none());
}

#[test]
fn zones_a_backend_section_names_are_checked_and_inherited_errors_come_once() {
    let text = pool_and_primary(PRIMARY_OFF, "order = [\"x\"]\n").replace(
        "  [backend.outlier]\n",
        "  [backend.outlier]\n  [backend.failover]\n  local_zone = \"bb\"\n",
    );
    let e = errors(&text);
    assert_eq!(
        e,
        [
            (
                "14:16: unknown zone `bb`".to_string(),
                Some("did you mean `b`?".to_string())
            ),
            (
                "30:10: unknown zone `x`".to_string(),
                Some("declared: a, b".to_string())
            ),
        ]
    );
}
