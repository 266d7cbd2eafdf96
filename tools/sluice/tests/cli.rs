//! The `sluice` binary as a user runs it: exit codes, messages, output.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{repo, sluice, text};

/// `policies/gateway.toml` without its `[failover]` section (the file's
/// last), written to a directory of its own; the path. `[failover]` judges
/// zones from sluice's `[outlier]`, so a render that hands `[outlier]` to
/// Envoy (`--native-outlier`) cannot give the filter the gateway's
/// failover (see `native_outlier_never_hands_the_filter_failover_alone`).
fn gateway_without_failover(test: &str) -> PathBuf {
    let file = std::fs::read_to_string(repo().join("policies/gateway.toml")).unwrap();
    let (before, _) = file.split_once("\n[failover]\n").unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, format!("{before}\n")).unwrap();
    path
}

#[test]
fn validate_accepts_the_example_policies() {
    let out = sluice(&[
        "validate",
        "policies/minimal.toml",
        "policies/gateway.toml",
        "policies/lab.toml",
        "policies/failover.toml",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.ends_with(": ok"))
            .count(),
        4
    );
}

#[test]
fn validate_rejects_each_invalid_policy_with_its_place() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("policies/invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "expected") {
            continue;
        }
        let rel = format!(
            "policies/invalid/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        let expected = std::fs::read_to_string(path.with_extension("expected")).unwrap();
        let out = sluice(&["validate", &rel]);
        assert_eq!(out.status.code(), Some(1), "{rel} was not rejected");
        let stderr = text(&out.stderr);
        for line in expected.lines() {
            // `LINE:COL: message` for TOML, `/pointer: message` for JSON.
            let (place, message) = line.split_once(": ").unwrap();
            assert!(
                stderr.contains(&format!("error: {message}")),
                "{rel}: no `{message}` in\n{stderr}"
            );
            if place.starts_with('/') {
                assert!(
                    stderr.contains(&format!("at {place}")),
                    "{rel}: no pointer {place} in\n{stderr}"
                );
            } else {
                assert!(
                    stderr.contains(&format!("--> {rel}:{place}")),
                    "{rel}: no {rel}:{place} in\n{stderr}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 8);
}

#[test]
fn one_invalid_file_fails_the_whole_run() {
    let out = sluice(&[
        "validate",
        "policies/minimal.toml",
        "policies/invalid/unknown-key.toml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("policies/minimal.toml: ok"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(sluice(&["validate"]).status.code(), Some(2));
    assert_eq!(sluice(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        sluice(&["render", "envoy", "policies/lab.toml"])
            .status
            .code(),
        Some(2),
        "--wasm-dir is required"
    );
}

#[test]
fn a_missing_file_is_an_error_not_a_panic() {
    let out = sluice(&["validate", "policies/nope.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read policies/nope.toml"));
}

#[test]
fn a_file_that_is_not_utf8_is_located_at_its_first_bad_byte() {
    // Written here rather than kept in policies/: every file there is text.
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latin1.toml");
    // A Latin-1 "é" (0xE9) on line 3, after 14 characters.
    std::fs::write(
        &path,
        b"[[backend]]\nname = \"llm\"\nmodels = [\"caf\xe9\"]\n",
    )
    .unwrap();
    let file = path.display().to_string();
    let out = sluice(&["validate", &file]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: not valid UTF-8: byte 0xE9 is not part of a character"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("--> {file}:3:15")), "{stderr}");
    assert!(stderr.contains("policies must be UTF-8"), "{stderr}");
}

#[test]
fn explain_prints_every_effective_value_and_claims_nothing_it_does_not_enforce() {
    let out = sluice(&["explain", "policies/gateway.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Written in the file:
    assert!(stdout.contains("tenant acme for model gpt-4o* may use 200k/min tokens, 5M/day tokens, 600/min requests, 32 concurrent streams"), "{stdout}");
    // Defaults the file leaves out, with their values:
    for default in [
        "base_ejection_time = \"30s\"",
        "max_ejection = \"10%\"",
        "jitter = \"10%\"",
        "max_keys = 10000",
        "honor_retry_after = true",
        "cross_region = true",
    ] {
        assert!(
            stdout.contains(default),
            "missing default `{default}` in\n{stdout}"
        );
    }
    // Every section the file enables is enforced by sluice.wasm: none is
    // flagged (a capability that is not would be, see `Capability::is_enforced`).
    assert!(!stdout.contains("NOT ENFORCED"), "{stdout}");
}

#[test]
fn explain_gives_failover_s_zone_order_and_triggers() {
    let out = sluice(&["explain", "policies/failover.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "# - [failover] backend pool: zone order: the proxy's zone (node.locality.zone, which Istio sets, as does `sluice render envoy --node-zone`) when it is one of this backend's zones, then zone-a, zone-b (from `order`), then the other zones of the proxy's region, then the other regions' zones; zones by region: region-1: zone-a, zone-b; region-2: zone-c",
        "this proxy's use of the zone's requests_per_minute / tokens_per_minute (zone-a: 600 requests/min, 200k tokens/min; zone-b: 600 requests/min, 200k tokens/min)",
        "latency (0 when its time to first token is over 3× the best other zone's and over 200ms: [outlier]'s latency_factor and ttft_floor)",
        "each zone, in order, takes min(what is left, its health / 71%) of new requests",
        "one probe request per 1s per proxy",
        "x-sluice-zone: <zone>; reason=<preferred|spill|probe|panic|retry>",
        // The effective values:
        "probe_interval = \"1s\"",
        "requests_per_minute = 600",
        "tokens_per_minute = 200000",
    ] {
        assert!(stdout.contains(expected), "no `{expected}` in\n{stdout}");
    }
    assert!(!stdout.contains("NOT ENFORCED"), "{stdout}");
    // A backend failover has nothing to do for says so.
    let out = sluice(&["explain", "policies/gateway.toml"]);
    assert!(
        text(&out.stdout)
            .contains("[failover] backend fallback: one zone (us-east-1a), nothing to fail over"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn explain_describes_state_errors_and_quota_names() {
    let out = sluice(&["explain", "policies/gateway.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        // In words:
        "[tokens] when the shared quota state cannot be read or written (host error, persistent contention), requests are turned away (on_state_error = \"deny\")",
        "[tokens] rule acme-gpt-4o: each tenant × model of tenant acme",
        "unnamed, so a change to its match or limits starts its state afresh",
        "[outlier] backend primary: picks each request's endpoint (power of two choices on load and time to first token)",
        "a stream with no first token after 15s is abandoned before the client sees a byte and tried elsewhere",
        "an endpoint answering 429 gets no new request until its reset time",
        // As effective values:
        "on_state_error = \"deny\"",
        "name = \"acme-gpt-4o\"",
    ] {
        assert!(stdout.contains(expected), "no `{expected}` in\n{stdout}");
    }
    // The default, for a file that does not set it.
    let out = sluice(&["explain", "policies/lab.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("on_state_error = \"deny\""));
}

#[test]
fn render_envoy_writes_a_bootstrap_with_the_policy_topology() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/lab.toml",
        "--wasm-dir",
        "/nonexistent",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--endpoints",
        "primary/zone-a=127.0.0.1:5001,127.0.0.1:5002",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let clusters = yaml["static_resources"]["clusters"].as_sequence().unwrap();
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fallback", "primary"]);
    let primary = &clusters[1]["load_assignment"]["endpoints"];
    assert_eq!(primary[0]["locality"]["zone"].as_str(), Some("zone-a"));
    assert_eq!(primary[0]["lb_endpoints"].as_sequence().unwrap().len(), 2);
    assert_eq!(primary[1]["locality"]["zone"].as_str(), Some("zone-b"));
    // One Wasm filter, sluice.wasm, carries the policy text before the
    // router, whatever sections the policy enables; the sections it does not
    // enforce yet are named on stderr.
    // Envoy's buffer holds a body a little larger than the policy's
    // max_body (default 1 MiB), so sluice judges it, not Envoy.
    assert_eq!(
        yaml["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"].as_u64(),
        Some(1024 * 1024 + 256 * 1024)
    );
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    // One spelling of a path for Envoy's routes, sluice.wasm and the
    // upstream: normalized, slashes merged, encoded slashes refused.
    assert_eq!(hcm["normalize_path"].as_bool(), Some(true));
    assert_eq!(hcm["merge_slashes"].as_bool(), Some(true));
    assert_eq!(
        hcm["path_with_escaped_slashes_action"].as_str(),
        Some("REJECT_REQUEST")
    );
    let filters = hcm["http_filters"].as_sequence().unwrap().clone();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    // Envoy's compressor first: responses pass sluice (which reads usage
    // from the plain answer) before it compresses them for the client.
    assert_eq!(
        names,
        [
            "envoy.filters.http.compressor",
            "sluice",
            "envoy.filters.http.router"
        ]
    );
    let policy_text = std::fs::read_to_string(repo().join("policies/lab.toml")).unwrap();
    let policy = sluice_policy::parse_toml("lab.toml", &policy_text).unwrap();
    let config = &filters[1]["typed_config"]["config"];
    // The filter gets the policy as rendered: the file with the endpoints
    // of --endpoints, still valid, every other value as written.
    let given = config["configuration"]["value"].as_str().unwrap();
    let mut expected = policy.clone();
    expected.backends[0].zones[0].endpoints =
        vec!["127.0.0.1:5001".to_string(), "127.0.0.1:5002".to_string()];
    assert_eq!(
        sluice_policy::parse_toml("given.toml", given).unwrap(),
        expected
    );
    assert!(given.contains(r#"endpoints = ["127.0.0.1:5001", "127.0.0.1:5002"]"#));
    assert!(given.contains(r#"endpoints = ["127.0.0.1:18002"]"#));
    assert_eq!(
        config["vm_config"]["code"]["local"]["filename"].as_str(),
        Some("/nonexistent/sluice.wasm")
    );
    assert_eq!(config["vm_config"]["vm_id"].as_str(), Some("sluice"));
    assert_eq!(config["failure_policy"].as_str(), Some("FAIL_RELOAD"));
    assert_eq!(
        config["allow_on_headers_stop_iteration"].as_bool(),
        Some(true)
    );
    for cap in sluice_policy::Capability::ALL {
        let warning = format!("[{}] is NOT ENFORCED YET", cap.section());
        let warned = text(&out.stderr).contains(&warning);
        assert_eq!(
            warned,
            cap.is_enabled_in(&policy) && !cap.is_enforced(),
            "{warning}"
        );
    }
}

#[test]
fn render_without_overrides_gives_the_filter_the_file_as_is() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let file = std::fs::read_to_string(repo().join("policies/gateway.toml")).unwrap();
    assert_eq!(
        hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"].as_str(),
        Some(file.as_str())
    );
}

#[test]
fn render_native_retry_hands_the_section_to_envoy() {
    let policy_file = gateway_without_failover("native-retry");
    let out = sluice(&[
        "render",
        "envoy",
        policy_file.to_str().unwrap(),
        "--wasm-dir",
        "/x",
        "--native-retry",
        "--native-outlier",
    ]);
    std::fs::remove_dir_all(policy_file.parent().unwrap()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("# [retry]: Envoy's own route retry policy and cluster retry_budget"));
    assert!(stdout.contains("# [outlier]: Envoy's own outlier_detection"));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    for cluster in yaml["static_resources"]["clusters"].as_sequence().unwrap() {
        let budget = &cluster["circuit_breakers"]["thresholds"][0]["retry_budget"];
        assert_eq!(budget["budget_percent"]["value"].as_f64(), Some(20.0));
        assert_eq!(budget["min_retry_concurrency"].as_u64(), Some(10));
        // Neither section is sluice's: no per-attempt instance.
        assert!(cluster.get("typed_extension_protocol_options").is_none());
    }
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_sequence()
        .unwrap()
    {
        let retry = &route["route"]["retry_policy"];
        assert_eq!(
            retry["retry_on"].as_str(),
            Some("gateway-error,reset,connect-failure")
        );
        assert_eq!(retry["num_retries"].as_u64(), Some(2));
    }
    let given = hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let policy = sluice_policy::parse_toml("given.toml", given).unwrap();
    assert!(policy.retry.is_none() && policy.outlier.is_none());
    assert!(policy.breaker.is_some() && policy.tokens.is_some());
}

#[test]
fn render_native_outlier_hands_the_section_to_envoy() {
    let policy_file = gateway_without_failover("native-outlier");
    let out = sluice(&[
        "render",
        "envoy",
        policy_file.to_str().unwrap(),
        "--wasm-dir",
        "/x",
        "--native-outlier",
    ]);
    std::fs::remove_dir_all(policy_file.parent().unwrap()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("# [outlier]: Envoy's own outlier_detection"));
    assert!(!text(&out.stderr).contains("[outlier] is NOT ENFORCED"));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    for cluster in yaml["static_resources"]["clusters"].as_sequence().unwrap() {
        assert_eq!(cluster["lb_policy"].as_str(), Some("LEAST_REQUEST"));
        assert_eq!(
            cluster["outlier_detection"]["consecutive_5xx"].as_u64(),
            Some(5)
        );
        // Envoy balances: sluice names no endpoint. (The per-attempt
        // instance stays, for the policy's [retry] budget.)
        assert!(cluster.get("load_balancing_policy").is_none());
    }
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let given = hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let policy = sluice_policy::parse_toml("given.toml", given).unwrap();
    assert!(policy.outlier.is_none());
    assert!(policy.backends.iter().all(|b| b.outlier.is_none()));
    // Everything else as written.
    assert!(policy.breaker.is_some() && policy.tokens.is_some());
}

/// A filter refuses `[failover]` on zones with endpoints when `[outlier]`
/// is off, so a render that takes `[outlier]` away from sluice.wasm must
/// either refuse the policy or not hand the filter its `[failover]`.
#[test]
fn native_outlier_never_hands_the_filter_failover_alone() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
        "--native-outlier",
    ]);
    if out.status.code() == Some(1) {
        assert!(
            text(&out.stderr).contains("[failover]"),
            "{}",
            text(&out.stderr)
        );
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let given = hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let policy = sluice_policy::parse_toml("given.toml", given).unwrap();
    assert!(policy.failover.is_none(), "{given}");
}

#[test]
fn render_node_zone_writes_the_proxys_locality() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
        "--node-zone",
        "us-east-1b",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("# node.locality: zone `us-east-1b` (--node-zone)"));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let locality = &yaml["node"]["locality"];
    assert_eq!(locality["zone"].as_str(), Some("us-east-1b"));
    assert_eq!(locality["region"].as_str(), Some("us-east-1"));
    // Nothing else changes: sluice.wasm still gets the file as is.
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let file = std::fs::read_to_string(repo().join("policies/gateway.toml")).unwrap();
    assert_eq!(
        hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"].as_str(),
        Some(file.as_str())
    );

    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
        "--node-zone",
        "eu-west-1a",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--node-zone `eu-west-1a`: no backend of the policy has a zone `eu-west-1a` (its zones: us-east-1a, us-east-1b)"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn render_native_failover_hands_failover_and_outlier_to_envoy() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
        "--native-failover",
        "--node-zone",
        "us-east-1b",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("# [failover]: Envoy's own zone failover (--native-failover)"));
    assert!(
        stdout.contains("sluice.wasm is given the policy without [failover] and without [outlier]")
    );
    assert!(!text(&out.stderr).contains("[failover] is NOT ENFORCED"));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let clusters = yaml["static_resources"]["clusters"].as_sequence().unwrap();
    for cluster in clusters {
        let name = cluster["name"].as_str().unwrap();
        let zones: Vec<(&str, Option<u64>)> = cluster["load_assignment"]["endpoints"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["locality"]["zone"].as_str().unwrap(),
                    l["priority"].as_u64(),
                )
            })
            .collect();
        match name {
            // The node's zone first, whatever `order` says after it.
            "primary" => assert_eq!(zones, [("us-east-1a", Some(1)), ("us-east-1b", Some(0))]),
            "fallback-pool" => assert_eq!(zones, [("us-east-1a", Some(0))]),
            other => panic!("unexpected cluster {other}"),
        }
        assert_eq!(cluster["lb_policy"].as_str(), Some("LEAST_REQUEST"));
        assert_eq!(
            cluster["outlier_detection"]["max_ejection_percent"].as_u64(),
            Some(100)
        );
        assert_eq!(
            cluster["health_checks"][0]["http_health_check"]["path"].as_str(),
            Some("/health")
        );
        assert!(cluster.get("load_balancing_policy").is_none());
    }
    let hcm =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]
        .as_sequence()
        .unwrap()
    {
        let retry = &route["route"]["retry_policy"];
        assert_eq!(
            retry["retry_priority"]["name"].as_str(),
            Some("envoy.retry_priorities.previous_priorities"),
            "{route:?}"
        );
    }
    let given = hcm["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let policy = sluice_policy::parse_toml("given.toml", given).unwrap();
    assert!(policy.failover.is_none() && policy.outlier.is_none());
    assert!(
        policy
            .backends
            .iter()
            .all(|b| b.outlier.is_none() && b.failover.is_none())
    );
    assert!(policy.breaker.is_some() && policy.tokens.is_some() && policy.retry.is_some());
}

#[test]
fn render_native_failover_without_a_failover_section_warns_and_changes_nothing() {
    let base = ["render", "envoy", "policies/lab.toml", "--wasm-dir", "/x"];
    let plain = sluice(&base);
    let out = sluice(&[&base[..], &["--native-failover"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "warning: --native-failover: the policy enables no [failover], so there is nothing to render for it"
        ),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.stdout, plain.stdout);
}

#[test]
fn render_native_failover_replaces_native_outlier_so_both_is_a_usage_error() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/gateway.toml",
        "--wasm-dir",
        "/x",
        "--native-failover",
        "--native-outlier",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn render_refuses_an_endpoint_the_policy_language_refuses() {
    // The filter validates the endpoints it is given: what the policy
    // language refuses, the render refuses too, located in the text the
    // filter would have been given.
    let out = sluice(&[
        "render",
        "envoy",
        "policies/lab.toml",
        "--wasm-dir",
        "/x",
        "--endpoints",
        "primary/zone-a=bad host:1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("(as rendered for sluice.wasm)"), "{stderr}");
    assert!(stderr.contains("is not a `host:port` endpoint"), "{stderr}");
}

#[test]
fn render_rejects_an_unknown_endpoint_override() {
    let out = sluice(&[
        "render",
        "envoy",
        "policies/lab.toml",
        "--wasm-dir",
        "/x",
        "--endpoints",
        "primary/zone-c=127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("backend `primary` has no zone `zone-c`"));
}

#[test]
fn hash_key_prints_the_tenant_id_not_the_key() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"sk-test\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "key-f3abf2a6cc4f0098");
}
