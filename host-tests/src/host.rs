//! The simulated Envoy: plugins with one VM per worker, streams through a
//! filter chain, a router with retries and `override_host`, simulated
//! clusters, and a virtual clock that moves only when the test moves it.
//!
//! Everything happens on the test's thread, driven by one event queue ordered
//! by (virtual time, sequence number): the same inputs and seed give the same
//! sequence of guest calls, so a scenario is exactly reproducible.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use anyhow::anyhow;
use wasmtime::InstancePre;

use crate::abi::{Action, LogLevel, StreamType, response_flags};
use crate::headers::HeaderMap;
use crate::module_cache::FilterModule;
use crate::prng::Prng;
use crate::properties::PluginIdentity;
use crate::stream_data::{Access, StreamData, UpstreamHost};
use crate::upstream::{AttemptPlan, Cluster, ResponsePlan};
use crate::vm::{
    CallResponse, ConfigPhase, LocalReply, OutgoingCall, StreamAction, StreamContext, VmState,
    WorkerVm,
};
use crate::world::{LogRecord, Metrics, NodeInfo, QueueOwner, World};

/// Index of a plugin in a [`Host`] (its position in the filter chain).
pub type PluginId = usize;

/// Identifies a stream within a [`Host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// What to do with a stream when a filter's VM has failed (trapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Answer 503 (Envoy's `FAIL_CLOSED`).
    FailClosed,
    /// Skip the filter (Envoy's `FAIL_OPEN`).
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

/// A request as the client sends it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub headers: Vec<(String, String)>,
    /// Body chunks, delivered in order.
    pub body: Vec<Vec<u8>>,
    pub trailers: Option<Vec<(String, String)>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), "sluice.test".into()),
            ],
            body: Vec::new(),
            trailers: None,
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    /// A POST with a JSON body in one chunk (and its content-length).
    pub fn post_json(path: &str, body: &str) -> Self {
        Self::new("POST", path)
            .header("content-type", "application/json")
            .header("content-length", &body.len().to_string())
            .chunk(body.as_bytes())
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn chunk(mut self, bytes: &[u8]) -> Self {
        self.body.push(bytes.to_vec());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .get_or_insert_with(Vec::new)
            .push((name.into(), value.into()));
        self
    }
}

/// What the client received.
#[derive(Clone, Debug, Default)]
pub struct Response {
    /// `:status`, 0 if no headers arrived.
    pub status: u32,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Each body chunk with the virtual time it reached the client (ns).
    pub chunks: Vec<(u64, Vec<u8>)>,
    pub trailers: Option<HeaderMap>,
    /// A filter or the router answered locally.
    pub local_reply: bool,
    /// The stream was reset (after or instead of a response).
    pub reset: bool,
    pub started_ns: u64,
    pub headers_at_ns: Option<u64>,
    pub completed_ns: Option<u64>,
    /// Upstream attempts the router made.
    pub attempts: u64,
    /// Address of the endpoint that answered last.
    pub upstream: Option<String>,
    /// `response.code_details` at the end.
    pub code_details: Option<String>,
    /// `response.flags` at the end.
    pub flags: u64,
    pub worker: usize,
    /// Request headers as the router saw them (after every filter), if the
    /// request reached it.
    pub upstream_request_headers: Option<HeaderMap>,
    /// Request body as the router received it.
    pub upstream_request_body: Vec<u8>,
}

impl Response {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Time from the start to the response headers.
    pub fn time_to_headers(&self) -> Option<Duration> {
        self.headers_at_ns
            .map(|t| Duration::from_nanos(t - self.started_ns))
    }

    /// Time from the start to the end of the response.
    pub fn duration(&self) -> Option<Duration> {
        self.completed_ns
            .map(|t| Duration::from_nanos(t - self.started_ns))
    }

    pub fn is_complete(&self) -> bool {
        self.completed_ns.is_some()
    }
}

// --- internals ---

