//! A proxy-wasm filter that does nothing but what a body-reading filter must.
//!
//! sluice's capabilities read the request body (which model, how many tokens)
//! and every response chunk (usage, time per token), so the header-only
//! `sluice-noop` is not their floor: holding the request until its end,
//! copying the body into the VM and copying each response chunk are costs
//! any body-reading filter pays. Benchmarks run this beside sluice's filters
//! and report their added Envoy CPU as a ratio of this one's, so what is
//! left is the filter's own work.
//!
//! It needs `allow_on_headers_stop_iteration: true` in the Wasm filter's
//! config: without it (Envoy >= 1.35) a paused header phase becomes
//! StopAllIteration and the body callbacks never run.
//!
//! Host access goes through `hostcalls`, which return `Result`, never the
//! SDK's getters that unwrap: a panic in a Wasm VM breaks traffic.
// Not product code: a benchmark floor: it uses the SDK as a typical Rust filter does, so its cost is the SDK's.
#![allow(clippy::disallowed_methods)]

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopBodyRoot) });
}}

struct NoopBodyRoot;

impl Context for NoopBodyRoot {}

impl RootContext for NoopBodyRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopBody))
    }
}

/// One request: holds it until its body is whole, reads it, lets it go.
struct NoopBody;

impl Context for NoopBody {}

impl HttpContext for NoopBody {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // A request without a body has nothing to wait for.
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// `body_size` is the size of everything Envoy has buffered so far.
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            // Envoy keeps buffering while the filter pauses.
            return Action::Pause;
        }
        // The copy into the VM is the cost being measured; the bytes are not used.
        let _body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        Action::Continue
    }

    /// A request that ends with trailers never sees a body end of stream:
    /// its body is already buffered, and continuing here releases it.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        Action::Continue
    }

    /// Reads each response chunk as it passes, as a filter counting usage does.
    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        let _chunk = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size);
        Action::Continue
    }
}
