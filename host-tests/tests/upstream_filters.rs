//! Upstream HTTP filters (a Wasm filter in a cluster's `http_filters`), as
//! checked by hand in Envoy 1.40: once per attempt, retries included, with
//! `upstream.address` set in request headers and the attempt count 1, 2, 3;
//! one shared-data store with the downstream instance of the same `vm_id`;
//! and a response-header hold that keeps the per-try timeout running.

mod common;

use std::time::Duration;

use common::{observations, probe};
use serde_json::Value;
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig, Request,
    RouteConfig,
};

fn endpoint(address: &str, behavior: EndpointBehavior) -> Endpoint {
    Endpoint::new(address, "zone-a", behavior)
}

fn answer(status: u32, latency_ms: u64) -> EndpointBehavior {
    EndpointBehavior::fixed(status, r#"{"ok":true}"#, Duration::from_millis(latency_ms))
}

/// The downstream probe in passthrough mode, setting the router's retry policy.
fn retrying(max_retries: u32) -> PluginConfig {
    PluginConfig::new(probe())
        .name("down")
        .vm_id("down")
        .configuration(format!(
            r#"{{"mode":"passthrough","retry_on":"5xx","max_retries":{max_retries}}}"#
        ))
}

fn observing(name: &str, vm_id: &str) -> PluginConfig {
    PluginConfig::new(probe())
        .name(name)
        .vm_id(vm_id)
        .configuration(r#"{"tick_ms":1000}"#)
}

#[test]
fn runs_once_per_attempt_after_host_selection() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::new(
        "backend",
        vec![
            endpoint("10.0.0.1:8000", answer(503, 5)),
            endpoint("10.0.0.2:8000", answer(503, 5)),
            endpoint("10.0.0.3:8000", answer(200, 5)),
        ],
    ));
    host.add_filter(retrying(2)).unwrap();
    host.add_upstream_filter("backend", observing("up", "up"))
        .unwrap();

    let response = host.send(Request::get("/").header("x-probe-id", "attempts"));
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 3);
    // The client gets the document of the last attempt's upstream instance.
    let o = observations(&response);
    assert_eq!(
        o["request_headers.property.upstream.address"],
        serde_json::json!({"status": "Ok", "hex": hex("10.0.0.3:8000"), "value": "10.0.0.3:8000"}),
        "the host is chosen before the upstream filter's request headers"
    );
    assert_eq!(
        o["response_headers.property.upstream.request_attempt_count"]["value"],
        3
    );
    // Three upstream instances, one downstream.
    assert_eq!(host.metric("probe.requests"), 3);
    assert_eq!(host.metric("probe.passthrough.requests"), 1);
    // The retried attempts' contexts were ended (on_done, on_delete).
    let census = host.census();
    let log: Vec<_> = census
        .callbacks(sluice_host_tests::Phase::Log)
        .into_iter()
        .map(|(name, stats)| (name, stats.calls))
        .collect();
    assert_eq!(
        log,
        [
            ("proxy_on_log", 1),
            ("proxy_on_done", 4),
            ("proxy_on_delete", 4)
        ],
        "3 upstream contexts + 1 downstream; on_log only downstream"
    );
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// What the upstream instance saw of shared data, given its `vm_id` (the
/// downstream instance, `vm_id` "probe", wrote the key first).
fn upstream_view_of_shared_data(upstream_vm_id: &str) -> String {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::new(
        "backend",
        vec![endpoint("10.0.0.1:8000", answer(200, 5))],
    ));
    host.add_filter(observing("down", "probe")).unwrap();
    host.add_upstream_filter("backend", observing("up", upstream_vm_id))
        .unwrap();
    let response = host.send(Request::get("/").header("x-probe-id", "shared"));
    assert_eq!(response.status, 200);
    // The downstream probe keeps the upstream probe's document as the body
    // it replaced.
    let downstream = observations(&response);
    let upstream_doc: Value =
        serde_json::from_str(downstream["response.upstream_body"].as_str().unwrap()).unwrap();
    assert_eq!(downstream["shared_data.get_missing"], "none");
    upstream_doc["observations"]["shared_data.get_missing"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn shares_data_with_the_downstream_instance_of_the_same_vm_id() {
    let same = upstream_view_of_shared_data("probe");
    assert!(
        same.starts_with("value=None cas=Some("),
        "same vm_id: the key the downstream instance wrote, got {same}"
    );
    assert_eq!(upstream_view_of_shared_data("other"), "none");
}

// A guest that holds the response headers until the first body chunk:
// `on_http_response_headers` returns Pause, `on_http_response_body`
// Continue. None of the real filters does this yet, and the probe cannot,
// so it is assembled here from the binary format (no `wat` dependency).
fn holding_guest() -> FilterModule {
    fn uleb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, items: &[Vec<u8>]) -> Vec<u8> {
        let mut body = Vec::new();
        uleb(items.len(), &mut body);
        for item in items {
            body.extend_from_slice(item);
        }
        let mut out = vec![id];
        uleb(body.len(), &mut out);
        out.extend(body);
        out
    }
    const I32: u8 = 0x7f;
    let func_type = |params: &[u8], results: &[u8]| {
        let mut t = vec![0x60, params.len() as u8];
        t.extend_from_slice(params);
        t.push(results.len() as u8);
        t.extend_from_slice(results);
        t
    };
    let types = [
        func_type(&[I32], &[I32]),           // 0: allocate, done
        func_type(&[I32, I32], &[]),         // 1: context_create
        func_type(&[I32, I32], &[I32]),      // 2: vm_start, configure
        func_type(&[I32, I32, I32], &[I32]), // 3: headers, body
        func_type(&[I32], &[]),              // 4: delete
        func_type(&[], &[]),                 // 5: abi version marker
    ];
    // (type, body instructions without the final `end`)
    let i32_const = |v: u8| vec![0x41, v];
    let functions: [(u8, Vec<u8>); 8] = [
        (0, vec![0x41, 0x80, 0x08]), // allocate: a fixed buffer at 1024
        (1, vec![]),                 // context_create
        (2, i32_const(1)),           // vm_start / configure: true
        (3, i32_const(0)),           // Continue
        (3, i32_const(1)),           // Pause
        (0, i32_const(1)),           // done: true
        (4, vec![]),                 // delete
        (5, vec![]),                 // proxy_abi_version_0_2_1
    ];
    let export = |name: &str, kind: u8, index: u8| {
        let mut e = Vec::new();
        uleb(name.len(), &mut e);
        e.extend_from_slice(name.as_bytes());
        e.extend([kind, index]);
        e
    };
    let exports = [
        export("memory", 2, 0),
        export("proxy_on_memory_allocate", 0, 0),
        export("proxy_on_context_create", 0, 1),
        export("proxy_on_vm_start", 0, 2),
        export("proxy_on_configure", 0, 2),
        export("proxy_on_request_headers", 0, 3),
        export("proxy_on_response_headers", 0, 4),
        export("proxy_on_response_body", 0, 3),
        export("proxy_on_done", 0, 5),
        export("proxy_on_delete", 0, 6),
        export("proxy_abi_version_0_2_1", 0, 7),
    ];
    let codes: Vec<Vec<u8>> = functions
        .iter()
        .map(|(_, instructions)| {
            let mut body = vec![0x00]; // no locals
            body.extend_from_slice(instructions);
            body.push(0x0b);
            let mut code = Vec::new();
            uleb(body.len(), &mut code);
            code.extend(body);
            code
        })
        .collect();
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend(section(1, &types));
    wasm.extend(section(
        3,
        &functions.iter().map(|(t, _)| vec![*t]).collect::<Vec<_>>(),
    ));
    wasm.extend(section(5, &[vec![0x00, 0x01]])); // one page, no maximum
    wasm.extend(section(7, &exports));
    wasm.extend(section(10, &codes));
    FilterModule::compile_uncached(&wasm, "holding-guest").unwrap()
}

