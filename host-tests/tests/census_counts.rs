//! The host-call census: exact counts for a filter whose host calls are
//! known (the probe in passthrough mode), and the `census` binary run on a
//! real capability module.

mod common;

use std::process::Command;
use std::time::Duration;

use common::probe;
use sluice_host_tests::{CallStats, Cluster, Host, Phase, PluginConfig, Request};

fn passthrough_host() -> Host {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "ok",
        Duration::from_millis(5),
    ));
    host.add_filter(
        PluginConfig::new(probe())
            .name("only")
            .vm_id("only")
            .configuration(r#"{"mode":"passthrough"}"#),
    )
    .unwrap();
    host
}

fn stats(calls: u64, bytes_in: u64, bytes_out: u64) -> CallStats {
    CallStats {
        calls,
        bytes_in,
        bytes_out,
    }
}

#[test]
fn one_request_through_passthrough_is_counted_call_by_call() {
    let mut host = passthrough_host();
    // `on_configure` defined two metrics and read `plugin_name`.
    assert_eq!(
        host.census()
            .host_call(Phase::Start, "proxy_define_metric")
            .calls,
        2
    );
    host.reset_census();
    assert_eq!(host.census().total(), CallStats::default());

    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    let census = host.census().clone();

    // Request headers: the probe's two control headers looked up and not
    // found ("x-probe-trap" + "x-probe-vm": 22 bytes of keys in, nothing
    // out), one counter increment, one header added ("x-probe-chain" +
    // "only": 17 bytes read from the guest).
    assert_eq!(
        census.host_calls(Phase::RequestHeaders),
        [
            ("proxy_get_header_map_value", stats(2, 22, 0)),
            ("proxy_add_header_map_value", stats(1, 17, 0)),
            ("proxy_increment_metric", stats(1, 0, 0)),
        ]
    );
    // Response headers: `:status` read (7 bytes of key in; "200" plus the
    // returned pointer and size out), then the header added.
    assert_eq!(
        census.host_calls(Phase::ResponseHeaders),
        [
            ("proxy_get_header_map_value", stats(1, 7, 3 + 4 + 4)),
            ("proxy_add_header_map_value", stats(1, 17, 0)),
        ]
    );
    // The body callbacks run (a chunk, then the empty end of stream) but
    // passthrough makes no host call in them; nothing in the log phase.
    let body: Vec<_> = census
        .callbacks(Phase::ResponseBody)
        .into_iter()
        .map(|(name, s)| (name, s.calls))
        .collect();
    assert_eq!(body, [("proxy_on_response_body", 2)]);
    assert_eq!(
        census.phase_total(Phase::ResponseBody),
        CallStats::default()
    );
    assert_eq!(census.phase_total(Phase::Log), CallStats::default());
    let log: Vec<_> = census
        .callbacks(Phase::Log)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(log, ["proxy_on_log", "proxy_on_done", "proxy_on_delete"]);
    // No request body: no request body callback at all.
    assert!(census.callbacks(Phase::RequestBody).is_empty());
    assert_eq!(census.total(), stats(6, 63, 11));
}

#[test]
fn census_binary_prints_both_requests_for_the_token_filter() {
    let dir = std::env::temp_dir().join(format!("sluice-census-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("tokens.toml");
    std::fs::write(
        &policy,
        r#"
[[backend]]
name = "llm"
models = ["*"]
  [[backend.zone]]
  name = "local"
  endpoints = ["10.0.0.1:8000"]

[tokens]
default_max_tokens = 100
  [[tokens.quota]]
  tokens = "100k/min"
"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_census"))
        .args(["--module", "sluice", "--config"])
        .arg(&policy)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sections: Vec<&str> = stdout.split("# ").skip(1).collect();
    assert_eq!(sections.len(), 2, "{stdout}");
    assert!(sections[0].contains("non-streaming, 1024 B JSON body: status 200"));
    assert!(sections[1].contains("streaming, 100 SSE chunks: status 200"));
    // The streamed answer is 100 chunks plus the end of stream: 101 callbacks.
    let body_callbacks = |section: &str| {
        section
            .lines()
            .find(|l| l.contains("[proxy_on_response_body]"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert_eq!(body_callbacks(sections[0]), Some(2));
    assert_eq!(body_callbacks(sections[1]), Some(101));
    // The request body (1024 B) is read once, at the end of the stream.
    for section in &sections {
        let read = section
            .lines()
            .find(|l| l.starts_with("request_body") && l.contains("proxy_get_buffer_bytes"))
            .unwrap_or_else(|| panic!("no request body read in:\n{section}"));
        let fields: Vec<&str> = read.split_whitespace().collect();
        assert_eq!(fields[2], "1", "{read}");
        assert_eq!(fields[4], (1024 + 8).to_string(), "{read}");
    }
}
