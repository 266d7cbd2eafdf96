//! The policy as Istio hands it to a Wasm module: a `pluginConfig` Struct
//! printed as a JSON string, where every number is a double. `sluice.wasm`
//! must take `policies/gateway.toml` in that form and enforce the same
//! policy as from its TOML text.
//!
//! The conversion below is this test's own model of Istio's (YAML → Struct
//! → JSON), kept apart from the CLI's `--config-format json` on purpose.

mod common;

use std::time::Duration;

use common::{rendered_route, responses, sluice_filter};
use sluice_host_tests::{Cluster, Endpoint, EndpointBehavior, Host, HostOptions, Request};

fn gateway_toml() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/gateway.toml"
    ))
    .unwrap()
}

/// A Struct's JSON: numbers are doubles (`20` prints as `20.0`).
fn as_istio_struct_json(toml_text: &str) -> String {
    fn doubles(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) => Value::from(n.as_f64().unwrap()),
            Value::Array(a) => Value::Array(a.into_iter().map(doubles).collect()),
            Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, doubles(v))).collect())
            }
            other => other,
        }
    }
    let doc: toml::Value = toml::from_str(toml_text).unwrap();
    serde_json::to_string(&doubles(serde_json::to_value(doc).unwrap())).unwrap()
}

fn host(config: &str) -> Host {
    let mut host = Host::new(HostOptions {
        workers: 2,
        route: rendered_route("primary"),
        ..HostOptions::default()
    });
    let llm = || {
        EndpointBehavior::fixed(
            200,
            r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#,
            Duration::from_millis(30),
        )
    };
    host.add_cluster(Cluster::new(
        "primary",
        vec![
            Endpoint::new("10.0.1.10:8000", "us-east-1a", llm()),
            Endpoint::new("10.0.1.11:8000", "us-east-1a", llm()),
            Endpoint::new("10.0.2.10:8000", "us-east-1b", llm()),
            Endpoint::new("10.0.2.11:8000", "us-east-1b", llm()),
        ],
    ));
    host.add_cluster(Cluster::new(
        "fallback-pool",
        vec![Endpoint::new("10.0.3.10:8000", "us-east-1a", llm())],
    ));
    host.add_filter(sluice_filter("sluice", config)).unwrap();
    for cluster in ["primary", "fallback-pool"] {
        host.add_upstream_filter(cluster, sluice_filter("sluice.attempt", config))
            .unwrap();
    }
    host
}

/// 300 requests of tenant `someone` in 10 s: the default quota allows 120
/// a minute (a bucket of 120 refilled at 2 a second), so about 160 are
/// refused by `[tokens]`.
fn run(config: &str) -> Vec<(u32, Option<String>, Option<String>)> {
    let mut host = host(config);
    common::load(
        &mut host,
        Duration::ZERO,
        10,
        30,
        Duration::from_secs(60),
        || {
            Request::post_json(
                "/v1/chat/completions",
                r#"{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
            )
            .header("x-tenant-id", "someone")
        },
    );
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
    let mut all = responses(&host);
    all.sort_by_key(|(t, _)| *t);
    all.into_iter()
        .map(|(_, r)| {
            (
                r.status,
                r.header("x-sluice-zone").map(str::to_owned),
                r.header("ratelimit-policy").map(str::to_owned),
            )
        })
        .collect()
}

#[test]
fn the_gateway_policy_as_istio_carries_it_is_enforced_as_its_toml() {
    let toml = gateway_toml();
    let json = as_istio_struct_json(&toml);
    assert!(json.contains("\"min_calls\":20.0"), "numbers as doubles");
    let from_json = run(&json);
    let from_toml = run(&toml);
    let served = from_json.iter().filter(|(s, ..)| *s == 200).count();
    let refused = from_json.iter().filter(|(s, ..)| *s == 429).count();
    assert_eq!(from_json.len(), 300);
    assert!(
        (120..=150).contains(&served) && served + refused == 300,
        "served {served}, refused {refused}"
    );
    // sluice acted: zones named, quota headers given.
    assert!(
        from_json
            .iter()
            .all(|(s, zone, _)| *s != 200 || zone.is_some())
    );
    assert!(from_json.iter().any(|(_, _, p)| p.is_some()));
    // Same outcomes request by request as the TOML text gives.
    let statuses = |v: &[(u32, Option<String>, Option<String>)]| -> Vec<u32> {
        v.iter().map(|(s, ..)| *s).collect()
    };
    assert_eq!(statuses(&from_json), statuses(&from_toml));
}

#[test]
fn a_policy_istio_mangled_is_refused_not_half_applied() {
    // A number where a duration belongs, as a careless pluginConfig gives.
    let json =
        as_istio_struct_json(&gateway_toml()).replace("\"open_for\":\"30s\"", "\"open_for\":30.0");
    assert!(json.contains("\"open_for\":30.0"));
    let mut host = Host::new(HostOptions::default());
    assert!(host.add_filter(sluice_filter("sluice", &json)).is_err());
    assert!(
        !host.logs_containing("open_for").is_empty(),
        "the error names the key"
    );
}
