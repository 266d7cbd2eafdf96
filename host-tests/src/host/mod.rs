//! The simulated Envoy: plugins with one VM per worker, streams through a
//! filter chain, a router with retries and `override_host`, simulated
//! clusters, and a virtual clock that moves only when the test moves it.
//!
//! [`Host`] is the one value a test holds; its behaviour is split by the
//! concern it imitates, because each concern has its own Envoy rules to get
//! right and its own way of being wrong:
//!
//! - [`options`]: what Envoy's bootstrap, route and `PluginConfig` would say;
//! - `client`: the requests a test sends and the responses it gets back;
//! - `streams`: how a stream opens, what is kept about it, how it ends;
//! - `chain`: frames through the filters, pause/resume, local replies;
//! - `router`: route and cluster choice, `override_host`, attempts, retries;
//! - `plugins`: worker VMs, contexts, and every call into a guest;
//! - `upstream_filters`: a cluster's Wasm filters, run once per attempt;
//! - `callouts`: `dispatch_http_call` answered by the simulated clusters;
//! - `schedule`: the virtual clock and the event queue that drives it all.
//!
//! Everything happens on the test's thread, driven by one event queue ordered
//! by (virtual time, sequence number): the same inputs and seed give the same
//! sequence of guest calls, so a scenario is exactly reproducible.

mod callouts;
mod chain;
mod client;
pub mod options;
mod plugins;
mod router;
mod schedule;
mod streams;
mod upstream_filters;

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;

use crate::census::Census;
use crate::prng::Prng;
use crate::upstream::Cluster;
use crate::vm::{OutgoingCall, StreamAction};
use crate::world::{LogRecord, Metrics, World};

pub use client::{Request, Response};
pub use options::{FailurePolicy, HostOptions, PluginConfig, RouteConfig};

use plugins::Plugin;
use schedule::{Event, Scheduled};
use streams::Stream;

/// Index of a plugin in a [`Host`] (its position in the filter chain).
pub type PluginId = usize;

/// Identifies a stream within a [`Host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// A simulated Envoy with its filter chain, router and upstreams.
pub struct Host {
    world: Rc<RefCell<World>>,
    options: HostOptions,
    plugins: Vec<Plugin>,
    clusters: BTreeMap<String, Cluster>,
    events: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    streams: BTreeMap<StreamId, Stream>,
    finished: HashMap<StreamId, Response>,
    /// Tags given to scheduled requests, by the stream they became.
    tags: HashMap<StreamId, u64>,
    /// The stream of each (plugin, worker, context id).
    context_index: HashMap<(PluginId, usize, u32), StreamId>,
    /// Stream actions the guests asked for, run once the current guest call
    /// returns (Envoy defers them the same way).
    pending: VecDeque<(PluginId, usize, u32, StreamAction)>,
    rng: Prng,
    next_stream: u64,
    next_worker: usize,
    /// Guest calls made so far (for benchmarks).
    pub guest_calls: u64,
    /// Streams in the order they finished.
    completion_order: Vec<StreamId>,
    keep_finished: bool,
    /// Every `dispatch_http_call` the filters made, in order.
    http_calls: Vec<OutgoingCall>,
    finished_total: usize,
    /// Host calls per phase, shared with every VM (see [`Host::census`]).
    census: Rc<RefCell<Census>>,
}

impl Host {
    pub fn new(options: HostOptions) -> Self {
        let mut world = World::new(options.start_time_ns);
        world.node = options.node.clone();
        let rng = Prng::derive(options.seed, 0x5EED);
        Self {
            world: Rc::new(RefCell::new(world)),
            options,
            plugins: Vec::new(),
            clusters: BTreeMap::new(),
            events: BinaryHeap::new(),
            seq: 0,
            streams: BTreeMap::new(),
            finished: HashMap::new(),
            tags: HashMap::new(),
            context_index: HashMap::new(),
            pending: VecDeque::new(),
            rng,
            next_stream: 1,
            next_worker: 0,
            guest_calls: 0,
            completion_order: Vec::new(),
            keep_finished: true,
            http_calls: Vec::new(),
            finished_total: 0,
            census: Rc::new(RefCell::new(Census::default())),
        }
    }

    /// A host with default options and `workers` workers.
    pub fn with_workers(workers: usize) -> Self {
        Self::new(HostOptions {
            workers,
            ..HostOptions::default()
        })
    }

    pub fn options(&self) -> &HostOptions {
        &self.options
    }

    /// Adds a cluster for the router and for `dispatch_http_call`.
    pub fn add_cluster(&mut self, cluster: Cluster) {
        self.world
            .borrow_mut()
            .cluster_names
            .insert(cluster.name.clone());
        self.clusters.insert(cluster.name.clone(), cluster);
    }

    pub fn cluster_mut(&mut self, name: &str) -> Option<&mut Cluster> {
        self.clusters.get_mut(name)
    }

    pub fn metrics(&self) -> std::cell::Ref<'_, Metrics> {
        std::cell::Ref::map(self.world.borrow(), |w| &w.metrics)
    }

    /// Counter or gauge value by the name the filter defined (0 if undefined).
    pub fn metric(&self, name: &str) -> i64 {
        self.world.borrow().metrics.value(name)
    }

    pub fn logs(&self) -> Vec<LogRecord> {
        self.world.borrow().logs.clone()
    }

    /// Every log message containing `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<String> {
        self.world
            .borrow()
            .logs
            .iter()
            .filter(|r| r.message.contains(needle))
            .map(|r| r.message.clone())
            .collect()
    }

    fn log_text(&self) -> String {
        self.world
            .borrow()
            .logs
            .iter()
            .map(|r| format!("[{:?} {}#{}] {}", r.level, r.plugin, r.worker, r.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every `dispatch_http_call` the filters made so far (cluster, headers, body).
    pub fn http_calls(&self) -> &[OutgoingCall] {
        &self.http_calls
    }

    /// A shared-data value as the given `vm_id` sees it.
    pub fn shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.world
            .borrow()
            .shared_data
            .get(vm_id, key.as_bytes())
            .ok()
    }

    /// Sets shared data from the test (cas 0: overwrite).
    pub fn set_shared_data(&mut self, vm_id: &str, key: &str, value: &[u8]) {
        self.world
            .borrow_mut()
            .shared_data
            .set(vm_id, key.as_bytes(), value, 0);
    }

    /// The host calls every filter made so far, per phase, with the bytes
    /// copied in and out of guest memory (see [`crate::census`]).
    pub fn census(&self) -> std::cell::Ref<'_, Census> {
        self.census.borrow()
    }

    /// Starts a new census (for example before the request to measure).
    pub fn reset_census(&mut self) {
        self.census.borrow_mut().reset();
    }

    /// The world's state, for anything not covered above.
    pub fn world(&self) -> std::cell::Ref<'_, World> {
        self.world.borrow()
    }
}
