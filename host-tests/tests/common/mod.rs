//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use sluice_host_tests::{
    Cluster, FilterModule, Host, HostOptions, PluginConfig, Request, Response,
};

pub fn probe() -> FilterModule {
    FilterModule::load("sluice-probe").expect("probe module (build it with `cargo xtask build`)")
}

/// A host with `workers` workers, a `backend` cluster answering 200 after 20 ms,
/// and the probe configured with `config`.
pub fn probe_host(workers: usize, config: &str) -> Host {
    let mut host = Host::new(HostOptions {
        workers,
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
            .name("sluice-probe")
            .vm_id("sluice-probe")
            .configuration(config),
    )
    .unwrap();
    host
}

/// The probe's observations from a response (body, or header when the body is empty).
pub fn observations(response: &Response) -> Value {
    let text = if response.body.is_empty() {
        response
            .header("x-probe-observations")
            .unwrap_or_default()
            .to_owned()
    } else {
        response.body_text()
    };
    let doc: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    doc["observations"].clone()
}

/// `sluice.wasm`, as `cargo xtask build` leaves it.
pub fn sluice() -> FilterModule {
    FilterModule::load("sluice").expect("sluice.wasm (build it with `cargo xtask build`)")
}

/// The route as `sluice render envoy` writes it: the cluster named by
/// `x-sluice-backend`, else `default`.
pub fn rendered_route(default: &str) -> sluice_host_tests::RouteConfig {
    sluice_host_tests::RouteConfig {
        cluster_header: Some("x-sluice-backend".into()),
        default_cluster: Some(default.into()),
        ..sluice_host_tests::RouteConfig::default()
    }
}

/// `sluice.wasm` with `policy`, configured as `sluice render envoy` does,
/// in the role `root_id` names: `sluice` (the listener's chain) or
/// `sluice.attempt` (a cluster's upstream filters); one `vm_id`.
pub fn sluice_filter(root_id: &str, policy: &str) -> PluginConfig {
    PluginConfig::new(sluice())
        .name(root_id)
        .root_id(root_id)
        .vm_id("sluice")
        .configuration(policy)
        .allow_on_headers_stop_iteration(true)
}

/// Schedules `rps` requests per second from `from` for `seconds`, tagged
/// with their start in ms, and runs until all have finished (bounded by
/// `seconds` + `slack` of virtual time).
pub fn load(
    host: &mut Host,
    from: Duration,
    seconds: u64,
    rps: u64,
    slack: Duration,
    request: impl Fn() -> Request,
) {
    let total = seconds * rps;
    let before = host.finished_count();
    for i in 0..total {
        let at = from + Duration::from_millis(i * 1000 / rps);
        host.schedule_request(at, None, request(), at.as_millis() as u64);
    }
    let finished = host.run_until(Duration::from_secs(seconds) + slack, |h| {
        h.finished_count() == before + total as usize
    });
    assert!(finished, "requests still running after the bound");
}

/// (start ms, response) of every finished request (tagged by [`load`]).
pub fn responses(host: &Host) -> Vec<(u64, Response)> {
    host.completed()
        .into_iter()
        .map(|(_, tag, r)| (tag.unwrap_or(0), r.clone()))
        .collect()
}
