//! How a [`Host`](super::Host) is set up: its workers, seed, route and
//! failure policy, and how each plugin is configured.
//!
//! These are the knobs Envoy takes from its bootstrap, route table and
//! `PluginConfig`/`VmConfig`. They are plain data so a scenario states its
//! Envoy configuration in one place, and their defaults are the values the
//! Envoy lab renders (so a test that sets nothing runs against the same
//! configuration the real Envoy tests use).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::module_cache::FilterModule;
use crate::world::NodeInfo;

/// What to do with a stream when a filter's VM has failed (trapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Answer 503 (Envoy's `FAIL_CLOSED`).
    FailClosed,
    /// Skip the filter on later streams (Envoy's `FAIL_OPEN`; the stream
    /// that trapped gets 503, as measured). Envoy's `FAIL_RELOAD` is not
    /// modelled.
    FailOpen,
}

/// The route every request takes (one virtual host, one route).
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// `xds.route_name`.
    pub name: String,
    /// Pick the cluster named by this request header (Envoy's `cluster_header`).
    pub cluster_header: Option<String>,
    /// Cluster used when there is no `cluster_header` (or it is absent).
    pub default_cluster: Option<String>,
    /// Header read by the `override_host` load balancer.
    pub override_host_header: String,
    /// Base of the router's jittered exponential retry back-off (Envoy: 25 ms).
    pub retry_base_interval: Duration,
    /// Cap of the back-off (Envoy: 10 × base).
    pub retry_max_interval: Duration,
    /// The route's `per_try_timeout`: an attempt whose response headers have
    /// not reached the router by then is abandoned (retried as a 504 under
    /// `5xx`/`gateway-error`, else answered 504). None: no per-try timeout.
    pub per_try_timeout: Option<Duration>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            name: "sluice-route".into(),
            cluster_header: None,
            default_cluster: Some("backend".into()),
            override_host_header: "x-gateway-destination-endpoint".into(),
            retry_base_interval: Duration::from_millis(25),
            retry_max_interval: Duration::from_millis(250),
            per_try_timeout: None,
        }
    }
}

/// Settings of a [`Host`].
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Worker threads, i.e. VMs per plugin.
    pub workers: usize,
    /// Seeds every random choice (endpoints' answers, back-off, request ids, `random_get`).
    pub seed: u64,
    /// Virtual time at start, ns since the epoch.
    pub start_time_ns: u64,
    pub route: RouteConfig,
    /// Add what Envoy's connection manager adds before the filters run
    /// (`:scheme`, `x-forwarded-proto`, `x-request-id`) and drop client-sent
    /// retry headers (Envoy only honours them from filters here).
    pub normalize_downstream: bool,
    pub failure_policy: FailurePolicy,
    pub node: NodeInfo,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            seed: 1,
            // 2026-01-01T00:00:00Z: a fixed, recognisable epoch.
            start_time_ns: 1_767_225_600_000_000_000,
            route: RouteConfig::default(),
            normalize_downstream: true,
            failure_policy: FailurePolicy::FailClosed,
            node: NodeInfo {
                id: "sidecar~10.0.0.10~sluice-test.default~default.svc.cluster.local".into(),
                cluster: "sluice-test".into(),
                metadata: BTreeMap::from([("NAME".into(), "sluice-test-0".into())]),
                locality: crate::world::Locality::zone("region", "zone-a"),
            },
        }
    }
}

/// How a plugin is configured (Envoy's `PluginConfig` + `VmConfig`).
#[derive(Clone, Debug)]
pub struct PluginConfig {
    pub module: FilterModule,
    /// `plugin_name`.
    pub name: String,
    /// `plugin_root_id` (Istio: the plugin name).
    pub root_id: String,
    /// `plugin_vm_id`; shared data and queues are scoped by it.
    pub vm_id: String,
    /// Bytes `on_configure` reads.
    pub configuration: Vec<u8>,
    /// Bytes `on_vm_start` reads.
    pub vm_configuration: Vec<u8>,
    /// Envoy's `PluginConfig.allow_on_headers_stop_iteration` (default false).
    ///
    /// Without it Envoy turns a `Pause` from `on_http_request_headers` (or
    /// `on_http_response_headers`) into `StopAllIterationAndWatermark`: the
    /// filter's body and trailer callbacks are not called while it holds the
    /// headers (the body is buffered), and it sees the buffered body only once
    /// it resumes. With it the pause is a plain `StopIteration` and body
    /// callbacks run while the headers are held (`sluice render envoy` sets it).
    pub allow_on_headers_stop_iteration: bool,
}

impl PluginConfig {
    pub fn new(module: FilterModule) -> Self {
        let name = module.name.clone();
        Self {
            module,
            root_id: name.clone(),
            vm_id: name.clone(),
            name,
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            allow_on_headers_stop_iteration: false,
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    pub fn root_id(mut self, root_id: &str) -> Self {
        self.root_id = root_id.into();
        self
    }

    pub fn vm_id(mut self, vm_id: &str) -> Self {
        self.vm_id = vm_id.into();
        self
    }

    pub fn configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.configuration = bytes.into();
        self
    }

    pub fn vm_configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = bytes.into();
        self
    }

    /// Sets [`PluginConfig::allow_on_headers_stop_iteration`].
    pub fn allow_on_headers_stop_iteration(mut self, allow: bool) -> Self {
        self.allow_on_headers_stop_iteration = allow;
        self
    }
}
