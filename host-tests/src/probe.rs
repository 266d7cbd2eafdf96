//! The conformance probe's observation document as the harness produces it,
//! and a field-by-field comparison with the document Envoy produces.
//!
//! The probe filter (`filters/probe`) answers each request with a JSON
//! document `{"probe": "sluice-probe", "version": 1, "observations": {..}}`.
//! The Envoy lab runs the same module in Envoy 1.40, sends the same request,
//! and diffs the two documents with [`compare`] (or the
//! `probe-observations` binary) to find where the harness is not Envoy.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use serde_json::Value;

use crate::{
    Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig, Request,
};

/// What to send through the probe, and how the upstream answers.
#[derive(Clone, Debug)]
pub struct ProbeRun {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub upstream_status: u32,
    pub upstream_body: String,
    /// Requests sent before the observed one (so `previous_stream_end` and
    /// the tick history are filled in), one per second.
    pub warmup_requests: usize,
    /// Plugin configuration (JSON) for the probe.
    pub configuration: String,
}

impl Default for ProbeRun {
    fn default() -> Self {
        Self {
            method: "POST".into(),
            path: "/v1/chat/completions?probe=1".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("user-agent".into(), "sluice-probe-client/1".into()),
            ],
            body: Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.into()),
            upstream_status: 200,
            upstream_body: r#"{"id":"x","choices":[]}"#.into(),
            warmup_requests: 1,
            configuration: r#"{"tick_ms":100}"#.into(),
        }
    }
}

/// The route and cluster names of the Envoy lab's rendered policy
/// (`policies/lab.toml`: the catch-all route `default` to cluster `primary`),
/// so that `xds.route_name` and `xds.cluster_name` compare as values.
pub const LAB_ROUTE: &str = "default";
pub const LAB_CLUSTER: &str = "primary";

/// Runs the probe in the harness (one worker, the route [`LAB_ROUTE`] to
/// cluster [`LAB_CLUSTER`] with one endpoint answering after 20 ms) and
/// returns the last request's document.
pub fn harness_observations(run: &ProbeRun) -> anyhow::Result<Value> {
    let module = FilterModule::load("sluice-probe")?;
    let mut options = HostOptions {
        workers: 1,
        ..HostOptions::default()
    };
    options.route.name = LAB_ROUTE.into();
    options.route.default_cluster = Some(LAB_CLUSTER.into());
    let mut host = Host::new(options);
    host.add_cluster(Cluster::new(
        LAB_CLUSTER,
        vec![Endpoint::new(
            "10.0.0.1:8000",
            "zone-a",
            EndpointBehavior::fixed(
                run.upstream_status,
                &run.upstream_body,
                Duration::from_millis(20),
            ),
        )],
    ));
    host.add_filter(
        PluginConfig::new(module)
            .name("sluice-probe")
            .root_id("sluice-probe")
            .configuration(run.configuration.clone()),
    )?;
    let request = || {
        let mut request = Request::new(&run.method, &run.path);
        for (k, v) in &run.headers {
            request = request.header(k, v);
        }
        if let Some(body) = &run.body {
            request = request
                .header("content-length", &body.len().to_string())
                .chunk(body.as_bytes());
        }
        request
    };
    for i in 0..run.warmup_requests {
        let _ = host.send(request().header("x-probe-id", &format!("warmup-{i}")));
        host.advance(Duration::from_secs(1));
    }
    let response = host.send(request().header("x-probe-id", "observed"));
    if let Some((_, _, reason)) = host.vm_failures().first() {
        return Err(anyhow!("the probe VM failed: {reason}"));
    }
    let text = if response.body.is_empty() {
        response
            .header("x-probe-observations")
            .unwrap_or_default()
            .to_owned()
    } else {
        response.body_text()
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "probe answer is not JSON (status {}): {text}",
            response.status
        )
    })
}

/// Observations whose values legitimately differ between two hosts (times,
/// ids, addresses, node identity); [`compare`] checks only that both have them.
pub const VOLATILE: &[&str] = &[
    "request.time_ns_at_headers",
    "response.time_ns_at_headers",
    "http_call.response_at_ns",
    "vm.ticks_ns",
    // Real ticks in Envoy jitter around tick_ms (97..101 ms seen for 100);
    // virtual time in the harness is exact (checked in tests/conformance.rs).
    "vm.tick_intervals_ms",
    "request_headers.property.request.time",
    "request_headers.property.request.id",
    "request_headers.property.source.",
    "request_headers.property.destination.",
    "request_headers.property.plugin_vm_id",
    "response_headers.property.upstream.",
    "response_headers.property.response.headers",
    "previous_stream_end.request.duration",
    "response.headers",
    "request.headers",
    "request_headers.property.request.headers",
];

/// One difference between two observation documents.
#[derive(Clone, Debug, PartialEq)]
pub enum Difference {
    OnlyLeft(String),
    OnlyRight(String),
    Value {
        key: String,
        left: Value,
        right: Value,
    },
}

/// Flattens a document's observations into dotted keys.
pub fn flatten(document: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        document.get("observations").unwrap_or(document),
        &mut out,
    );
    out
}

/// Field-by-field differences between two documents, ignoring the values
/// (not the presence) of [`VOLATILE`] observations.
pub fn compare(left: &Value, right: &Value) -> Vec<Difference> {
    let (l, r) = (flatten(left), flatten(right));
    let volatile = |k: &str| VOLATILE.iter().any(|v| k.starts_with(v));
    let mut out = Vec::new();
    for (k, lv) in &l {
        match r.get(k) {
            None => out.push(Difference::OnlyLeft(k.clone())),
            Some(rv) if lv != rv && !volatile(k) => out.push(Difference::Value {
                key: k.clone(),
                left: lv.clone(),
                right: rv.clone(),
            }),
            _ => {}
        }
    }
    for k in r.keys() {
        if !l.contains_key(k) {
            out.push(Difference::OnlyRight(k.clone()));
        }
    }
    out
}
