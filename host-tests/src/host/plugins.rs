//! Plugins and their worker VMs: starting and configuring them, creating
//! stream contexts, calling into them, and collecting what they asked for.
//!
//! Envoy runs one VM per worker thread for each plugin, and a stream's
//! contexts live on the worker that accepted it; a filter that keeps state in
//! VM memory instead of shared data only shows its bug with more than one
//! worker. Every call into a guest goes through [`Host::call`], so the rules
//! that apply to all callbacks live in one place: the current and effective
//! context are set, a trap fails the VM for good (and the failure policy
//! decides the stream's fate), and the requests a guest made during the call
//! (stream actions, HTTP calls, tick period, queue wake-ups) are only acted on
//! after the call returns, as in Envoy.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use anyhow::anyhow;
use wasmtime::InstancePre;

use super::schedule::Event;
use super::{FailurePolicy, Host, PluginConfig, PluginId, StreamId};
use crate::abi::{Action, LogLevel};
use crate::census::{Callback, Phase};
use crate::prng::Prng;
use crate::properties::PluginIdentity;
use crate::stream_data::Access;
use crate::vm::{ConfigPhase, LocalReply, StreamAction, StreamContext, VmState, WorkerVm};
use crate::world::QueueOwner;

/// A filter of the chain: its configuration and one VM per worker.
pub(super) struct Plugin {
    pub(super) config: PluginConfig,
    pub(super) vms: Vec<WorkerVm>,
    /// Current tick period of each worker's VM (0 = off).
    pub(super) tick_ms: Vec<u32>,
    /// Set for an upstream HTTP filter: the cluster whose `http_filters` it is in.
    pub(super) upstream_cluster: Option<String>,
}

/// Outcome of calling into a VM.
pub(super) enum Called<R> {
    Returned(R),
    /// The module does not export this callback.
    Missing,
    /// The VM trapped now or earlier.
    Failed,
}

impl Host {
    /// Appends a filter to the chain: one VM per worker, each initialised
    /// (`_initialize`, root context, `on_vm_start`, `on_configure`).
    /// Fails if a VM cannot start or `on_configure` returns false (Envoy
    /// rejects the configuration then).
    pub fn add_filter(&mut self, config: PluginConfig) -> anyhow::Result<PluginId> {
        self.add_plugin(config, None)
    }

    /// Adds an upstream HTTP filter to `cluster` (Envoy: the cluster's
    /// `http_filters`, before `upstream_codec`), started like
    /// [`Host::add_filter`]. See [`crate::host`] (`upstream_filters`) for how
    /// it runs: once per attempt, after the router picked the host.
    pub fn add_upstream_filter(
        &mut self,
        cluster: &str,
        config: PluginConfig,
    ) -> anyhow::Result<PluginId> {
        self.add_plugin(config, Some(cluster.to_owned()))
    }

