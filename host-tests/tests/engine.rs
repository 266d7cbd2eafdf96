//! The engine of `sluice.wasm`, whatever capabilities a policy enables:
//! requests that end with trailers are judged like any other, routing and
//! the removal of internal headers need no section, rewritten bodies carry
//! their length, and capabilities run in one pass (a request the breaker
//! turns away gives its tokens back).

use std::time::Duration;

use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig, Request,
    Response, RouteConfig,
};

fn module() -> FilterModule {
    FilterModule::load("sluice").expect("sluice.wasm (run `cargo xtask build`)")
}

/// Two backends, `primary` (model `big`) and `fallback` (`small`), and
/// whatever sections `sections` adds.
fn policy(sections: &str) -> String {
    format!(
        r#"
name = "engine-test"

[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["10.0.0.1:8000"]

[[backend]]
name = "fallback"
models = ["small"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["10.0.1.1:8000"]

{sections}
"#
    )
}

fn usage_json(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    )
}

/// A host routing as `sluice render envoy` does, with `primary` answering
/// `primary` and `fallback` a small JSON completion.
fn host(sections: &str, primary: EndpointBehavior) -> Host {
    let mut host = Host::new(HostOptions {
        workers: 2,
        route: RouteConfig {
            cluster_header: Some("x-sluice-backend".into()),
            default_cluster: Some("primary".into()),
            ..RouteConfig::default()
        },
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::new(
        "primary",
        vec![Endpoint::new("10.0.0.1:8000", "zone-a", primary)],
    ));
    host.add_cluster(Cluster::new(
        "fallback",
        vec![Endpoint::new(
            "10.0.1.1:8000",
            "zone-a",
            EndpointBehavior::fixed(200, &usage_json(5, 5), Duration::from_millis(10)),
        )],
    ));
    host.add_filter(
        PluginConfig::new(module())
            .name("sluice")
            .vm_id("sluice")
            .configuration(policy(sections))
            .allow_on_headers_stop_iteration(true),
    )
    .unwrap();
    host
}

fn body(model: &str, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(40)
    )
}

/// A request as HTTP/2 clients may send it: no content-length, the body in
/// two chunks, then trailers instead of an end-of-stream data frame.
fn with_trailers(model: &str, max_tokens: u64, tenant: &str) -> Request {
    let body = body(model, max_tokens);
    let (a, b) = body.split_at(body.len() / 2);
    Request::new("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-tenant-id", tenant)
        .chunk(a.as_bytes())
        .chunk(b.as_bytes())
        .trailer("x-client-checksum", "0")
}

fn reached_upstream(response: &Response) -> bool {
    response.upstream_request_headers.is_some()
}

#[test]
fn requests_ending_with_trailers_are_held_to_the_quota() {
    let mut host = host(
        r#"
[tokens]
  [[tokens.quota]]
  requests = "3/min"
"#,
        EndpointBehavior::fixed(200, &usage_json(10, 5), Duration::from_millis(10)),
    );
    let statuses: Vec<u32> = (0..5)
        .map(|_| host.send(with_trailers("big", 20, "acme")).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(
        host.metric("sluice_tokens.tenant.other.model.other.admitted"),
        3
    );
    // The body the upstream got is the whole body, and the trailers follow.
    let mut host2 = self::host(
        "[tokens]\n  [[tokens.quota]]\n  requests = \"3/min\"\n",
        EndpointBehavior::fixed(200, &usage_json(10, 5), Duration::from_millis(10)),
    );
    let ok = host2.send(with_trailers("big", 20, "acme"));
    assert_eq!(ok.status, 200);
    assert_eq!(ok.upstream_request_body, body("big", 20).as_bytes());
}

#[test]
fn a_malformed_body_ending_with_trailers_never_reaches_the_upstream() {
    let mut host = host(
        "[tokens]\n  [[tokens.quota]]\n  tokens = \"100k/min\"\n",
        EndpointBehavior::fixed(200, "{}", Duration::from_millis(10)),
    );
    let request = Request::new("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .chunk(b"{\"model\": \"big\", \"max_tokens\": -5")
        .trailer("x-end", "1");
    let response = host.send(request);
    assert_eq!(response.status, 400, "{}", response.body_text());
    assert!(!reached_upstream(&response));
}

#[test]
fn an_open_circuit_turns_away_requests_ending_with_trailers() {
    let mut host = host(
        r#"
[breaker]
mode = "consecutive"
consecutive_failures = 2
open_for = "60s"
jitter = "0%"
"#,
        EndpointBehavior::fixed(503, "{}", Duration::from_millis(10)),
    );
    for _ in 0..2 {
        assert_eq!(host.send(with_trailers("big", 20, "acme")).status, 503);
    }
    let refused = host.send(with_trailers("big", 20, "acme"));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("x-sluice-degraded"), Some("fail-fast"));
    assert!(
        !reached_upstream(&refused),
        "the open circuit let it through"
    );
}

#[test]
fn routing_by_model_and_header_stripping_need_no_section() {
    // Only [tokens] (nothing that judges backends): the model still picks
    // the backend, and a client cannot pick one itself.
    for sections in ["", "[tokens]\n  [[tokens.quota]]\n  tokens = \"1M/min\"\n"] {
        let mut host = host(
            sections,
            EndpointBehavior::fixed(200, &usage_json(1, 1), Duration::from_millis(10)),
        );
        let small = host.send(
            Request::post_json("/v1/chat/completions", &body("small", 10))
                .header("x-sluice-backend", "primary"),
        );
        assert_eq!(small.status, 200);
        let sent = small.upstream_request_headers.as_ref().unwrap();
        assert_eq!(
            sent.get("x-sluice-backend"),
            Some("fallback"),
            "sections: {sections:?}"
        );
        let big = host.send(
            Request::post_json("/v1/chat/completions", &body("big", 10))
                .header("x-sluice-backend", "fallback"),
        );
        let sent = big.upstream_request_headers.as_ref().unwrap();
        // The default backend needs no pin: the client's header is gone.
        assert_eq!(sent.get("x-sluice-backend"), None, "sections: {sections:?}");
        // And a non-LLM path loses it too.
        let models = host.send(Request::get("/v1/models").header("x-sluice-backend", "fallback"));
        let sent = models.upstream_request_headers.as_ref().unwrap();
        assert_eq!(sent.get("x-sluice-backend"), None);
    }
}

#[test]
fn rewritten_bodies_carry_their_new_length() {
    let mut host = host(
        "[tokens]\ninclude_usage = true\n  [[tokens.quota]]\n  tokens = \"1M/min\"\n",
        EndpointBehavior::fixed(200, &usage_json(1, 1), Duration::from_millis(10)),
    );
    let original = r#"{"model":"big","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = host.send(Request::post_json("/v1/chat/completions", original));
    let sent = response.upstream_request_headers.as_ref().unwrap();
    let body = &response.upstream_request_body;
    assert!(body.len() > original.len(), "include_usage was added");
    assert_eq!(
        sent.get("content-length"),
        Some(body.len().to_string().as_str())
    );
}

#[test]
fn a_request_the_breaker_turns_away_gives_its_tokens_back() {
    let sections = r#"
[tokens]
  [[tokens.quota]]
  tokens = "2000/min"

[breaker]
mode = "consecutive"
consecutive_failures = 1
open_for = "60s"
jitter = "0%"
"#;
    let mut host = host(
        sections,
        EndpointBehavior::fixed(503, "{}", Duration::from_millis(10)),
    );
    // Trips the circuit; the failed call is charged nothing beyond its prompt.
    assert_eq!(host.send(with_trailers("big", 500, "acme")).status, 503);
    // Turned away by the open circuit after the tokens were reserved: each
    // of these would hold 510 of the 2000 tokens if nothing gave them back.
    for _ in 0..5 {
        let refused = host.send(with_trailers("big", 500, "acme"));
        assert_eq!(refused.header("x-sluice-degraded"), Some("fail-fast"));
        assert!(!reached_upstream(&refused));
    }
    let reserved = host.metric("sluice_tokens.tenant.other.model.other.tokens_reserved");
    let refunded = host.metric("sluice_tokens.tenant.other.model.other.tokens_refunded");
    assert_eq!(reserved, 6 * 510);
    assert_eq!(refunded, 6 * 510, "every reservation was given back");
}

#[test]
fn a_fallback_reroute_sends_a_body_of_the_right_length() {
    let sections = r#"
[breaker]
mode = "consecutive"
consecutive_failures = 1
open_for = "60s"
jitter = "0%"
  [breaker.degrade]
  action = "fallback-model"
  fallback_model = "small"
"#;
    let mut host = host(
        sections,
        EndpointBehavior::fixed(503, "{}", Duration::from_millis(10)),
    );
    assert_eq!(
        host.send(Request::post_json("/v1/chat/completions", &body("big", 10)))
            .status,
        503
    );
    let rerouted = host.send(Request::post_json("/v1/chat/completions", &body("big", 10)));
    assert_eq!(rerouted.status, 200);
    assert_eq!(rerouted.header("x-sluice-degraded"), Some("fallback-model"));
    let sent = rerouted.upstream_request_headers.as_ref().unwrap();
    let body: serde_json::Value = serde_json::from_slice(&rerouted.upstream_request_body).unwrap();
    assert_eq!(body["model"], "small");
    assert_eq!(
        sent.get("content-length"),
        Some(rerouted.upstream_request_body.len().to_string().as_str())
    );
}

#[test]
fn the_attempt_instance_sees_every_upstream_attempt() {
    let mut host = Host::new(HostOptions {
        workers: 1,
        route: RouteConfig {
            cluster_header: Some("x-sluice-backend".into()),
            default_cluster: Some("primary".into()),
            ..RouteConfig::default()
        },
        ..HostOptions::default()
    });
    let fail = || EndpointBehavior::fixed(503, "{}", Duration::from_millis(5));
    host.add_cluster(Cluster::new(
        "primary",
        vec![
            Endpoint::new("10.0.0.1:8000", "zone-a", fail()),
            Endpoint::new("10.0.0.2:8000", "zone-a", fail()),
            Endpoint::new(
                "10.0.0.3:8000",
                "zone-a",
                EndpointBehavior::fixed(200, &usage_json(5, 5), Duration::from_millis(5)),
            ),
        ],
    ));
    let sections = "[tokens]\n  [[tokens.quota]]\n  tokens = \"1M/min\"\n";
    // The router's retries, set by a filter (Envoy ignores a client's).
    host.add_filter(
        PluginConfig::new(FilterModule::load("sluice-probe").unwrap())
            .name("retries")
            .vm_id("retries")
            .configuration(r#"{"mode":"passthrough","retry_on":"5xx","max_retries":2}"#),
    )
    .unwrap();
    host.add_filter(
        PluginConfig::new(module())
            .name("sluice")
            .vm_id("sluice")
            .configuration(policy(sections))
            .allow_on_headers_stop_iteration(true),
    )
    .unwrap();
    // As `sluice render envoy --attempt-filter` adds it to each cluster.
    host.add_upstream_filter(
        "primary",
        PluginConfig::new(module())
            .name("sluice.attempt")
            .root_id("sluice.attempt")
            .vm_id("sluice")
            .configuration(policy(sections)),
    )
    .unwrap();
    let response = host.send(Request::post_json("/v1/chat/completions", &body("big", 10)));
    assert_eq!(response.status, 200);
    assert_eq!(response.attempts, 3);
    assert_eq!(host.metric("sluice.attempts"), 3);
    assert_eq!(host.metric("sluice.attempt_retries"), 2);
    // The request's own instance saw one request, and settled it once.
    assert_eq!(
        host.metric("sluice_tokens.tenant.other.model.other.admitted"),
        1
    );
}
