//! llm-sim: an OpenAI- and Anthropic-compatible inference server simulator.
//!
//! sluice's filters protect LLM traffic from upstreams that fail, slow down or
//! run out of capacity. Testing that against real inference servers is slow,
//! expensive and not reproducible, so the lab, the end-to-end tests, the demo
//! and the benchmarks put this simulator behind Envoy instead. It speaks the
//! wire formats the real `openai` and `anthropic` SDKs parse, takes time the
//! way a real server does (time to first token grows with the prompt, tokens
//! stream at a fixed rate), refuses work beyond its capacity, and can be told
//! to misbehave (errors with or without rate-limit hints, a provider quota
//! that runs out, latency, cut streams, requests never answered, refused
//! connections, death and revival), at start-up or at run time through a
//! separate control port.
//!
//! Everything random is drawn from one seeded PRNG, so a scenario replays the
//! same way given the same `--seed` and the same request order.
//!
//! Layout, one module per concern:
//! - [`config`]: the command line (also how tests build a server);
//! - [`api`]: request parsing and response shapes, [`api::openai`] and
//!   [`api::anthropic`];
//! - [`timing`]: prompt-token estimate, output length, TTFT and token pacing;
//! - [`faults`]: the fault set and the seeded per-request decision;
//! - [`quota`]: a provider quota's fixed window and its rate-limit headers;
//! - [`capacity`]: the concurrency limit with its optional bounded queue;
//! - [`stats`]: counters served by the control port;
//! - [`control`]: the control port's HTTP API;
//! - [`generate`]: one inference request from body to response;
//! - [`server`]: listeners, the accept loop, die/revive.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod capacity;
pub mod config;
pub mod control;
pub mod faults;
pub mod generate;
pub mod gzip;
pub mod quota;
pub mod server;
pub mod stats;
pub mod timing;

pub use config::Config;
pub use faults::Faults;
pub use server::{Readiness, RunningServer};
