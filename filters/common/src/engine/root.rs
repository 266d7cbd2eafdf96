//! The root context: configuration, the tick, and the VM's waiting requests.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use log::warn;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use sluice_core::config::Policy;

use super::attempt::{ATTEMPT_ROOT_ID, AttemptHttp, AttemptMetrics};
use super::http::{Exchange, ExchangeHttp};
use super::observe::{JSON_BUDGET, JsonBudget};
use super::{Builder, Capability, Wake};
use crate::config::load_policy;
use crate::host::{self, Buffer};

/// Bodies are buffered up to this when the policy has no `[tokens]
/// max_body` (the same 1 MiB default); a larger body is judged by its
/// headers alone.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// One configuration: the policy and the capabilities it enables.
pub(crate) struct Config {
    pub policy: Policy,
    pub caps: Vec<Box<dyn Capability>>,
    pub max_body: u64,
    /// Some capability settles token usage (JSON answers are read).
    pub reads_usage: bool,
    /// Some capability needs the prompt's size (the body is parsed in full).
    pub reads_prompt: bool,
    /// Some capability needs the upstream address of each request.
    pub reads_endpoint: bool,
    /// Some capability judges outcomes by Envoy's response flags.
    pub reads_flags: bool,
    /// Some capability counts each request's upstream attempts.
    pub reads_attempts: bool,
    /// Some capability may ask attempts to hold their response headers
    /// until the first token ([`super::FIRST_TOKEN_PROPERTY`]).
    pub holds_first_token: bool,
    /// Some capability reads every attempt's rate-limit headers.
    pub reads_quota: bool,
}

/// What the root and every request of one VM share.
pub(crate) struct Vm {
    /// Requests waiting for a capability's tick, by context id.
    pub waiting: RefCell<BTreeMap<u32, Rc<RefCell<Exchange>>>>,
    /// xorshift64* state: jitter and shedding draws.
    rng: Cell<u64>,
    /// What JSON answers may hold of this worker's memory.
    pub json_budget: JsonBudget,
}

impl Vm {
    /// A uniform draw in `[0, 1)`. Not cryptographic: it spreads open
    /// times and sheds load, nothing more.
    pub fn rand(&self) -> f64 {
        let mut x = self.rng.get();
        let draw = sluice_core::draw::unit(&mut x);
        self.rng.set(x);
        draw
    }
}

thread_local! {
    static MODULE: Cell<Option<(&'static str, Builder)>> = const { Cell::new(None) };
}

/// Starts the engine in this VM: the logger, the panic hook and the root
/// context. Call it from `proxy_wasm::main!`. `module` names the module in
/// logs; `build` turns a policy into its capabilities.
pub fn start(module: &'static str, build: Builder) {
    crate::panic::install(module, log::LevelFilter::Info);
    MODULE.with(|m| m.set(Some((module, build))));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Engine::new()) });
}

/// The root context of the engine.
pub struct Engine {
    module: &'static str,
    build: Option<Builder>,
    vm: Rc<Vm>,
    /// The current configuration, then retired ones that still have
    /// requests in flight (their capabilities keep ticking for those).
    configs: Vec<Rc<Config>>,
    tick: Option<Duration>,
    /// Set when this root runs as the clusters' upstream filter (root id
    /// [`ATTEMPT_ROOT_ID`]): its contexts observe attempts, not requests.
    attempts: Option<Rc<AttemptMetrics>>,
}

impl Engine {
    fn new() -> Self {
        let (module, build) = MODULE
            .with(Cell::get)
            .map_or(("sluice", None), |(m, b)| (m, Some(b)));
        Engine {
            module,
            build,
            vm: Rc::new(Vm {
                waiting: RefCell::new(BTreeMap::new()),
                rng: Cell::new(host::now().as_nanos() | 1),
                json_budget: JsonBudget::new(JSON_BUDGET),
            }),
            configs: Vec::new(),
            tick: None,
            attempts: None,
        }
    }
}

impl Context for Engine {}

impl RootContext for Engine {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = host::buffer(Buffer::PluginConfiguration, usize::MAX);
        let Some(policy) = load_policy(self.module, bytes.as_deref()) else {
            return false;
        };
        let Some(build) = self.build else {
            warn!("{}: no capabilities registered", self.module);
            return false;
        };
        let per_attempt =
            host::property_string(&["plugin_root_id"]).as_deref() == Some(ATTEMPT_ROOT_ID);
        if per_attempt && self.attempts.is_none() {
            self.attempts = Some(Rc::new(AttemptMetrics::define()));
        }
        let caps = build(&policy);
        let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
        log::info!(
            "{}{}: enforcing {}",
            self.module,
            if per_attempt { " (per attempt)" } else { "" },
            if names.is_empty() {
                "nothing (no section enabled)".to_string()
            } else {
                names.join(", ")
            }
        );
        let max_body = policy
            .tokens
            .as_ref()
            .map_or(DEFAULT_MAX_BODY, |t| t.max_body.0);
        let tick = if per_attempt {
            caps.iter().filter_map(|c| c.attempt_tick_period()).min()
        } else {
            caps.iter().filter_map(|c| c.tick_period()).min()
        };
        let config = Config {
            reads_usage: caps.iter().any(|c| c.reads_usage()),
            reads_prompt: caps.iter().any(|c| c.reads_prompt()),
            reads_endpoint: caps.iter().any(|c| c.reads_endpoint()),
            reads_flags: caps.iter().any(|c| c.reads_flags()),
            reads_attempts: caps.iter().any(|c| c.reads_attempts()),
            holds_first_token: caps.iter().any(|c| c.holds_first_token()),
            reads_quota: caps.iter().any(|c| c.reads_quota()),
            caps,
            max_body,
            policy,
        };
        self.configs.insert(0, Rc::new(config));
        if let Some(period) = tick
            && self.tick != Some(period)
            && host::set_tick_period(period).is_ok()
        {
            self.tick = Some(period);
        }
        true
    }

    fn on_tick(&mut self) {
        let now = host::now();
        let per_attempt = self.attempts.is_some();
        let mut wakes: Vec<(u32, Wake)> = Vec::new();
        for config in &self.configs {
            for cap in &config.caps {
                if per_attempt {
                    cap.attempt_tick(now);
                } else {
                    cap.tick(now, &mut |id, wake| wakes.push((id, wake)));
                }
            }
        }
        for (id, wake) in wakes {
            let exchange = self.vm.waiting.borrow().get(&id).cloned();
            if let Some(exchange) = exchange {
                Exchange::wake(&exchange, &self.vm, wake, now);
            }
        }
        // A retired configuration goes once no request holds it.
        let mut first = true;
        self.configs.retain(|c| {
            let keep = first || Rc::strong_count(c) > 1;
            first = false;
            keep
        });
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never `None`: the SDK panics on it. Without a configuration (one
        // that failed never reaches requests in Envoy) the request passes.
        if let Some(metrics) = &self.attempts {
            return Some(Box::new(AttemptHttp::new(
                self.configs.first().cloned(),
                Rc::clone(metrics),
            )));
        }
        Some(Box::new(ExchangeHttp::new(
            context_id,
            self.configs.first().cloned(),
            Rc::clone(&self.vm),
        )))
    }
}
