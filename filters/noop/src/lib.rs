//! A proxy-wasm filter that does nothing.
//!
//! Benchmarks run it beside sluice's filters to measure what any Rust
//! proxy-wasm filter costs in Envoy (VM context, callbacks, header copies),
//! so a filter's own cost can be told apart from the runtime's.
// Not product code: a benchmark floor: it uses the SDK as a typical Rust filter does, so its cost is the SDK's.
#![allow(clippy::disallowed_methods)]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl RootContext for Noop {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }
}

impl HttpContext for Noop {}
