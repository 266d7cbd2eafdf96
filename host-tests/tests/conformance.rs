//! The conformance probe in the harness: what a filter observes must match
//! Envoy 1.40's documented behaviour (the lab checks the same document in Envoy).

mod common;

use serde_json::json;
use sluice_host_tests::probe::{Difference, ProbeRun, compare, harness_observations};

#[test]
fn probe_document_reports_envoy_semantics() {
    let doc = harness_observations(&ProbeRun::default()).unwrap();
    assert_eq!(doc["probe"], "sluice-probe");
    let o = &doc["observations"];

    // Shared data CAS: a stale non-zero cas fails, cas 0 overwrites.
    assert_eq!(o["shared_data.get_missing"], "none");
    assert_eq!(o["shared_data.set_new_cas0"], "Ok");
    assert_eq!(o["shared_data.get_after_set"], "v1");
    assert_eq!(o["shared_data.cas_nonzero"], true);
    assert_eq!(o["shared_data.set_fresh_cas"], "Ok");
    assert_eq!(o["shared_data.set_stale_cas"], "CasMismatch");
    assert_eq!(o["shared_data.set_cas0_overwrites"], "Ok");
    assert_eq!(o["shared_data.get_after_overwrite"], "v4");
    assert_eq!(o["shared_data.cas_changed"], true);

    // Metrics: counters reject non-positive increments, histograms cannot be read.
    assert_eq!(o["metrics.counter_increment_by_1"], 1);
    assert_eq!(o["metrics.counter_increment_negative"], "BadArgument");
    assert_eq!(o["metrics.counter_increment_zero"], "BadArgument");
    assert_eq!(o["metrics.gauge_after_set10_minus3"], 7);
    assert_eq!(o["metrics.histogram_get"], "BadArgument");
    assert_eq!(o["metrics.unknown_id_increment"], "NotFound");

    // Header maps: lowercase names, pseudo-headers first, first value wins,
    // missing header is NotFound, lookups are case-insensitive.
    let headers = o["request.headers"].as_array().unwrap();
    let names: Vec<&str> = headers.iter().map(|p| p[0].as_str().unwrap()).collect();
    assert_eq!(&names[..4], [":method", ":path", ":authority", ":scheme"]);
    assert!(names.contains(&"x-request-id") && names.contains(&"x-forwarded-proto"));
    assert_eq!(o["request.header_missing"]["status"], "NotFound");
    assert_eq!(o["request.header_uppercase_lookup"], "POST");
    assert_eq!(o["request.multi_value_lookup"], "a");
    assert_eq!(o["request.property_headers_multi"]["value"], "a,b");
    assert_eq!(o["request.num_headers_arg"], headers.len());

    // Property encodings: strings raw, integers 8-byte little-endian,
    // request.time in ns since the epoch (= the clock at request headers).
    let p = |k: &str| &o[format!("request_headers.property.{k}")];
    assert_eq!(p("request.path")["value"], "/v1/chat/completions?probe=1");
    assert_eq!(p("request.url_path")["value"], "/v1/chat/completions");
    assert_eq!(p("request.query")["value"], "probe=1");
    assert_eq!(p("request.method")["value"], "POST");
    assert_eq!(p("request.useragent")["value"], "sluice-probe-client/1");
    assert_eq!(p("request.time")["value"], o["request.time_ns_at_headers"]);
    assert_eq!(p("request.time")["hex"].as_str().unwrap().len(), 16);
    assert_eq!(p("plugin_name")["value"], "sluice-probe");
    assert_eq!(p("plugin_root_id")["value"], "sluice-probe");
    assert_eq!(p("upstream.address")["status"], "NotFound");
    assert_eq!(p("response.code")["status"], "NotFound");
    assert_eq!(p("no_such_property")["status"], "NotFound");
    // Envoy 1.40's top-level wasm attributes are only plugin_* and
    // connection_id; node, route and cluster live under `xds.`.
    for gone in [
        "node.id",
        "node.locality.zone",
        "route_name",
        "listener_direction",
    ] {
        assert_eq!(p(gone)["status"], "NotFound", "{gone}");
    }
    // The route is resolved before the filters see the request headers.
    assert_eq!(p("xds.cluster_name")["value"], "primary");
    assert_eq!(p("xds.route_name")["value"], "default");
    let r = |k: &str| &o[format!("response_headers.property.{k}")];
    assert_eq!(r("response.code")["value"], 200);
    assert_eq!(r("response.code")["hex"], "c800000000000000");
    assert_eq!(r("response.code_details")["value"], "via_upstream");
    assert_eq!(r("response.flags")["value"], 0);
    assert_eq!(r("upstream.address")["value"], "10.0.0.1:8000");
    assert_eq!(r("upstream.port")["value"], 8000);
    assert_eq!(r("upstream.request_attempt_count")["value"], 1);
    assert_eq!(r("xds.cluster_name")["value"], "primary");
    assert_eq!(r("cluster_name")["status"], "NotFound");

    // Envoy drops a filter's request headers once it continues.
    assert_eq!(o["response.request_header_status"]["status"], "BadArgument");

    // Callback order of a whole stream, and of its end (log before done).
    assert_eq!(
        o["callbacks"],
        json!([
            "on_http_request_headers(n=10,eos=false)",
            "on_http_request_body(size=57,eos=false)",
            "on_http_request_body(size=0,eos=true)",
            "on_http_response_headers(n=4,eos=false)",
            "on_http_response_body(size=23,eos=false)",
            "on_http_response_body(size=0,eos=true)"
        ])
    );
    // The body went on with its eos=false call: nothing is buffered at eos.
    assert_eq!(o["request.body"], serde_json::Value::Null);
    let end = &o["previous_stream_end"];
    let callbacks = end["callbacks"].as_array().unwrap();
    assert_eq!(
        callbacks[callbacks.len() - 2..],
        [json!("on_log"), json!("on_done")]
    );
    assert_eq!(end["response.code"]["value"], 200);
    assert_eq!(end["upstream.request_attempt_count"]["value"], 1);
    assert_eq!(end["request.duration"]["value"], 20_000_000);

    // Ticks: every 100 ms of virtual time, exactly.
    assert_eq!(o["vm.tick_period_ms"], 100);
    let intervals = o["vm.tick_intervals_ms"].as_array().unwrap();
    assert!(intervals.len() >= 9, "{intervals:?}");
    assert!(intervals.iter().all(|i| i == 100), "{intervals:?}");
    assert_eq!(o["response.upstream_body"], r#"{"id":"x","choices":[]}"#);
}

#[test]
fn local_reply_has_envoys_shape_and_passes_the_senders_response_path() {
    let mut run = ProbeRun::default();
    run.headers
        .push(("x-probe-local-reply".into(), "429".into()));
    let o = harness_observations(&run).unwrap()["observations"].clone();
    // The filter sees its own local reply in on_http_response_headers.
    assert_eq!(
        o["response.headers"],
        json!([
            [":status", "429"],
            ["x-probe-local", "yes"],
            ["x-probe-case", "Mixed"],
            ["content-length", "17"],
            ["content-type", "text/plain"]
        ])
    );
    assert_eq!(o["response.upstream_body"], "probe local reply");
    // The request body never reaches the filter after it answered.
    let callbacks = o["callbacks"].as_array().unwrap();
    assert!(
        !callbacks
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("on_http_request_body"))
    );
    assert_eq!(o["response_headers.property.response.code"]["value"], 429);
}

#[test]
fn compare_flags_real_differences_and_ignores_volatile_ones() {
    let doc = harness_observations(&ProbeRun::default()).unwrap();
    assert!(compare(&doc, &doc).is_empty());
    let mut other = doc.clone();
    let o = other["observations"].as_object_mut().unwrap();
    o.insert("shared_data.set_stale_cas".into(), json!("Ok"));
    o.insert("request.time_ns_at_headers".into(), json!(1));
    o.remove("metrics.histogram_get");
    let diffs = compare(&doc, &other);
    assert_eq!(
        diffs,
        vec![
            Difference::OnlyLeft("metrics.histogram_get".into()),
            Difference::Value {
                key: "shared_data.set_stale_cas".into(),
                left: json!("CasMismatch"),
                right: json!("Ok")
            },
        ]
    );
}