struct Plugin {
    config: PluginConfig,
    vms: Vec<WorkerVm>,
    /// Current tick period of each worker's VM (0 = off).
    tick_ms: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

#[derive(Debug)]
enum Frame {
    Headers { eos: bool },
    Data { bytes: Vec<u8>, eos: bool },
    Trailers,
}

/// What a stopped filter holds back.
#[derive(Debug, Default)]
struct Held {
    /// Position (in the direction's order) of the filter that stopped.
    at: usize,
    headers: Option<bool>,
    body: Option<(Vec<u8>, bool)>,
    trailers: bool,
    /// The filter paused its headers without `allow_on_headers_stop_iteration`
    /// (Envoy's `StopAllIterationAndWatermark`): later body and trailers are
    /// buffered without calling it, and reach it only when it resumes.
    stop_all: bool,
}

#[derive(Default)]
struct RouterState {
    body: Vec<u8>,
    started: bool,
    cluster: Option<String>,
    override_hosts: Vec<String>,
    retry_on: Vec<String>,
    retriable_codes: Vec<u32>,
    retries_left: u32,
    retried: bool,
    attempt: u64,
    /// Bumped per attempt and when the stream stops: stale events are dropped.
    generation: u64,
    plan: Option<Rc<ResponsePlan>>,
}

struct Stream {
    worker: usize,
    data: Rc<RefCell<StreamData>>,
    /// Per chain position: plugin and the context id once created.
    slots: Vec<(PluginId, Option<u32>)>,
    request_held: Option<Held>,
    response_held: Option<Held>,
    /// Chain positions the response visits, in order (created filters, reversed).
    response_order: Vec<usize>,
    response_started: bool,
    local_reply_sent: bool,
    router: RouterState,
    response: Response,
    done: bool,
}

enum Event {
    Tick {
        plugin: PluginId,
        worker: usize,
        generation: u64,
    },
    CallDone {
        plugin: PluginId,
        worker: usize,
        context_id: u32,
        token: u32,
        response: CallResponse,
    },
    QueueReady {
        owner: QueueOwner,
        queue_id: u32,
    },
    StartRequest {
        worker: Option<usize>,
        request: Box<Request>,
        tag: u64,
    },
    AttemptHeaders {
        stream: StreamId,
        generation: u64,
    },
    AttemptConnectFailure {
        stream: StreamId,
        generation: u64,
    },
    AttemptChunk {
        stream: StreamId,
        generation: u64,
        index: usize,
    },
    AttemptReset {
        stream: StreamId,
        generation: u64,
    },
    Retry {
        stream: StreamId,
        generation: u64,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Outcome of calling into a VM.
enum Called<R> {
    Returned(R),
    /// The module does not export this callback.
    Missing,
    /// The VM trapped now or earlier.
    Failed,
}

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
    context_index: HashMap<(PluginId, usize, u32), StreamId>,
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

    /// Appends a filter to the chain: one VM per worker, each initialised
    /// (`_initialize`, root context, `on_vm_start`, `on_configure`).
    /// Fails if a VM cannot start or `on_configure` returns false (Envoy
    /// rejects the configuration then).
    pub fn add_filter(&mut self, config: PluginConfig) -> anyhow::Result<PluginId> {
        let pre: InstancePre<VmState> = crate::vm::instance_pre(&config.module)?;
        let plugin_id = self.plugins.len();
        let identity = Rc::new(PluginIdentity {
            name: config.name.clone(),
            root_id: config.root_id.clone(),
            vm_id: config.vm_id.clone(),
        });
        let plugin_configuration = Rc::new(config.configuration.clone());
        let vm_configuration = Rc::new(config.vm_configuration.clone());
        let mut vms = Vec::new();
        for worker in 0..self.options.workers {
            let state = VmState {
                world: self.world.clone(),
                identity: identity.clone(),
                plugin: plugin_id,
                worker,
                plugin_configuration: plugin_configuration.clone(),
                vm_configuration: vm_configuration.clone(),
                memory: None,
                allocate: None,
                root_context_id: 1,
                current_context: 0,
                effective_context: 0,
                contexts: HashMap::new(),
                config_phase: ConfigPhase::None,
                tick_period_ms: None,
                metric_ids: HashMap::new(),
                next_metric_serial: 0,
                next_call_token: 0,
                outgoing_calls: Vec::new(),
                pending_calls: HashMap::new(),
                call_response: None,
                actions: Vec::new(),
                rng: Prng::derive(
                    self.options.seed,
                    ((plugin_id as u64) << 32) | worker as u64,
                ),
                unsupported_calls: Vec::new(),
            };
            let mut vm = WorkerVm::instantiate(&pre, state)
                .map_err(|e| anyhow!("{} worker {worker}: {e}", config.name))?;
            vm.next_context_id = 2;
            vms.push(vm);
        }
        self.plugins.push(Plugin {
            config,
            vms,
            tick_ms: vec![0; self.options.workers],
        });
        for worker in 0..self.options.workers {
            let vm_len = vm_configuration.len() as u32;
            let config_len = plugin_configuration.len() as u32;
            let _ = self.call(plugin_id, worker, 1, |e, s| {
                e.on_context_create.as_ref().map(|f| f.call(s, (1, 0)))
            });
            self.set_config_phase(plugin_id, worker, ConfigPhase::VmStart);
            let started = self.call(plugin_id, worker, 1, |e, s| {
                e.on_vm_start.as_ref().map(|f| f.call(s, (1, vm_len)))
            });
            self.set_config_phase(plugin_id, worker, ConfigPhase::Configure);
            let configured = self.call(plugin_id, worker, 1, |e, s| {
                e.on_configure.as_ref().map(|f| f.call(s, (1, config_len)))
            });
            self.set_config_phase(plugin_id, worker, ConfigPhase::None);
            let name = &self.plugins[plugin_id].config.name;
            match (started, configured) {
                (Called::Failed, _) | (_, Called::Failed) => {
                    return Err(anyhow!(
                        "{name} worker {worker}: VM failed during start: {}",
                        self.vm_failure(plugin_id, worker)
                    ));
                }
                (Called::Returned(0), _) => {
                    return Err(anyhow!(
                        "{name} worker {worker}: on_vm_start returned false"
                    ));
                }
                (_, Called::Returned(0)) => {
                    return Err(anyhow!(
                        "{name} worker {worker}: on_configure returned false (Envoy would reject this configuration); logs:\n{}",
                        self.log_text()
                    ));
                }
                _ => {}
            }
        }
        self.run_pending();
        Ok(plugin_id)
    }

    fn set_config_phase(&mut self, plugin: PluginId, worker: usize, phase: ConfigPhase) {
        self.plugins[plugin].vms[worker]
            .store
            .data_mut()
            .config_phase = phase;
    }

    /// Why a VM failed ("" if it did not).
    pub fn vm_failure(&self, plugin: PluginId, worker: usize) -> String {
        self.plugins[plugin].vms[worker]
            .failed
            .clone()
            .unwrap_or_default()
    }

    /// Every VM failure so far, as (plugin name, worker, reason).
    pub fn vm_failures(&self) -> Vec<(String, usize, String)> {
        let mut out = Vec::new();
        for p in &self.plugins {
            for (w, vm) in p.vms.iter().enumerate() {
                if let Some(reason) = &vm.failed {
                    out.push((p.config.name.clone(), w, reason.clone()));
                }
            }
        }
        out
    }

    /// Host calls the guests made that the harness does not support.
    pub fn unsupported_calls(&self) -> Vec<String> {
        self.plugins
            .iter()
            .flat_map(|p| p.vms.iter())
            .flat_map(|vm| vm.store.data().unsupported_calls.clone())
            .collect()
    }

    // --- time ---

    /// Virtual now, ns since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.world.borrow().now_ns
    }

    /// Virtual time since the host started.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now_ns() - self.options.start_time_ns)
    }

    /// Moves virtual time forward by `by`, running every event due on the way
    /// (ticks, upstream answers, callouts) in order.
    pub fn advance(&mut self, by: Duration) {
        let until = self.now_ns().saturating_add(by.as_nanos() as u64);
        self.run_events_until(until);
        self.world.borrow_mut().now_ns = until;
    }

