//! The harness's Envoy behaviours, exercised through the real probe `.wasm`.

mod common;

use std::time::Duration;

use common::{observations, probe, probe_host};
use sluice_host_tests::{
    BodySpec, Cluster, Endpoint, EndpointBehavior, FaultKind, Host, HostOptions, PluginConfig,
    Request, RouteConfig,
};

const MS: u64 = 1_000_000;

/// A complete request and response with bodies, on two workers sharing one
/// shared-data store, under virtual time.
#[test]
fn full_request_on_two_workers_sharing_data_under_virtual_time() {
    let mut host = probe_host(2, r#"{"tick_ms":100}"#);
    let t0 = host.now_ns();

    let first = host.send_on(
        0,
        Request::post_json("/v1/chat/completions", r#"{"n":1}"#).header("x-probe-id", "shared"),
    );
    assert_eq!(first.status, 200);
    let o = observations(&first);
    // Envoy (HTTP/1): the body comes with eos=false, then an empty eos=true
    // call; the probe continued the first, so nothing is buffered at eos.
    assert_eq!(o["request.body"], serde_json::Value::Null);
    assert_eq!(o["response.upstream_body"], r#"{"ok":true}"#);
    assert_eq!(o["shared_data.get_missing"], "none");
    // Virtual time: the response took exactly the upstream's 20 ms.
    assert_eq!(first.duration(), Some(Duration::from_millis(20)));
    assert_eq!(host.now_ns() - t0, 20 * MS);

    // Worker 1 is another VM, but sees what worker 0 wrote under the same key.
    let second = host.send_on(1, Request::get("/").header("x-probe-id", "shared"));
    assert_eq!(second.worker, 1);
    let o = observations(&second);
    let seen = o["shared_data.get_missing"].as_str().unwrap();
    assert!(
        seen.starts_with("value=None cas=Some("),
        "worker 1 saw {seen}"
    );
    assert!(
        host.shared_data("sluice-probe", "probe/cas/shared")
            .is_some()
    );

    // Metrics defined by both VMs are one stat, as in Envoy.
    assert_eq!(host.metric("probe.requests"), 2);
    assert!(host.vm_failures().is_empty());
}

#[test]
fn ticks_fire_on_every_worker_only_when_time_advances() {
    let mut host = probe_host(2, r#"{"tick_ms":50}"#);
    // Without advancing time, no tick has happened.
    let o = observations(&host.send_on(0, Request::get("/").header("x-probe-id", "a")));
    assert_eq!(o["vm.ticks_ns"].as_array().unwrap().len(), 0);

    host.advance(Duration::from_millis(500));
    for worker in 0..2 {
        let o = observations(&host.send_on(
            worker,
            Request::get("/").header("x-probe-id", &format!("w{worker}")),
        ));
        let ticks = o["vm.ticks_ns"].as_array().unwrap();
        assert_eq!(ticks.len(), 10, "worker {worker}: {ticks:?}");
        assert!(
            o["vm.tick_intervals_ms"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i == 50)
        );
    }
}

#[test]
fn paused_request_is_resumed_from_on_tick() {
    let mut host = probe_host(1, r#"{"tick_ms":100}"#);
    host.advance(Duration::from_millis(30)); // next tick at +100 ms
    let id = host.start(
        Request::get("/")
            .header("x-probe-pause", "tick")
            .header("x-probe-id", "p"),
    );
    host.advance(Duration::from_millis(60));
    let partial = host.response(id).unwrap();
    assert_eq!(partial.headers_at_ns, None, "held while paused");
    let response = host.finish(id);
    assert_eq!(response.status, 200);
    let o = observations(&response);
    assert_eq!(o["pause.resumed_after_ms"], 70);
    // Resumed at the tick (70 ms), then the upstream's 20 ms.
    assert_eq!(response.time_to_headers(), Some(Duration::from_millis(90)));
}

/// The probe pausing in `on_http_request_headers` (until its next tick) with
/// a request body, under `allow_on_headers_stop_iteration` = `allow`.
fn paused_post(allow: bool) -> (sluice_host_tests::Response, Vec<String>) {
    let mut host = Host::new(HostOptions {
        workers: 1,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        r#"{"ok":true}"#,
        Duration::from_millis(20),
    ));
    host.add_filter(
        PluginConfig::new(probe())
            .configuration(r#"{"tick_ms":100}"#)
            .allow_on_headers_stop_iteration(allow),
    )
    .unwrap();
    host.advance(Duration::from_millis(30)); // next tick at +70 ms
    let response = host.send(
        Request::post_json("/v1/chat/completions", r#"{"n":1}"#)
            .header("x-probe-pause", "tick")
            .header("x-probe-id", "p"),
    );
    let o = observations(&response);
    let callbacks = o["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    (response, callbacks)
}

#[test]
fn paused_headers_hold_back_body_callbacks_unless_allowed() {
    // Envoy's default: Pause becomes StopAllIterationAndWatermark. The body is
    // buffered without calling the filter; it sees it whole once it resumes.
    let (response, callbacks) = paused_post(false);
    assert_eq!(
        callbacks,
        [
            "on_http_request_headers(n=10,eos=false)",
            "on_http_request_body(size=7,eos=true)",
            "on_http_response_headers(n=4,eos=false)",
            "on_http_response_body(size=11,eos=false)",
            "on_http_response_body(size=0,eos=true)",
        ]
    );
    assert_eq!(observations(&response)["request.body"], r#"{"n":1}"#);
    assert_eq!(response.time_to_headers(), Some(Duration::from_millis(90)));
    assert_eq!(response.upstream_request_body, br#"{"n":1}"#);

    // allow_on_headers_stop_iteration: a plain StopIteration. The body
    // callbacks run while the headers are held, and the probe's Continue from
    // its body callback lets the held headers go on (as in Envoy).
    let (response, callbacks) = paused_post(true);
    assert_eq!(
        callbacks[..3],
        [
            "on_http_request_headers(n=10,eos=false)",
            "on_http_request_body(size=7,eos=false)",
            "on_http_request_body(size=0,eos=true)",
        ]
    );
    assert_eq!(response.time_to_headers(), Some(Duration::from_millis(20)));
    assert_eq!(response.upstream_request_body, br#"{"n":1}"#);
}

#[test]
fn route_is_resolved_before_the_request_headers_callback() {
    let route = RouteConfig {
        cluster_header: Some("x-sluice-cluster".into()),
        default_cluster: None,
        ..RouteConfig::default()
    };
    let mut host = Host::new(HostOptions {
        workers: 1,
        route,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::fixed("gpu-b", 200, "b", Duration::from_millis(5)));
    host.add_filter(PluginConfig::new(probe()).configuration("{}"))
        .unwrap();
    let routed = host.send(
        Request::get("/")
            .header("x-sluice-cluster", "gpu-b")
            .header("x-probe-id", "r"),
    );
    let o = observations(&routed);
    assert_eq!(
        o["request_headers.property.xds.cluster_name"]["value"],
        "gpu-b"
    );
    // A route to a cluster that does not exist has no cluster info.
    let unknown = host.send(
        Request::get("/")
            .header("x-sluice-cluster", "nope")
            .header("x-probe-id", "u"),
    );
    assert_eq!(unknown.status, 503);
}

#[test]
fn dispatch_http_call_answers_after_simulated_latency_and_checks_arguments() {
    let mut host = probe_host(1, "{}");
    host.add_cluster(Cluster::fixed(
        "auth",
        200,
        "allowed",
        Duration::from_millis(30),
    ));
    let response = host.send(
        Request::get("/")
            .header("x-probe-callout", "auth")
            .header("x-probe-id", "c"),
    );
    assert_eq!(response.status, 200);
    let o = observations(&response);
    assert_eq!(o["http_call.dispatch"], "Ok");
    assert_eq!(o["http_call.unknown_cluster"], "BadArgument");
    assert_eq!(o["http_call.missing_path"], "BadArgument");
    assert_eq!(o["http_call.response_body"], "allowed");
    assert_eq!(
        o["http_call.response_headers"][0],
        serde_json::json!([":status", "200"])
    );
    // 30 ms callout, then 20 ms upstream.
    assert_eq!(response.time_to_headers(), Some(Duration::from_millis(50)));
    let calls = host.http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "auth");
    assert_eq!(calls[0].headers.get(":path"), Some("/probe-callout"));
}

#[test]
fn dispatch_http_call_times_out_with_504() {
    let mut host = probe_host(1, "{}");
    host.add_cluster(Cluster::fixed("slow", 200, "late", Duration::from_secs(30)));
    let response = host.send(
        Request::get("/")
            .header("x-probe-callout", "slow")
            .header("x-probe-id", "t"),
    );
    let o = observations(&response);
    assert_eq!(
        o["http_call.response_headers"][0],
        serde_json::json!([":status", "504"])
    );
    assert_eq!(
        response.time_to_headers(),
        Some(Duration::from_millis(5020))
    );
}

fn passthrough(name: &str, config: &str) -> PluginConfig {
    PluginConfig::new(probe())
        .name(name)
        .vm_id(name)
        .configuration(format!(r#"{{"mode":"passthrough"{config}}}"#))
}

#[test]
fn sse_stream_is_delivered_chunk_by_chunk_at_virtual_times() {
    let events: Vec<String> = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/openai_stream.sse"
    ))
    .unwrap()
    .split_inclusive("\n\n")
    .map(str::to_owned)
    .collect();
    assert_eq!(events.len(), 4);
    let behavior = EndpointBehavior {
        headers: vec![("content-type".into(), "text/event-stream".into())],
        body: BodySpec::Sse(events.clone()),
        time_to_first_token: Duration::from_millis(200),
        time_per_token: Duration::from_millis(25),
        ..EndpointBehavior::default()
    };
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::new(
        "backend",
        vec![Endpoint::new("10.0.0.7:8000", "zone-a", behavior)],
    ));
    host.add_filter(passthrough("pt", "")).unwrap();
    let response = host.send(Request::post_json(
        "/v1/chat/completions",
        r#"{"stream":true}"#,
    ));
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let start = response.started_ns;
    let times: Vec<u64> = response
        .chunks
        .iter()
        .map(|(t, _)| (t - start) / MS)
        .collect();
    assert_eq!(times, [200, 225, 250, 275]);
    let texts: Vec<String> = response
        .chunks
        .iter()
        .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert_eq!(texts, events);
}

#[test]
fn chain_runs_request_in_order_and_response_in_reverse() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "ok",
        Duration::from_millis(5),
    ));
    host.add_filter(passthrough("first", "")).unwrap();
    host.add_filter(passthrough("second", "")).unwrap();
    let response = host.send(Request::get("/"));
    let upstream = response.upstream_request_headers.clone().unwrap();
    assert_eq!(upstream.get_all("x-probe-chain"), ["first", "second"]);
    assert_eq!(
        response.headers.get_all("x-probe-chain"),
        ["second", "first"]
    );
    // Client-sent retry headers are not honoured; filter-set ones are.
    assert_eq!(host.metric("probe.passthrough.requests"), 2);
}

#[test]
fn local_reply_stops_the_chain_and_skips_later_filters() {
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "ok",
        Duration::from_millis(5),
    ));
    host.add_filter(
        PluginConfig::new(probe())
            .name("probe")
            .vm_id("probe")
            .configuration("{}"),
    )
    .unwrap();
    host.add_filter(passthrough("after", "")).unwrap();
    let response = host.send(
        Request::get("/")
            .header("x-probe-local-reply", "503")
            .header("x-probe-id", "l"),
    );
    assert_eq!(response.status, 503);
    assert!(response.local_reply);
    assert!(
        response.upstream_request_headers.is_none(),
        "the router never saw it"
    );
    assert_eq!(
        host.metric("probe.passthrough.requests"),
        0,
        "the later filter never ran"
    );
    assert!(response.headers.get("x-probe-chain").is_none());
    assert_eq!(response.header("x-probe-local"), Some("yes"));
}

fn three_endpoints() -> Cluster {
    Cluster::new(
        "backend",
        vec![
            Endpoint::new(
                "10.0.0.1:8000",
                "zone-a",
                EndpointBehavior::fixed(200, "a", Duration::from_millis(10)).with_fault(
                    Duration::ZERO,
                    Duration::from_secs(3600),
                    FaultKind::Status(503),
                ),
            ),
            Endpoint::new(
                "10.0.0.2:8000",
                "zone-b",
                EndpointBehavior::fixed(200, "b", Duration::from_millis(10)),
            ),
            Endpoint::new(
                "10.0.0.3:8000",
                "zone-c",
                EndpointBehavior::fixed(200, "c", Duration::from_millis(10)),
            ),
        ],
    )
}

#[test]
fn override_host_list_is_walked_by_retries() {
    let mut host = Host::with_workers(1);
    host.add_cluster(three_endpoints());
    host.add_filter(passthrough("retry", r#","retry_on":"5xx","max_retries":2"#))
        .unwrap();
    let response = host.send(
        Request::get("/")
            .header(
                "x-gateway-destination-endpoint",
                "10.0.0.1:8000,10.0.0.3:8000",
            )
            // Sent by the client: Envoy ignores it, the filter's value counts.
            .header("x-envoy-max-retries", "0"),
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 2);
    assert_eq!(response.upstream.as_deref(), Some("10.0.0.3:8000"));
    assert_eq!(response.body_text(), "c");
}

#[test]
fn without_retry_headers_the_first_answer_stands() {
    let mut host = Host::with_workers(1);
    host.add_cluster(three_endpoints());
    host.add_filter(passthrough("plain", "")).unwrap();
    let response =
        host.send(Request::get("/").header("x-gateway-destination-endpoint", "10.0.0.1:8000"));
    assert_eq!(response.status, 503);
    assert_eq!(response.attempts, 1);
    assert_eq!(host.metric("probe.passthrough.responses_5xx"), 1);
}

#[test]
fn unknown_override_host_falls_back_to_round_robin() {
    let mut host = Host::with_workers(1);
    host.add_cluster(three_endpoints());
    host.add_filter(passthrough("plain", "")).unwrap();
    let upstreams: Vec<String> = (0..3)
        .map(|_| {
            host.send(Request::get("/").header("x-gateway-destination-endpoint", "10.9.9.9:1"))
                .upstream
                .unwrap()
        })
        .collect();
    assert_eq!(
        upstreams,
        ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    );
}

#[test]
fn connection_failure_gives_503_uf_unless_retried() {
    let down = Cluster::new(
        "backend",
        vec![Endpoint::new(
            "10.0.0.1:8000",
            "zone-a",
            EndpointBehavior::default().with_fault(
                Duration::ZERO,
                Duration::from_secs(60),
                FaultKind::Down,
            ),
        )],
    );
    let mut host = Host::with_workers(1);
    host.add_cluster(down);
    host.add_filter(passthrough("plain", "")).unwrap();
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 503);
    assert!(response.local_reply);
    assert_eq!(
        response.code_details.as_deref(),
        Some("upstream_reset_before_response_started{connection_failure}")
    );
    assert_eq!(response.flags & 0x20, 0x20, "UF");
    assert!(response.body_text().starts_with("upstream connect error"));
    // After the fault window the endpoint recovers.
    host.advance(Duration::from_secs(60));
    assert_eq!(host.send(Request::get("/")).status, 200);
}

#[test]
fn reset_mid_stream_truncates_the_response() {
    let behavior = EndpointBehavior::llm(Duration::from_millis(50), Duration::from_millis(10), 20)
        .with_fault(
            Duration::ZERO,
            Duration::from_secs(60),
            FaultKind::ResetMidStream { after_chunks: 3 },
        );
    let mut host = Host::with_workers(1);
    host.add_cluster(Cluster::new(
        "backend",
        vec![Endpoint::new("10.0.0.1:8000", "zone-a", behavior)],
    ));
    host.add_filter(passthrough(
        "plain",
        r#","retry_on":"5xx,reset","max_retries":3"#,
    ))
    .unwrap();
    let response = host.send(Request::get("/"));
    assert_eq!(response.status, 200);
    assert!(response.reset);
    assert_eq!(response.chunks.len(), 3);
    assert_eq!(response.attempts, 1, "no retry once the response started");
    assert_eq!(response.flags & 0x10, 0x10, "UR");
}

#[test]
fn cluster_header_selects_the_cluster() {
    let route = RouteConfig {
        cluster_header: Some("x-sluice-cluster".into()),
        default_cluster: None,
        ..RouteConfig::default()
    };
    let mut host = Host::new(HostOptions {
        workers: 1,
        route,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        "default",
        Duration::from_millis(5),
    ));
    host.add_cluster(Cluster::new(
        "gpu-b",
        vec![Endpoint::new(
            "10.0.2.1:8000",
            "zone-b",
            EndpointBehavior::fixed(200, "b", Duration::from_millis(5)),
        )],
    ));
    host.add_filter(passthrough("plain", "")).unwrap();
    let routed = host.send(Request::get("/").header("x-sluice-cluster", "gpu-b"));
    assert_eq!(routed.body_text(), "b");
    let missing = host.send(Request::get("/"));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.code_details.as_deref(), Some("route_not_found"));
    let unknown = host.send(Request::get("/").header("x-sluice-cluster", "nope"));
    assert_eq!(unknown.status, 503);
    assert_eq!(unknown.code_details.as_deref(), Some("cluster_not_found"));
}

#[test]
fn failing_configuration_is_rejected_like_envoy() {
    // The probe accepts any config, so use a module path that does not exist
    // to check the error message instead.
    let err = sluice_host_tests::FilterModule::load("sluice-no-such-filter")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cargo xtask build"), "{err}");
}

#[test]
fn same_seed_gives_same_request_ids() {
    let ids = |seed| {
        let mut host = Host::new(HostOptions {
            workers: 1,
            seed,
            ..HostOptions::default()
        });
        host.add_cluster(Cluster::fixed(
            "backend",
            200,
            "ok",
            Duration::from_millis(5),
        ));
        host.add_filter(passthrough("plain", "")).unwrap();
        (0..3)
            .map(|_| {
                host.send(Request::get("/"))
                    .upstream_request_headers
                    .unwrap()
                    .get("x-request-id")
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(7), ids(7));
    assert_ne!(ids(7), ids(8));
}

#[test]
fn streamed_request_body_and_trailers_reach_the_filter_and_router() {
    let mut host = probe_host(1, "{}");
    let id = host.start_streaming(
        0,
        Request::new("POST", "/upload")
            .header("x-probe-id", "s")
            .chunk(b"ab"),
    );
    host.advance(Duration::from_millis(5));
    assert!(
        host.response(id).unwrap().headers_at_ns.is_none(),
        "router waits for the end of the request"
    );
    host.send_request_data(id, b"cd", false);
    host.send_request_trailers(id, &[("x-checksum", "42")]);
    let response = host.finish(id);
    let o = observations(&response);
    assert_eq!(
        o["request.trailers"],
        serde_json::json!([["x-checksum", "42"]])
    );
    let callbacks: Vec<&str> = o["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        &callbacks[..4],
        [
            "on_http_request_headers(n=7,eos=false)",
            "on_http_request_body(size=2,eos=false)",
            "on_http_request_body(size=2,eos=false)",
            "on_http_request_trailers(n=1)"
        ]
    );
    assert_eq!(response.upstream_request_body, b"abcd");
    assert_eq!(response.time_to_headers(), Some(Duration::from_millis(25)));
}
