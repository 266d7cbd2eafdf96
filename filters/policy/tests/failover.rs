//! `[failover]`'s compile-time rules.
//!
//! Each error is asserted with its message, its place (line:column) and
//! its hint, as a policy author sees them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers

use sluice_policy::{Diagnostics, Policy, parse_json, parse_toml};

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
        Some(format!("{NEEDS_OUTLIER_HINT}; add `[outlier]`: its defaults are fine").as_str())
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
            format!(
                "{NEEDS_OUTLIER_HINT}; remove `enabled = false` here, or switch [failover] off"
            )
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
        Some(format!("{NEEDS_OUTLIER_HINT}; remove `enabled = false` here (or switch it on in this backend's `[backend.outlier]`), or switch [failover] off").as_str())
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

/// Backends failover has nothing to do for (one zone, fewer than two
/// zones that list endpoints) need no `[outlier]`.
#[test]
fn a_backend_with_fewer_than_two_zones_with_endpoints_needs_no_outlier() {
    valid(
        r#"
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
"#,
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
            "failover sends a request to another zone by naming its endpoints to the cluster's override_host load balancing, which picks only among its own cluster's endpoints; give every zone of `pool` the same `cluster` (or none: the default is the backend's name)"
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
