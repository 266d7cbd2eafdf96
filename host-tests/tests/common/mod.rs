//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use sluice_host_tests::{Cluster, FilterModule, Host, HostOptions, PluginConfig, Response};

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