    fn add_plugin(
        &mut self,
        config: PluginConfig,
        upstream_cluster: Option<String>,
    ) -> anyhow::Result<PluginId> {
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
                census: self.census.clone(),
                phase: Phase::Start,
                host_call: crate::census::OTHER,
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
            upstream_cluster,
        });
        for worker in 0..self.options.workers {
            let vm_len = vm_configuration.len() as u32;
            let config_len = plugin_configuration.len() as u32;
            let _ = self.call(plugin_id, worker, 1, Callback::ContextCreate, |e, s| {
                e.on_context_create.as_ref().map(|f| f.call(s, (1, 0)))
            });
            self.set_config_phase(plugin_id, worker, ConfigPhase::VmStart);
            let started = self.call(plugin_id, worker, 1, Callback::VmStart, |e, s| {
                e.on_vm_start.as_ref().map(|f| f.call(s, (1, vm_len)))
            });
            self.set_config_phase(plugin_id, worker, ConfigPhase::Configure);
            let configured = self.call(plugin_id, worker, 1, Callback::Configure, |e, s| {
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

    pub(super) fn set_config_phase(&mut self, plugin: PluginId, worker: usize, phase: ConfigPhase) {
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

    /// Ensures the filter at `slot` has a context (created on request headers only).
    pub(super) fn context_for(
        &mut self,
        id: StreamId,
        slot: usize,
        create: bool,
    ) -> Option<(PluginId, u32)> {
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
        if let Called::Failed = self.call(plugin, worker, ctx, Callback::ContextCreate, |e, s| {
            e.on_context_create.as_ref().map(|f| f.call(s, (ctx, 1)))
        }) {
            return Some((plugin, ctx));
        }
        Some((plugin, ctx))
    }

    pub(super) fn set_access(
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
    pub(super) fn failed_verdict(&mut self, plugin: PluginId, worker: usize, ctx: u32) -> Action {
        // Measured in Envoy 1.40 (envoy/failure-policy.md): the stream whose
        // callback trapped fails under every policy (proxy-wasm's in-stream
        // checks read the deprecated `fail_open`, not `failure_policy`);
        // FAIL_OPEN skips the filter only for later streams.
        let trapped_here = self.plugins[plugin].vms[worker].failed_context == Some(ctx);
        match self.options.failure_policy {
            FailurePolicy::FailOpen if !trapped_here => Action::Continue,
            FailurePolicy::FailOpen | FailurePolicy::FailClosed => {
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

    /// Runs one callback on a VM with `ctx` as the current and effective
    /// context, then collects what the guest asked for (stream actions,
    /// HTTP calls, tick period, queue notifications).
    pub(super) fn call<R>(
        &mut self,
        plugin: PluginId,
        worker: usize,
        ctx: u32,
        callback: Callback,
        f: impl FnOnce(
            &crate::vm::Exports,
            &mut wasmtime::Store<VmState>,
        ) -> Option<wasmtime::Result<R>>,
    ) -> Called<R> {
        let vm = &mut self.plugins[plugin].vms[worker];
        if vm.failed.is_some() {
            return Called::Failed;
        }
        // A stream's contexts are created when its request headers arrive.
        let phase = match callback {
            Callback::ContextCreate if ctx != vm.store.data().root_context_id => {
                Phase::RequestHeaders
            }
            other => other.phase(),
        };
        {
            let state = vm.store.data_mut();
            state.current_context = ctx;
            state.effective_context = ctx;
            state.phase = phase;
        }
        self.guest_calls += 1;
        let WorkerVm { store, exports, .. } = vm;
        let started = Instant::now();
        let outcome = f(exports, store);
        if outcome.is_some() {
            let guest_ns = started.elapsed().as_nanos() as u64;
            self.census.borrow_mut().callback(phase, callback, guest_ns);
        }
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
                self.plugins[plugin].vms[worker].failed_context = Some(ctx);
                Called::Failed
            }
        };
        self.collect_outputs(plugin, worker);
        called
    }

    pub(super) fn collect_outputs(&mut self, plugin: PluginId, worker: usize) {
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
}

impl Host {
    /// Runs a VM's `on_tick` and schedules the next one, unless the period
    /// changed since this tick was scheduled (`generation` is stale).
    pub(super) fn fire_tick(&mut self, plugin: PluginId, worker: usize, generation: u64) {
        if self.plugins[plugin].vms[worker].tick_generation != generation {
            return;
        }
        let _ = self.call(plugin, worker, 1, Callback::Tick, |e, s| {
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

    /// Runs `on_queue_ready` on the context that registered the queue.
    pub(super) fn notify_queue_ready(&mut self, owner: QueueOwner, queue_id: u32) {
        let ctx = owner.context_id;
        let _ = self.call(
            owner.plugin,
            owner.worker,
            ctx,
            Callback::QueueReady,
            |e, s| {
                e.on_queue_ready
                    .as_ref()
                    .map(|f| f.call(s, (ctx, queue_id)))
            },
        );
    }
}
