//! Header values that are not UTF-8, from the client and from upstreams.
//!
//! Envoy treats header values as bytes: a client can send
//! `x-tenant-id: t\xff`, and the filters, the router and the client see those
//! exact bytes. The harness must do the same, or a filter that would crash
//! (or mis-key its state) on such a value in Envoy passes here. Kept in its
//! own file so it does not collide with the rewrite of the older test files.

mod common;

use std::time::Duration;

use common::{probe, probe_host};
use sluice_host_tests::{Cluster, Endpoint, EndpointBehavior, Host, PluginConfig, Request};

const TENANT: &[u8] = b"t\xff\xfe1";
const BEARER: &[u8] = b"Bearer k\x80\xc3(";

fn passthrough(name: &str) -> PluginConfig {
    PluginConfig::new(probe())
        .name(name)
        .vm_id(name)
        .configuration(r#"{"mode":"passthrough"}"#)
}

/// The decimal list Rust's `Debug` prints for a byte vector (`[116, 255]`),
/// as it appears in the `FromUtf8Error` of an SDK panic.
fn debug_bytes(bytes: &[u8]) -> String {
    format!("bytes: {bytes:?}")
}

#[test]
fn request_values_reach_the_router_byte_exact_through_filters_that_edit_the_map() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "ok",
        Duration::from_millis(5),
    ));
    // Both filters add a header, so the map is edited around the raw values.
    host.add_filter(passthrough("first")).unwrap();
    host.add_filter(passthrough("second")).unwrap();
    let response = host.send(
        Request::get("/v1/models")
            .header_bytes("x-tenant-id", TENANT)
            .header("x-plain", "text")
            .header_bytes("authorization", BEARER),
    );
    assert_eq!(response.status, 200);
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
    let upstream = response.upstream_request_headers.unwrap();
    assert_eq!(upstream.get_bytes("x-tenant-id"), Some(TENANT));
    assert_eq!(upstream.get_bytes("authorization"), Some(BEARER));
    // The text view replaces what is not UTF-8; the order is the client's.
    assert_eq!(upstream.get("x-tenant-id"), Some("t\u{fffd}\u{fffd}1"));
    let names: Vec<&str> = upstream
        .iter_bytes()
        .map(|(k, _)| k)
        .filter(|k| !k.starts_with(':') && !k.starts_with("x-forwarded") && *k != "x-request-id")
        .collect();
    assert_eq!(
        names,
        [
            "x-tenant-id",
            "x-plain",
            "authorization",
            "x-probe-chain",
            "x-probe-chain"
        ]
    );
}

#[test]
fn upstream_response_values_reach_the_client_byte_exact() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::new(
        "backend",
        vec![Endpoint::new(
            "10.0.0.1:8000",
            "zone-a",
            EndpointBehavior::fixed(200, "{}", Duration::from_millis(5))
                .with_header_bytes("x-upstream-tag", b"v\xc3\x28"),
        )],
    ));
    host.add_filter(passthrough("only")).unwrap();
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header_bytes("x-upstream-tag"),
        Some(&b"v\xc3\x28"[..])
    );
    assert_eq!(response.header("x-probe-chain"), Some("only"));
    assert!(host.vm_failures().is_empty());
}

/// `proxy_get_header_map_value` hands the guest the raw bytes: the Rust SDK's
/// `get_http_request_header` then fails to make a `String` of them and
/// panics, exactly as it does in Envoy. The panic message (logged by the
/// SDK's hook) prints the bytes the guest received.
#[test]
fn a_single_value_reaches_the_guest_as_raw_bytes() {
    let mut host = probe_host(1, r#"{"tick_ms":100}"#);
    // The probe reads `x-probe-id` first, with the SDK's String helper.
    let response = host.send(Request::get("/").header_bytes("x-probe-id", TENANT));
    assert_eq!(response.status, 503, "the VM failed: fail closed");
    assert_eq!(response.code_details.as_deref(), Some("wasm_fail_stream"));
    let failures = host.vm_failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let panics = host.logs_containing("FromUtf8Error");
    assert_eq!(panics.len(), 1, "{:?}", host.logs());
    assert!(panics[0].contains(&debug_bytes(TENANT)), "{}", panics[0]);
}

/// The same through `proxy_get_header_map_pairs`: the whole map, serialized
/// with each value's bytes untouched.
#[test]
fn the_serialized_map_carries_raw_bytes_to_the_guest() {
    let mut host = probe_host(1, r#"{"tick_ms":100}"#);
    // `x-probe-id` is text, so the probe gets as far as reading every header.
    let response = host.send(
        Request::get("/")
            .header("x-probe-id", "pairs")
            .header_bytes("authorization", BEARER),
    );
    assert_eq!(response.status, 503);
    let panics = host.logs_containing("FromUtf8Error");
    assert_eq!(panics.len(), 1, "{:?}", host.logs());
    assert!(panics[0].contains(&debug_bytes(BEARER)), "{}", panics[0]);
}

/// The hostile input DESIGN.md lists: header values that are not UTF-8, in
/// the identity headers `sluice.wasm` reads, with both of its sections on.
/// The previous filters read them with the SDK's `get_map_value`, which
/// unwraps `String::from_utf8`: one such request trapped the VM and every
/// later request on that worker failed (reproduced against
/// `sluice_tokens.wasm` when this test was written). The engine reads
/// headers as bytes.
#[test]
fn identity_headers_that_are_not_utf8_neither_trap_nor_bypass() {
    for identity in ["", "[tenant]\nfrom = \"api-key\"\n"] {
        let mut host = Host::with_workers(1);
        // The host routes to `backend` unless told otherwise.
        host.add_cluster(Cluster::fixed(
            "backend",
            200,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            Duration::from_millis(5),
        ));
        let module = sluice_host_tests::FilterModule::load("sluice").unwrap();
        host.add_filter(
            PluginConfig::new(module)
                .name("sluice")
                .vm_id("sluice")
                .configuration(format!(
                    r#"
{identity}
[[backend]]
name = "llm"
models = ["*"]
  [[backend.zone]]
  name = "local"
  endpoints = ["10.0.0.1:8000"]

[tokens]
  [[tokens.quota]]
  requests = "2/min"

[breaker]
mode = "consecutive"
"#
                ))
                .allow_on_headers_stop_iteration(true),
        )
        .unwrap();
        let body = r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        let hostile = || {
            Request::post_json("/v1/chat/completions", body)
                .header_bytes("x-tenant-id", b"t\xff")
                .header_bytes("authorization", b"Bearer \xff\xfe")
        };
        // The same odd identity is one tenant, held to its quota.
        let statuses: Vec<u32> = (0..3).map(|_| host.send(hostile()).status).collect();
        assert_eq!(statuses, [200, 200, 429], "identity {identity:?}");
        let next = host.send(
            Request::post_json("/v1/chat/completions", body)
                .header("x-tenant-id", "acme")
                .header("authorization", "Bearer sk-acme"),
        );
        assert!(
            host.vm_failures().is_empty(),
            "{:?}",
            host.logs_containing("panicked")
        );
        assert_eq!(next.status, 200, "identity {identity:?}");
    }
}