/// One worker; `backend` has a first endpoint that answers `first` and a
/// healthy second one; retries on 5xx once; per-try timeout 1 s.
fn timeout_host(first: EndpointBehavior, hold: bool) -> Host {
    let mut host = Host::new(HostOptions {
        workers: 1,
        route: RouteConfig {
            per_try_timeout: Some(Duration::from_secs(1)),
            ..RouteConfig::default()
        },
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "backend",
        vec![
            endpoint("10.0.0.1:8000", first),
            endpoint("10.0.0.2:8000", answer(200, 20)),
        ],
    ));
    host.add_filter(retrying(1)).unwrap();
    if hold {
        host.add_upstream_filter(
            "backend",
            PluginConfig::new(holding_guest()).allow_on_headers_stop_iteration(true),
        )
        .unwrap();
    }
    host
}

/// Headers at once, then no body for 2 s.
fn silent_after_headers() -> EndpointBehavior {
    answer(200, 10).with_body_delay(Duration::from_secs(2))
}

#[test]
fn holding_headers_until_the_first_chunk_keeps_the_per_try_timeout() {
    let mut host = timeout_host(silent_after_headers(), true);
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 2, "abandoned at 1 s and retried");
    assert_eq!(response.upstream.as_deref(), Some("10.0.0.2:8000"));
    let took = response.duration().unwrap();
    assert!(
        took > Duration::from_secs(1) && took < Duration::from_millis(1300),
        "took {took:?}"
    );
    assert!(host.vm_failures().is_empty(), "{:?}", host.vm_failures());
}

#[test]
fn without_the_hold_the_router_has_the_headers_and_the_client_waits() {
    let mut host = timeout_host(silent_after_headers(), false);
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 1);
    assert_eq!(response.upstream.as_deref(), Some("10.0.0.1:8000"));
    assert!(response.duration().unwrap() >= Duration::from_secs(2));
}

#[test]
fn with_the_hold_a_5xx_with_a_body_is_still_retried() {
    let mut host = timeout_host(answer(503, 10), true);
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 2);
    assert_eq!(response.upstream.as_deref(), Some("10.0.0.2:8000"));
    assert!(response.duration().unwrap() < Duration::from_secs(1));
}

#[test]
fn a_timed_out_attempt_without_retries_left_is_a_504() {
    let mut host = timeout_host(silent_after_headers(), true);
    // Both endpoints silent: the retry times out too.
    host.cluster_mut("backend").unwrap().endpoints[1] =
        endpoint("10.0.0.2:8000", silent_after_headers());
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 504);
    assert_eq!(response.attempts, 2);
    assert_eq!(
        response.code_details.as_deref(),
        Some("upstream_per_try_timeout")
    );
    assert!(response.flags & 0x4 != 0, "UT (upstream request timeout)");
}
