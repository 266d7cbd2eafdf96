//! Integration tests of llm-sim over real sockets on 127.0.0.1.
//!
//! Most tests start the server in-process (`RunningServer`, port 0, dropped
//! at the end of the test even on failure); `process.rs` runs the binary the
//! way the lab does. Every request is bounded by `client::TIMEOUT` and every
//! loop by a count.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod capacity;
mod choices;
mod client;
mod faults;
mod options;
mod process;
mod quota;

use clap::Parser;
use llm_sim::{Config, RunningServer};
use serde_json::{Value, json};

/// Starts a server with `args` after fast defaults (no latency, 5 tokens, model `m`).
pub async fn start(args: &[&str]) -> RunningServer {
    let mut all = vec![
        "llm-sim",
        "--quiet",
        "--ttft-ms",
        "0",
        "--ttft-per-prompt-token-us",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        "5",
        "--models",
        "m,other",
        "--zone",
        "zone-a",
        "--instance",
        "sim-1",
    ];
    all.extend_from_slice(args);
    RunningServer::start(Config::try_parse_from(all).unwrap())
        .await
        .unwrap()
}

/// Replaces the faults through the control port and returns the answer.
pub async fn set_faults(server: &RunningServer, faults: Value) -> Value {
    let resp = client::post(server.control_addr(), "/_sim/faults", &faults).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// The control port's counters.
pub async fn stats(server: &RunningServer) -> Value {
    client::get(server.control_addr(), "/_sim/stats")
        .await
        .json()
}

/// A small chat request body.
pub fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello, simulator!"}],
    });
    merge(&mut body, extra);
    body
}

/// A small Anthropic messages body.
pub fn message(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello, simulator!"}],
    });
    merge(&mut body, extra);
    body
}

fn merge(body: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
}
