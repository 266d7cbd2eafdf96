//! A proxy-wasm host on wasmtime that behaves like Envoy 1.40, for testing
//! sluice's filters as the `.wasm` modules they ship as.
//!
//! The existing proxy-wasm test framework keeps global state (tests run one at
//! a time), has no WASI, and wants strictly ordered mock expectations. This
//! host instead *simulates*: several worker VMs per plugin sharing one
//! shared-data store, a virtual clock with tick timers, a filter chain with
//! Envoy's pause/resume and local-reply rules, a router with `cluster_header`,
//! `override_host` and retries, and seeded simulated upstreams. Everything
//! lives in one [`Host`] value (the wasmtime `Store` data of each VM points to
//! it), so tests run in parallel; only compiled modules are cached process-wide.
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_host_tests::{Cluster, FilterModule, Host, PluginConfig, Request};
//!
//! let module = FilterModule::load("sluice-probe").unwrap();
//! let mut host = Host::with_workers(2);
//! host.add_cluster(Cluster::fixed("backend", 200, "{}", Duration::from_millis(20)));
//! host.add_filter(PluginConfig::new(module).configuration(r#"{"tick_ms":100}"#)).unwrap();
//! let response = host.send(Request::get("/v1/models"));
//! assert_eq!(response.status, 200);
//! host.advance(Duration::from_secs(1)); // ticks fire on both workers
//! ```
//!
//! Where Envoy's behaviour is subtle, the module docs say what the harness
//! does and why (see [`stream_data::Access`] for header-map lifetimes).

pub mod abi;
pub mod census;
pub mod headers;
pub mod host;
pub mod mesh;
pub mod module_cache;
pub mod prng;
pub mod probe;
pub mod properties;
pub mod stream_data;
pub mod upstream;
mod vm;
pub mod world;

pub use abi::{Action, LogLevel, MetricType, Status};
pub use census::{CallStats, CallbackStats, Census, Phase};
pub use headers::HeaderMap;
pub use host::{
    FailurePolicy, Host, HostOptions, PluginConfig, PluginId, Request, Response, RouteConfig,
    StreamId,
};
pub use module_cache::{FilterModule, locate_filter};
pub use prng::Prng;
pub use upstream::{AttemptPlan, BodySpec, Cluster, Endpoint, EndpointBehavior, Fault, FaultKind};
pub use vm::{CallResponse, LocalReply, OutgoingCall};
pub use world::{Locality, LogRecord, Metric, NodeInfo};