    fn run_events_until(&mut self, until: u64) {
        while let Some(Reverse(next)) = self.events.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(item)) = self.events.pop() else {
                break;
            };
            {
                let mut world = self.world.borrow_mut();
                world.now_ns = world.now_ns.max(item.at);
            }
            self.handle(item.event);
            self.run_pending();
        }
    }

    /// Runs events until `done(self)` holds or `limit` of virtual time passes;
    /// returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Host) -> bool) -> bool {
        let deadline = self.now_ns().saturating_add(limit.as_nanos() as u64);
        loop {
            if done(self) {
                return true;
            }
            let Some(Reverse(next)) = self.events.peek() else {
                return done(self);
            };
            if next.at > deadline {
                self.world.borrow_mut().now_ns = deadline;
                return done(self);
            }
            let at = next.at;
            self.run_events_until(at);
        }
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn schedule_in(&mut self, after_ns: u64, event: Event) {
        let at = self.now_ns().saturating_add(after_ns);
        self.schedule(at, event);
    }

    // --- what tests read ---

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

    /// The world's state, for anything not covered above.
    pub fn world(&self) -> std::cell::Ref<'_, World> {
        self.world.borrow()
    }

    // --- requests ---

    /// Starts a request on the next worker (round robin) now; returns its id.
    pub fn start(&mut self, request: Request) -> StreamId {
        let worker = self.next_worker % self.options.workers;
        self.next_worker += 1;
        self.start_on(worker, request)
    }

    /// Starts a request on a given worker now.
    pub fn start_on(&mut self, worker: usize, request: Request) -> StreamId {
        let id = self.open_stream(worker, request);
        self.run_pending();
        id
    }

    /// Sends a request and runs virtual time until its response completes
    /// (at most 10 virtual minutes).
    pub fn send(&mut self, request: Request) -> Response {
        let id = self.start(request);
        self.finish(id)
    }

    /// Like [`Host::send`] on a given worker.
    pub fn send_on(&mut self, worker: usize, request: Request) -> Response {
        let id = self.start_on(worker, request);
        self.finish(id)
    }

    /// Runs until the stream completes (at most 10 virtual minutes) and returns its response.
    pub fn finish(&mut self, id: StreamId) -> Response {
        self.run_until(Duration::from_secs(600), |h| h.finished.contains_key(&id));
        self.response(id).unwrap_or_default()
    }

    /// The response of a stream: final if it finished, partial otherwise.
    pub fn response(&self, id: StreamId) -> Option<Response> {
        self.finished
            .get(&id)
            .cloned()
            .or_else(|| self.streams.get(&id).map(|s| s.response.clone()))
    }

    /// Schedules a request to start at `at` (virtual time since the host
    /// start); `tag` comes back in [`Host::completed`].
    pub fn schedule_request(
        &mut self,
        at: Duration,
        worker: Option<usize>,
        request: Request,
        tag: u64,
    ) {
        let at = self
            .options
            .start_time_ns
            .saturating_add(at.as_nanos() as u64);
        self.schedule(
            at,
            Event::StartRequest {
                worker,
                request: Box::new(request),
                tag,
            },
        );
    }

    /// Streams finished so far, in completion order, with the tag they were scheduled with.
    pub fn completed(&self) -> Vec<(StreamId, Option<u64>, &Response)> {
        self.completion_order
            .iter()
            .filter_map(|id| {
                self.finished
                    .get(id)
                    .map(|r| (*id, self.tags.get(id).copied(), r))
            })
            .collect()
    }

    /// Number of streams finished so far.
    pub fn finished_count(&self) -> usize {
        self.finished_total
    }

    /// Streams not finished yet.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether to keep finished responses (turn off in benchmarks to save memory).
    pub fn keep_finished_responses(&mut self, keep: bool) {
        self.keep_finished = keep;
    }

    /// Starts a request whose body is still coming: the request's own chunks
    /// (if any) are sent without end of stream; send the rest with
    /// [`Host::send_request_data`] and [`Host::send_request_trailers`].
    pub fn start_streaming(&mut self, worker: usize, request: Request) -> StreamId {
        let id = self.open_stream_with(worker, request, true);
        self.run_pending();
        id
    }

    /// Sends a request body chunk on a stream started with [`Host::start_streaming`].
    pub fn send_request_data(&mut self, id: StreamId, bytes: &[u8], end_stream: bool) {
        if !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: bytes.to_vec(),
                    eos: end_stream,
                },
            );
        }
        self.run_pending();
    }

    /// Ends a streaming request with trailers.
    pub fn send_request_trailers(&mut self, id: StreamId, trailers: &[(&str, &str)]) {
        if let Some(s) = self.streams.get(&id) {
            s.data.borrow_mut().request_trailers = HeaderMap::from_pairs(trailers.iter().copied());
        }
        if !self.stream_stopped(id) {
            self.push(id, Dir::Request, 0, Frame::Trailers);
        }
        self.run_pending();
    }

    fn open_stream(&mut self, worker: usize, request: Request) -> StreamId {
        self.open_stream_with(worker, request, false)
    }

    fn open_stream_with(&mut self, worker: usize, request: Request, streaming: bool) -> StreamId {
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        let now = self.now_ns();
        let mut headers = HeaderMap::from_pairs(
            request
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if self.options.normalize_downstream {
            if headers.get(":scheme").is_none() {
                headers.add(":scheme", "http");
            }
            for h in [
                "x-envoy-max-retries",
                "x-envoy-retry-on",
                "x-envoy-retriable-status-codes",
            ] {
                headers.remove(h);
            }
            headers.replace("x-forwarded-proto", "http");
            if headers.get("x-request-id").is_none() {
                let (a, b) = (self.rng.next_u64(), self.rng.next_u64());
                let uuid = format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    (b >> 48) & 0x3fff | 0x8000,
                    b & 0xffff_ffff_ffff
                );
                headers.add("x-request-id", &uuid);
            }
        }
        // Envoy's connection manager resolves the route before the first
        // filter's `decodeHeaders`, so `xds.cluster_name` (the route's
        // cluster, when it exists) is readable at request headers. A filter
        // that changes request headers clears the route cache, but the value
        // stays until the route is resolved again (by the router: see
        // [`Host::route`], which re-selects from the headers as the filters
        // left them).
        let cluster_name = self
            .route_cluster(&headers)
            .filter(|c| self.clusters.contains_key(c));
        let data = StreamData {
            request_headers: headers,
            info: crate::stream_data::StreamInfo {
                cluster_name,
                start_time_ns: now,
                source_address: format!("10.0.1.{}:{}", 1 + worker, 40000 + (id.0 % 20000)),
                destination_address: "10.0.0.10:8080".into(),
                protocol: "HTTP/1.1".into(),
                route_name: Some(self.options.route.name.clone()),
                ..Default::default()
            },
            ..StreamData::default()
        };
        let stream = Stream {
            worker,
            data: Rc::new(RefCell::new(data)),
            slots: (0..self.plugins.len()).map(|p| (p, None)).collect(),
            request_held: None,
            response_held: None,
            response_order: Vec::new(),
            response_started: false,
            local_reply_sent: false,
            router: RouterState::default(),
            response: Response {
                started_ns: now,
                worker,
                ..Response::default()
            },
            done: false,
        };
        self.streams.insert(id, stream);
        let body_chunks = request.body.len();
        let has_trailers = request.trailers.is_some();
        self.push(
            id,
            Dir::Request,
            0,
            Frame::Headers {
                eos: body_chunks == 0 && !has_trailers && !streaming,
            },
        );
        // Envoy's HTTP/1 codec hands each body chunk on as it arrives
        // (end_stream false) and ends the message with an empty end_stream
        // call, so the filters see the body in calls with eos=false, then
        // `on_http_request_body(0, true)`.
        for chunk in request.body {
            if self.stream_stopped(id) {
                break;
            }
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: chunk,
                    eos: false,
                },
            );
        }
        if body_chunks > 0 && !has_trailers && !streaming && !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Request,
                0,
                Frame::Data {
                    bytes: Vec::new(),
                    eos: true,
                },
            );
        }
        if let Some(trailers) = request.trailers {
            if let Some(s) = self.streams.get(&id) {
                s.data.borrow_mut().request_trailers = HeaderMap::from_pairs(trailers);
            }
            if !self.stream_stopped(id) {
                self.push(id, Dir::Request, 0, Frame::Trailers);
            }
        }
        id
    }

    /// True once the stream is done or a local reply / reset is pending for it.
    fn stream_stopped(&self, id: StreamId) -> bool {
        let Some(stream) = self.streams.get(&id) else {
            return true;
        };
        if stream.done {
            return true;
        }
        self.pending.iter().any(|(p, w, ctx, action)| {
            matches!(action, StreamAction::LocalReply(_) | StreamAction::Close(_))
                && self.context_index.get(&(*p, *w, *ctx)) == Some(&id)
        })
    }

    fn order_len(&self, id: StreamId, dir: Dir) -> usize {
        let s = &self.streams[&id];
        match dir {
            Dir::Request => s.slots.len(),
            Dir::Response => s.response_order.len(),
        }
    }

    fn slot_at(&self, id: StreamId, dir: Dir, pos: usize) -> usize {
        let s = &self.streams[&id];
        match dir {
            Dir::Request => pos,
            Dir::Response => s.response_order[pos],
        }
    }

    fn held_mut(&mut self, id: StreamId, dir: Dir) -> &mut Option<Held> {
        let s = self.streams.get_mut(&id).expect("stream exists");
        match dir {
            Dir::Request => &mut s.request_held,
            Dir::Response => &mut s.response_held,
        }
    }

    /// Moves a frame through the chain from position `pos`, as Envoy's filter
    /// manager does: each filter may continue it or stop; a stopped filter
    /// keeps receiving later frames (and buffers body) until it continues.
    fn push(&mut self, id: StreamId, dir: Dir, mut pos: usize, mut frame: Frame) {
        loop {
            if self.stream_stopped(id) {
                return;
            }
            if pos >= self.order_len(id, dir) {
                self.sink(id, dir, frame);
                return;
            }
            let slot = self.slot_at(id, dir, pos);
            let held_here = self.held_mut(id, dir).as_ref().is_some_and(|h| h.at == pos);
            let stop_all = held_here && self.held_mut(id, dir).as_ref().is_some_and(|h| h.stop_all);
            if stop_all {
                // StopAllIteration: buffer without calling the filter.
                if let Some(h) = self.held_mut(id, dir).as_mut() {
                    match frame {
                        Frame::Headers { .. } => {}
                        Frame::Data { bytes, eos } => {
                            let (mut buffered, _) = h.body.take().unwrap_or_default();
                            buffered.extend_from_slice(&bytes);
                            h.body = Some((buffered, eos));
                        }
                        Frame::Trailers => h.trailers = true,
                    }
                }
                return;
            }
            if held_here {
                // The filter is stopped: it still sees the frame, and its verdict
                // decides whether everything it holds moves on.
                let action = match frame {
                    Frame::Headers { .. } => Action::Pause,
                    Frame::Data { bytes, eos } => {
                        let mut buffered = self
                            .held_mut(id, dir)
                            .as_mut()
                            .and_then(|h| h.body.take())
                            .map(|(b, _)| b)
                            .unwrap_or_default();
                        buffered.extend_from_slice(&bytes);
                        let (action, after) = self.call_body(id, dir, slot, buffered, eos);
                        if let Some(h) = self.held_mut(id, dir).as_mut() {
                            h.body = Some((after, eos));
                        }
                        action
                    }
                    Frame::Trailers => {
                        // Envoy's `getBuffer` returns the decoding buffer
                        // to a filter that buffered the body (its
                        // `buffering_request_body_`), so the trailers
                        // callback reads, and may rewrite, the whole body.
                        let buffered = self.held_mut(id, dir).as_mut().and_then(|h| h.body.take());
                        let (action, after) = self.call_trailers(id, dir, slot, buffered);
                        if let Some(h) = self.held_mut(id, dir).as_mut() {
                            h.trailers = true;
                            h.body = after;
                        }
                        action
                    }
                };
                if action == Action::Continue && !self.stream_stopped(id) {
                    self.release(id, dir, pos);
                }
                return;
            }
            let action = match &mut frame {
                Frame::Headers { eos } => self.call_headers(id, dir, slot, *eos),
                Frame::Data { bytes, eos } => {
                    let (action, after) =
                        self.call_body(id, dir, slot, std::mem::take(bytes), *eos);
                    *bytes = after;
                    action
                }
                Frame::Trailers => self.call_trailers(id, dir, slot, None).0,
            };
            if action == Action::Pause {
                let allow = self.plugins[self.streams[&id].slots[slot].0]
                    .config
                    .allow_on_headers_stop_iteration;
                let held = self.held_mut(id, dir);
                let mut h = Held {
                    at: pos,
                    ..Held::default()
                };
                match frame {
                    Frame::Headers { eos } => {
                        h.headers = Some(eos);
                        h.stop_all = !allow;
                    }
                    Frame::Data { bytes, eos } => h.body = Some((bytes, eos)),
                    Frame::Trailers => h.trailers = true,
                }
                *held = Some(h);
                return;
            }
            pos += 1;
        }
    }

    /// Passes on everything the filter at `pos` held (it continued).
    fn release(&mut self, id: StreamId, dir: Dir, pos: usize) {
        let Some(held) = self.held_mut(id, dir).take() else {
            return;
        };
        if let Some(eos) = held.headers {
            self.push(id, dir, pos + 1, Frame::Headers { eos });
        }
        // After StopAllIteration the filter has not seen the buffered body and
        // trailers yet: Envoy delivers them starting from that filter.
        let from = if held.stop_all { pos } else { pos + 1 };
        if let Some((bytes, eos)) = held.body
            && !self.stream_stopped(id)
        {
            self.push(id, dir, from, Frame::Data { bytes, eos });
        }
        if held.trailers && !self.stream_stopped(id) {
            self.push(id, dir, from, Frame::Trailers);
        }
    }

    /// Ensures the filter at `slot` has a context (created on request headers only).
    fn context_for(&mut self, id: StreamId, slot: usize, create: bool) -> Option<(PluginId, u32)> {
        let (plugin, ctx) = self.streams[&id].slots[slot];
        if let Some(ctx) = ctx {
            return Some((plugin, ctx));
        }
        if !create {
            return None;
        }
        let worker = self.streams[&id].worker;
        let vm = &mut self.plugins[plugin].vms[worker];
        let ctx = vm.next_context_id;
        vm.next_context_id += 1;
        let stream = self.streams[&id].data.clone();
        vm.store.data_mut().contexts.insert(
            ctx,
            StreamContext {
                stream,
                access: Access::default(),
            },
        );
        self.context_index.insert((plugin, worker, ctx), id);
        self.streams.get_mut(&id).expect("stream").slots[slot].1 = Some(ctx);
        if let Called::Failed = self.call(plugin, worker, ctx, |e, s| {
            e.on_context_create.as_ref().map(|f| f.call(s, (ctx, 1)))
        }) {
            return Some((plugin, ctx));
        }
        Some((plugin, ctx))
    }

    fn set_access(
        &mut self,
        plugin: PluginId,
        worker: usize,
        ctx: u32,
        f: impl FnOnce(&mut Access),
    ) {
        if let Some(c) = self.plugins[plugin].vms[worker]
            .store
            .data_mut()
            .contexts
            .get_mut(&ctx)
        {
            f(&mut c.access);
        }
    }

    /// Turns a VM failure into the configured policy's verdict.
    fn failed_verdict(&mut self, plugin: PluginId, worker: usize, ctx: u32) -> Action {
        match self.options.failure_policy {
            FailurePolicy::FailOpen => Action::Continue,
            FailurePolicy::FailClosed => {
                self.pending.push_back((
                    plugin,
                    worker,
                    ctx,
                    StreamAction::LocalReply(LocalReply {
                        status: 503,
                        details: "wasm_fail_stream".into(),
                        body: Vec::new(),
                        headers: Vec::new(),
                        grpc_status: -1,
                    }),
                ));
                Action::Pause
            }
        }
    }

    fn call_headers(&mut self, id: StreamId, dir: Dir, slot: usize, eos: bool) -> Action {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, dir == Dir::Request) else {
            return Action::Continue;
        };
        let data = self.streams[&id].data.clone();
        let count = match dir {
            Dir::Request => data.borrow().request_headers.len(),
            Dir::Response => data.borrow().response_headers.len(),
        } as u32;
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_headers = true,
            Dir::Response => a.response_headers = true,
        });
        let eos = u32::from(eos);
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, |e, s| {
                e.on_request_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, |e, s| {
                e.on_response_headers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count, eos)))
            }),
        };
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return self.failed_verdict(plugin, worker, ctx),
        };
        if action == Action::Continue {
            // Envoy drops its pointer to the map once the filter continues.
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => a.request_headers = false,
                Dir::Response => a.response_headers = false,
            });
        }
        action
    }

    /// Calls the body callback with `bytes` as the visible buffer; returns the
    /// verdict and the buffer as the filter left it.
    fn call_body(
        &mut self,
        id: StreamId,
        dir: Dir,
        slot: usize,
        bytes: Vec<u8>,
        eos: bool,
    ) -> (Action, Vec<u8>) {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, false) else {
            return (Action::Continue, bytes);
        };
        let data = self.streams[&id].data.clone();
        let len = bytes.len() as u32;
        match dir {
            Dir::Request => data.borrow_mut().request_body = bytes,
            Dir::Response => data.borrow_mut().response_body = bytes,
        }
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_body = true,
            Dir::Response => a.response_body = true,
        });
        let eos_raw = u32::from(eos);
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, |e, s| {
                e.on_request_body
                    .as_ref()
                    .map(|f| f.call(s, (ctx, len, eos_raw)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, |e, s| {
                e.on_response_body
                    .as_ref()
                    .map(|f| f.call(s, (ctx, len, eos_raw)))
            }),
        };
        let after = match dir {
            Dir::Request => std::mem::take(&mut data.borrow_mut().request_body),
            Dir::Response => std::mem::take(&mut data.borrow_mut().response_body),
        };
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return (self.failed_verdict(plugin, worker, ctx), after),
        };
        if action == Action::Continue {
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => a.request_body = false,
                Dir::Response => a.response_body = false,
            });
        }
        (action, after)
    }

    /// Calls the trailers callback; `buffered` is the body the filter holds
    /// (visible to it during the call, as in Envoy), returned as it left it.
    fn call_trailers(
        &mut self,
        id: StreamId,
        dir: Dir,
        slot: usize,
        buffered: Option<(Vec<u8>, bool)>,
    ) -> (Action, Option<(Vec<u8>, bool)>) {
        let worker = self.streams[&id].worker;
        let Some((plugin, ctx)) = self.context_for(id, slot, false) else {
            return (Action::Continue, buffered);
        };
        let data = self.streams[&id].data.clone();
        let body_eos = buffered.as_ref().map(|(_, eos)| *eos);
        if let Some((bytes, _)) = buffered {
            match dir {
                Dir::Request => data.borrow_mut().request_body = bytes,
                Dir::Response => data.borrow_mut().response_body = bytes,
            }
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => a.request_body = true,
                Dir::Response => a.response_body = true,
            });
        }
        let count = match dir {
            Dir::Request => data.borrow().request_trailers.len(),
            Dir::Response => data.borrow().response_trailers.len(),
        } as u32;
        self.set_access(plugin, worker, ctx, |a| match dir {
            Dir::Request => a.request_trailers = true,
            Dir::Response => a.response_trailers = true,
        });
        let called = match dir {
            Dir::Request => self.call(plugin, worker, ctx, |e, s| {
                e.on_request_trailers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count)))
            }),
            Dir::Response => self.call(plugin, worker, ctx, |e, s| {
                e.on_response_trailers
                    .as_ref()
                    .map(|f| f.call(s, (ctx, count)))
            }),
        };
        let after = body_eos.map(|eos| {
            let bytes = match dir {
                Dir::Request => std::mem::take(&mut data.borrow_mut().request_body),
                Dir::Response => std::mem::take(&mut data.borrow_mut().response_body),
            };
            (bytes, eos)
        });
        let action = match called {
            Called::Returned(raw) => Action::from_raw(raw),
            Called::Missing => Action::Continue,
            Called::Failed => return (self.failed_verdict(plugin, worker, ctx), after),
        };
        if action == Action::Continue {
            self.set_access(plugin, worker, ctx, |a| match dir {
                Dir::Request => {
                    a.request_trailers = false;
                    a.request_body = false;
                }
                Dir::Response => {
                    a.response_trailers = false;
                    a.response_body = false;
                }
            });
        }
        (action, after)
    }

    /// Where frames leave the chain: the router (request) or the client (response).
    fn sink(&mut self, id: StreamId, dir: Dir, frame: Frame) {
        match dir {
            Dir::Request => {
                let complete = match frame {
                    Frame::Headers { eos } => eos,
                    Frame::Data { bytes, eos } => {
                        let s = self.streams.get_mut(&id).expect("stream");
                        s.data.borrow_mut().info.bytes_received += bytes.len() as u64;
                        s.router.body.extend_from_slice(&bytes);
                        eos
                    }
                    Frame::Trailers => true,
                };
                if complete {
                    self.route(id);
                }
            }
            Dir::Response => {
                let now = self.now_ns();
                let s = self.streams.get_mut(&id).expect("stream");
                let complete = match frame {
                    Frame::Headers { eos } => {
                        let headers = s.data.borrow().response_headers.clone();
                        s.response.status = headers
                            .get(":status")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        s.response.headers = headers;
                        s.response.headers_at_ns = Some(now);
                        eos
                    }
                    Frame::Data { bytes, eos } => {
                        s.data.borrow_mut().info.bytes_sent += bytes.len() as u64;
                        s.response.body.extend_from_slice(&bytes);
                        if !bytes.is_empty() {
                            s.response.chunks.push((now, bytes));
                        }
                        eos
                    }
                    Frame::Trailers => {
                        s.response.trailers = Some(s.data.borrow().response_trailers.clone());
                        true
                    }
                };
                if complete {
                    self.complete(id, false);
                }
            }
        }
    }

    // --- router ---

    /// Picks the cluster and the retry policy from the request headers as the
    /// filters left them, then makes the first attempt.
    fn route(&mut self, id: StreamId) {
        let route = self.options.route.clone();
        let s = self.streams.get_mut(&id).expect("stream");
        if s.router.started {
            return;
        }
        s.router.started = true;
        s.response.upstream_request_headers = Some(s.data.borrow().request_headers.clone());
        s.response.upstream_request_body = s.router.body.clone();
        let headers = s
            .response
            .upstream_request_headers
            .as_ref()
            .expect("just set");
        let cluster = Self::select_cluster(&route, headers);
        let Some(cluster) = cluster else {
            s.data.borrow_mut().info.response_flags |= response_flags::NO_ROUTE_FOUND;
            return self.router_reply(id, 404, "", "route_not_found");
        };
        if !self.clusters.contains_key(&cluster) {
            // The route was resolved again: no cluster, no `xds.cluster_name`.
            s.data.borrow_mut().info.cluster_name = None;
            s.data.borrow_mut().info.response_flags |= response_flags::NO_CLUSTER_FOUND;
            return self.router_reply(id, 503, "", "cluster_not_found");
        }
        s.data.borrow_mut().info.cluster_name = Some(cluster.clone());
        s.router.cluster = Some(cluster);
        s.router.override_hosts = headers
            .get(&route.override_host_header)
            .map(|v| {
                v.split(',')
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        s.router.retry_on = headers
            .get("x-envoy-retry-on")
            .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default();
        s.router.retriable_codes = headers
            .get("x-envoy-retriable-status-codes")
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        let default_retries = u32::from(!s.router.retry_on.is_empty());
        s.router.retries_left = headers
            .get("x-envoy-max-retries")
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_retries);
        if s.router.retry_on.is_empty() {
            s.router.retries_left = 0;
        }
        self.attempt(id);
    }

    /// The cluster the route picks for these request headers.
    fn select_cluster(route: &RouteConfig, headers: &HeaderMap) -> Option<String> {
        route
            .cluster_header
            .as_ref()
            .and_then(|h| headers.get(h).map(str::to_owned))
            .or(route.default_cluster.clone())
    }

    fn route_cluster(&self, headers: &HeaderMap) -> Option<String> {
        Self::select_cluster(&self.options.route, headers)
    }

    fn attempt(&mut self, id: StreamId) {
        let elapsed = self.elapsed();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.router.attempt += 1;
        s.router.generation += 1;
        let generation = s.router.generation;
        let attempt = s.router.attempt;
        s.data.borrow_mut().info.attempt_count = attempt;
        let cluster_name = s.router.cluster.clone().unwrap_or_default();
        let wanted = s.router.override_hosts.get(attempt as usize - 1).cloned();
        let Some(cluster) = self.clusters.get_mut(&cluster_name) else {
            return;
        };
        // override_host: this attempt's entry if the cluster has it, else the fallback policy.
        let index = wanted
            .and_then(|a| cluster.index_of(&a))
            .or_else(|| cluster.next_round_robin());
        let Some(index) = index else {
            s.data.borrow_mut().info.response_flags |= response_flags::NO_HEALTHY_UPSTREAM;
            return self.router_reply(id, 503, "no healthy upstream", "no_healthy_upstream");
        };
        let endpoint = &cluster.endpoints[index];
        s.data.borrow_mut().info.upstream_host = Some(UpstreamHost {
            address: endpoint.address.clone(),
            locality: endpoint.locality.clone(),
        });
        s.response.upstream = Some(endpoint.address.clone());
        s.response.attempts = attempt;
        let plan = endpoint.behavior.plan(elapsed, &mut self.rng);
        match plan {
            AttemptPlan::ConnectFailure { after_ns } => {
                s.router.plan = None;
                self.schedule_in(
                    after_ns,
                    Event::AttemptConnectFailure {
                        stream: id,
                        generation,
                    },
                );
            }
            AttemptPlan::Respond(plan) => {
                let at = plan.first_byte_ns;
                s.router.plan = Some(Rc::new(plan));
                self.schedule_in(
                    at,
                    Event::AttemptHeaders {
                        stream: id,
                        generation,
                    },
                );
            }
        }
    }

    /// Whether the router retries this outcome (`None` status = connect failure or reset).
    fn retriable(router: &RouterState, status: Option<u32>) -> bool {
        router
            .retry_on
            .iter()
            .any(|policy| match (policy.as_str(), status) {
                ("5xx", None)
                | ("reset", None)
                | ("connect-failure", None)
                | ("gateway-error", None) => true,
                ("5xx", Some(s)) => s >= 500,
                ("gateway-error", Some(s)) => matches!(s, 502..=504),
                ("retriable-4xx", Some(s)) => s == 409,
                ("retriable-status-codes", Some(s)) => router.retriable_codes.contains(&s),
                _ => false,
            })
    }

    /// Schedules a retry if the policy allows one; returns whether it did.
    fn maybe_retry(&mut self, id: StreamId, status: Option<u32>) -> bool {
        let route = self.options.route.clone();
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if s.router.retries_left == 0 || !Self::retriable(&s.router, status) {
            if s.router.retried
                || (s.router.retries_left == 0
                    && !s.router.retry_on.is_empty()
                    && Self::retriable(&s.router, status))
            {
                s.data.borrow_mut().info.response_flags |=
                    response_flags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
            }
            return false;
        }
        s.router.retries_left -= 1;
        s.router.retried = true;
        let retry_index = s.router.attempt as u32; // 1 for the first retry
        let generation = s.router.generation;
        // Envoy's jittered exponential back-off: uniform in [0, min(base·2^n, max)).
        let ceiling = route.retry_base_interval.as_nanos() as u64 * (1u64 << retry_index.min(20));
        let ceiling = ceiling.min(route.retry_max_interval.as_nanos() as u64);
        let delay = self.rng.below(ceiling.max(1));
        self.schedule_in(
            delay,
            Event::Retry {
                stream: id,
                generation,
            },
        );
        true
    }

    fn on_attempt_headers(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        let Some(plan) = s.router.plan.clone() else {
            return;
        };
        if self.maybe_retry(id, Some(plan.status)) {
            return;
        }
        let now = self.now_ns();
        let s = self.streams.get_mut(&id).expect("stream");
        let service_time = (now - s.response.started_ns) / 1_000_000;
        {
            let mut data = s.data.borrow_mut();
            let mut headers = HeaderMap::new();
            headers.add(":status", &plan.status.to_string());
            for (k, v) in &plan.headers {
                headers.add(k, v);
            }
            headers.add("x-envoy-upstream-service-time", &service_time.to_string());
            data.response_headers = headers;
            data.info.response_code = Some(plan.status);
            data.info.response_code_details = Some("via_upstream".into());
        }
        let eos = plan.chunks.is_empty() && plan.trailers.is_none();
        self.start_response(id);
        self.push(id, Dir::Response, 0, Frame::Headers { eos });
        let mut last = 0;
        for (index, (offset, _)) in plan.chunks.iter().enumerate() {
            if plan.reset_after_chunks.is_some_and(|n| index >= n) {
                break;
            }
            last = *offset;
            self.schedule_in(
                *offset,
                Event::AttemptChunk {
                    stream: id,
                    generation,
                    index,
                },
            );
        }
        if plan
            .reset_after_chunks
            .is_some_and(|n| n < plan.chunks.len())
        {
            self.schedule_in(
                last + 1,
                Event::AttemptReset {
                    stream: id,
                    generation,
                },
            );
        }
    }

    fn on_attempt_chunk(&mut self, id: StreamId, generation: u64, index: usize) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        let Some(plan) = s.router.plan.as_ref() else {
            return;
        };
        let Some((_, bytes)) = plan.chunks.get(index) else {
            return;
        };
        let bytes = bytes.clone();
        let last = index + 1 == plan.chunks.len() && plan.trailers.is_none();
        // As on the request side: each chunk with end_stream false, then an
        // empty end_stream call when the upstream's message is complete.
        self.push(id, Dir::Response, 0, Frame::Data { bytes, eos: false });
        if last && !self.stream_stopped(id) {
            self.push(
                id,
                Dir::Response,
                0,
                Frame::Data {
                    bytes: Vec::new(),
                    eos: true,
                },
            );
        }
    }

    fn on_connect_failure(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done || s.local_reply_sent {
            return;
        }
        if self.maybe_retry(id, None) {
            return;
        }
        if let Some(s) = self.streams.get(&id) {
            s.data.borrow_mut().info.response_flags |= response_flags::UPSTREAM_CONNECTION_FAILURE;
        }
        self.router_reply(
            id,
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            "upstream_reset_before_response_started{connection_failure}",
        );
    }

    fn on_attempt_reset(&mut self, id: StreamId, generation: u64) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.router.generation != generation || s.done {
            return;
        }
        {
            let mut data = s.data.borrow_mut();
            data.info.response_flags |= response_flags::UPSTREAM_REMOTE_RESET;
            data.info.response_code_details =
                Some("upstream_reset_after_response_started{remote_reset}".into());
        }
        self.complete(id, true);
    }

    /// A reply generated by the router itself (no route, no cluster, upstream failure).
    fn router_reply(&mut self, id: StreamId, status: u32, body: &str, details: &str) {
        self.send_local_reply(
            id,
            LocalReply {
                status,
                details: details.into(),
                body: body.as_bytes().to_vec(),
                headers: Vec::new(),
                grpc_status: -1,
            },
        );
    }

    /// Computes the response path: every filter whose context exists, in reverse.
    fn start_response(&mut self, id: StreamId) {
        let s = self.streams.get_mut(&id).expect("stream");
        s.response_started = true;
        s.response_order = (0..s.slots.len())
            .rev()
            .filter(|&i| s.slots[i].1.is_some())
            .collect();
        s.response_held = None;
    }

    /// Envoy's `sendLocalReply`: stop the request, build the response headers
    /// (`:status`, the filter's headers, then content-length/content-type when
    /// there is a body) and send it through every started filter in reverse.
    fn send_local_reply(&mut self, id: StreamId, reply: LocalReply) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.done {
            return;
        }
        if s.response.headers_at_ns.is_some() {
            // Headers already reached the client: all Envoy can do is reset.
            return self.complete(id, true);
        }
        let in_response_path = s.response_started;
        s.local_reply_sent = true;
        s.router.generation += 1;
        s.request_held = None;
        s.response.local_reply = true;
        let mut headers = HeaderMap::new();
        headers.add(":status", &reply.status.to_string());
        for (k, v) in &reply.headers {
            headers.add(k, v);
        }
        if !reply.body.is_empty() {
            headers.add("content-length", &reply.body.len().to_string());
            headers.add("content-type", "text/plain");
        }
        {
            let mut data = s.data.borrow_mut();
            data.response_headers = headers;
            data.info.response_code = Some(reply.status);
            data.info.response_code_details = Some(reply.details.clone());
        }
        // Actions already queued for this stream are superseded.
        let index = &self.context_index;
        self.pending
            .retain(|(p, w, c, _)| index.get(&(*p, *w, *c)) != Some(&id));
        let eos = reply.body.is_empty();
        if in_response_path {
            // Simplification: a reply sent while encoding goes straight to the client.
            let s = self.streams.get_mut(&id).expect("stream");
            s.response_order.clear();
            s.response_held = None;
        } else {
            self.start_response(id);
        }
        let s = self.streams.get_mut(&id).expect("stream");
        s.local_reply_sent = false; // let the reply itself flow
        self.push(id, Dir::Response, 0, Frame::Headers { eos });
        if !eos {
            self.push(
                id,
                Dir::Response,
                0,
                Frame::Data {
                    bytes: reply.body,
                    eos: true,
                },
            );
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.local_reply_sent = true;
        }
    }

    /// Ends a stream: records the response, then runs `on_log`, `on_done` and
    /// `on_delete` on every filter context it created (Envoy logs first, then
    /// destroys the filters).
    fn complete(&mut self, id: StreamId, reset: bool) {
        let now = self.now_ns();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.done {
            return;
        }
        s.done = true;
        s.router.generation += 1;
        s.response.reset = reset;
        s.response.completed_ns = Some(now);
        {
            let mut data = s.data.borrow_mut();
            data.info.request_duration_ns = Some(now - s.response.started_ns);
            s.response.code_details = data.info.response_code_details.clone();
            s.response.flags = data.info.response_flags;
            s.response.attempts = data.info.attempt_count;
        }
        let worker = s.worker;
        let contexts: Vec<(PluginId, u32)> = s
            .slots
            .iter()
            .filter_map(|(p, c)| c.map(|c| (*p, c)))
            .collect();
        for &(plugin, ctx) in &contexts {
            self.set_access(plugin, worker, ctx, |a| a.access_log = true);
            let _ = self.call(plugin, worker, ctx, |e, s| {
                e.on_log.as_ref().map(|f| f.call(s, ctx))
            });
            self.set_access(plugin, worker, ctx, |a| a.access_log = false);
        }
        for &(plugin, ctx) in &contexts {
            let _ = self.call(plugin, worker, ctx, |e, s| {
                e.on_done.as_ref().map(|f| f.call(s, ctx))
            });
            let _ = self.call(plugin, worker, ctx, |e, s| {
                e.on_delete.as_ref().map(|f| f.call(s, ctx))
            });
            self.plugins[plugin].vms[worker]
                .store
                .data_mut()
                .contexts
                .remove(&ctx);
            self.context_index.remove(&(plugin, worker, ctx));
        }
        if let Some(s) = self.streams.remove(&id) {
            self.finished_total += 1;
            if self.keep_finished {
                self.finished.insert(id, s.response);
                self.completion_order.push(id);
            }
        }
    }

    // --- actions filters asked for ---

    fn run_pending(&mut self) {
        while let Some((plugin, worker, ctx, action)) = self.pending.pop_front() {
            let Some(&id) = self.context_index.get(&(plugin, worker, ctx)) else {
                continue;
            };
            if self.streams.get(&id).is_none_or(|s| s.done) {
                continue;
            }
            match action {
                StreamAction::LocalReply(reply) => self.send_local_reply(id, reply),
                StreamAction::Close(_) => {
                    if let Some(s) = self.streams.get(&id) {
                        let mut data = s.data.borrow_mut();
                        if data.info.response_code_details.is_none() {
                            data.info.response_code_details = Some("wasm_close_stream".into());
                        }
                    }
                    self.complete(id, true);
                }
                StreamAction::Continue(kind) => {
                    // Envoy drops the request-side pointers on any resume.
                    self.set_access(plugin, worker, ctx, |a| {
                        a.request_headers = false;
                        a.request_body = false;
                        a.request_trailers = false;
                    });
                    let dir = if kind == StreamType::HttpRequest {
                        Dir::Request
                    } else {
                        Dir::Response
                    };
                    let Some(slot) = self.streams[&id]
                        .slots
                        .iter()
                        .position(|(p, _)| *p == plugin)
                    else {
                        continue;
                    };
                    let pos = match dir {
                        Dir::Request => Some(slot),
                        Dir::Response => self.streams[&id]
                            .response_order
                            .iter()
                            .position(|&s| s == slot),
                    };
                    let held_at = match dir {
                        Dir::Request => self.streams[&id].request_held.as_ref().map(|h| h.at),
                        Dir::Response => self.streams[&id].response_held.as_ref().map(|h| h.at),
                    };
                    if let (Some(pos), Some(at)) = (pos, held_at)
                        && pos == at
                    {
                        self.release(id, dir, pos);
                    }
                }
            }
        }
    }

    // --- events ---

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick {
                plugin,
                worker,
                generation,
            } => {
                if self.plugins[plugin].vms[worker].tick_generation != generation {
                    return;
                }
                let _ = self.call(plugin, worker, 1, |e, s| {
                    e.on_tick.as_ref().map(|f| f.call(s, 1))
                });
                let vm = &self.plugins[plugin].vms[worker];
                let period = self.plugins[plugin].tick_ms[worker];
                if vm.tick_generation == generation && period > 0 && vm.failed.is_none() {
                    self.schedule_in(
                        u64::from(period) * 1_000_000,
                        Event::Tick {
                            plugin,
                            worker,
                            generation,
                        },
                    );
                }
            }
            Event::CallDone {
                plugin,
                worker,
                context_id,
                token,
                response,
            } => {
                let exists = context_id == 1
                    || self.plugins[plugin].vms[worker]
                        .store
                        .data()
                        .contexts
                        .contains_key(&context_id);
                let state = self.plugins[plugin].vms[worker].store.data_mut();
                state.pending_calls.remove(&token);
                if !exists {
                    return; // Envoy cancels a context's calls when it is destroyed.
                }
                let headers = response.headers.len() as u32;
                let body = response.body.len() as u32;
                let trailers = response.trailers.len() as u32;
                state.call_response = Some(response);
                let _ = self.call(plugin, worker, context_id, |e, s| {
                    e.on_http_call_response
                        .as_ref()
                        .map(|f| f.call(s, (context_id, token, headers, body, trailers)))
                });
                self.plugins[plugin].vms[worker]
                    .store
                    .data_mut()
                    .call_response = None;
            }
            Event::QueueReady { owner, queue_id } => {
                let ctx = owner.context_id;
                let _ = self.call(owner.plugin, owner.worker, ctx, |e, s| {
                    e.on_queue_ready
                        .as_ref()
                        .map(|f| f.call(s, (ctx, queue_id)))
                });
            }
            Event::StartRequest {
                worker,
                request,
                tag,
            } => {
                let worker = worker.unwrap_or_else(|| {
                    let w = self.next_worker % self.options.workers;
                    self.next_worker += 1;
                    w
                });
                let id = self.open_stream(worker, *request);
                self.tags.insert(id, tag);
            }
            Event::AttemptHeaders { stream, generation } => {
                self.on_attempt_headers(stream, generation)
            }
            Event::AttemptConnectFailure { stream, generation } => {
                self.on_connect_failure(stream, generation)
            }
            Event::AttemptChunk {
                stream,
                generation,
                index,
            } => self.on_attempt_chunk(stream, generation, index),
            Event::AttemptReset { stream, generation } => self.on_attempt_reset(stream, generation),
            Event::Retry { stream, generation } => {
                if self.streams.get(&stream).is_some_and(|s| {
                    s.router.generation == generation && !s.done && !s.local_reply_sent
                }) {
                    self.attempt(stream);
                }
            }
        }
    }

    // --- calling into VMs ---

    /// Runs one callback on a VM with `ctx` as the current and effective
    /// context, then collects what the guest asked for (stream actions,
    /// HTTP calls, tick period, queue notifications).
    fn call<R>(
        &mut self,
        plugin: PluginId,
        worker: usize,
        ctx: u32,
        f: impl FnOnce(
            &crate::vm::Exports,
            &mut wasmtime::Store<VmState>,
        ) -> Option<wasmtime::Result<R>>,
    ) -> Called<R> {
        let vm = &mut self.plugins[plugin].vms[worker];
        if vm.failed.is_some() {
            return Called::Failed;
        }
        {
            let state = vm.store.data_mut();
            state.current_context = ctx;
            state.effective_context = ctx;
        }
        self.guest_calls += 1;
        let WorkerVm { store, exports, .. } = vm;
        let outcome = f(exports, store);
        let called = match outcome {
            None => Called::Missing,
            Some(Ok(r)) => Called::Returned(r),
            Some(Err(trap)) => {
                let reason = format!("{trap:?}");
                let name = self.plugins[plugin].config.name.clone();
                self.world.borrow_mut().log(
                    LogLevel::Critical,
                    &name,
                    worker,
                    format!("host: VM failed: {reason}"),
                );
                self.plugins[plugin].vms[worker].failed = Some(reason);
                Called::Failed
            }
        };
        self.collect_outputs(plugin, worker);
        called
    }

    fn collect_outputs(&mut self, plugin: PluginId, worker: usize) {
        let state = self.plugins[plugin].vms[worker].store.data_mut();
        let actions = std::mem::take(&mut state.actions);
        let calls = std::mem::take(&mut state.outgoing_calls);
        let tick = state.tick_period_ms.take();
        for (ctx, action) in actions {
            self.pending.push_back((plugin, worker, ctx, action));
        }
        for call in calls {
            self.dispatch(plugin, worker, call);
        }
        if let Some(ms) = tick {
            let vm = &mut self.plugins[plugin].vms[worker];
            vm.tick_generation += 1;
            let generation = vm.tick_generation;
            self.plugins[plugin].tick_ms[worker] = ms;
            if ms > 0 {
                self.schedule_in(
                    u64::from(ms) * 1_000_000,
                    Event::Tick {
                        plugin,
                        worker,
                        generation,
                    },
                );
            }
        }
        let ready = std::mem::take(&mut self.world.borrow_mut().queues.ready);
        for (owner, queue_id) in ready {
            self.schedule_in(0, Event::QueueReady { owner, queue_id });
        }
    }

    /// Answers a `dispatch_http_call` from the cluster's endpoints (round
    /// robin) after their simulated latency, or with a 504 at the timeout.
    fn dispatch(&mut self, plugin: PluginId, worker: usize, call: OutgoingCall) {
        self.http_calls.push(call.clone());
        let elapsed = self.elapsed();
        let Some(cluster) = self.clusters.get_mut(&call.cluster) else {
            return;
        };
        let Some(index) = cluster.next_round_robin() else {
            return;
        };
        let plan = cluster.endpoints[index]
            .behavior
            .plan(elapsed, &mut self.rng);
        let (delay, response) = match plan {
            AttemptPlan::ConnectFailure { after_ns } => (after_ns, CallResponse::default()),
            AttemptPlan::Respond(plan) => {
                let mut headers = HeaderMap::new();
                headers.add(":status", &plan.status.to_string());
                for (k, v) in &plan.headers {
                    headers.add(k, v);
                }
                let last = plan.chunks.last().map_or(0, |(o, _)| *o);
                let body = plan.chunks.into_iter().flat_map(|(_, b)| b).collect();
                (
                    plan.first_byte_ns + last,
                    CallResponse {
                        headers,
                        body,
                        trailers: HeaderMap::new(),
                    },
                )
            }
        };
        let timeout_ns = u64::from(call.timeout_ms) * 1_000_000;
        let (delay, response) = if call.timeout_ms > 0 && delay > timeout_ns {
            let mut headers = HeaderMap::new();
            headers.add(":status", "504");
            headers.add("content-length", "24");
            headers.add("content-type", "text/plain");
            (
                timeout_ns,
                CallResponse {
                    headers,
                    body: b"upstream request timeout".to_vec(),
                    trailers: HeaderMap::new(),
                },
            )
        } else {
            (delay, response)
        };
        self.schedule_in(
            delay,
            Event::CallDone {
                plugin,
                worker,
                context_id: call.context_id,
                token: call.token,
                response,
            },
        );
    }
}
