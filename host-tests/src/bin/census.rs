//! Prints the host-call census of a filter module for one LLM request: a
//! non-streaming chat completion with a 1 KiB JSON body, and a streaming one
//! answered with 100 SSE chunks.
//!
//! ```text
//! cargo run -p sluice-host-tests --bin census -- \
//!     --module sluice --config policy.toml [--json | --stream] \
//!     [--header x-tenant-id:acme] [--model gpt-4o]
//! ```
//!
//! `--module` is a crate name (found like every filter, see
//! [`sluice_host_tests::locate_filter`]) or a path to a `.wasm`. The policy's
//! `[[backend]]` names become clusters (routed by `x-sluice-backend`, the
//! first by default, as `sluice render envoy` routes), each with one endpoint
//! answering the OpenAI shape. One identical request warms the VM up first;
//! the census counts the second one only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig, Request,
    RouteConfig,
};

#[derive(Parser)]
#[command(about = "Host calls per phase of one request through a filter module")]
struct Args {
    /// Filter crate name (`sluice`, `sluice-noop-body`) or path to a `.wasm`.
    #[arg(long)]
    module: String,
    /// Plugin configuration file (a TOML policy, or JSON as Istio sends it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Only the non-streaming request.
    #[arg(long, conflicts_with = "stream")]
    json: bool,
    /// Only the streaming request.
    #[arg(long)]
    stream: bool,
    /// Request header, `name:value` (repeatable; default `x-tenant-id:acme`).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Model asked for (default: the first backend's first model that is
    /// not a pattern, else `gpt-4o`).
    #[arg(long)]
    model: Option<String>,
    /// Worker VMs (the request runs on worker 0).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// Size of the non-streaming request body.
const BODY_BYTES: usize = 1024;
/// SSE chunks of the streaming answer: 98 tokens, the usage chunk, `[DONE]`.
const STREAM_TOKENS: u32 = 98;

/// The policy's backends: (name, models).
fn backends(config: &[u8]) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text = std::str::from_utf8(config).context("configuration is not UTF-8")?;
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).context("configuration is not JSON")?
    } else {
        let table: toml::Table = toml::from_str(text).context("configuration is not TOML")?;
        serde_json::to_value(table)?
    };
    let list = value
        .get("backend")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            let name = b.get("name")?.as_str()?.to_owned();
            let models = b
                .get("models")
                .and_then(|m| m.as_array())
                .map(|m| {
                    m.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Some((name, models))
        })
        .collect())
}

/// A chat completion body of exactly `BODY_BYTES` bytes.
fn chat_body(model: &str, stream: bool) -> String {
    let options = if stream {
        r#","stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    let shell = |content: &str| {
        format!(
            r#"{{"model":"{model}","stream":{stream}{options},"max_tokens":100,"messages":[{{"role":"user","content":"{content}"}}]}}"#
        )
    };
    let padding = BODY_BYTES.saturating_sub(shell("").len());
    shell(&"x".repeat(padding))
}

fn upstream(stream: bool) -> EndpointBehavior {
    if stream {
        EndpointBehavior::llm(
            Duration::from_millis(50),
            Duration::from_millis(5),
            STREAM_TOKENS,
        )
    } else {
        let body = r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":260,"completion_tokens":40,"total_tokens":300}}"#;
        EndpointBehavior::fixed(200, body, Duration::from_millis(50))
    }
}

fn load_module(spec: &str) -> anyhow::Result<FilterModule> {
    let path = Path::new(spec);
    if spec.ends_with(".wasm") && path.is_file() {
        FilterModule::from_file(path)
    } else {
        FilterModule::load(spec)
    }
}

fn run(args: &Args, module: &FilterModule, config: &[u8], stream: bool) -> anyhow::Result<()> {
    let backends = backends(config)?;
    let default_cluster = backends
        .first()
        .map_or_else(|| "backend".to_owned(), |(n, _)| n.clone());
    let mut host = Host::new(HostOptions {
        workers: args.workers.max(1),
        route: RouteConfig {
            cluster_header: Some("x-sluice-backend".into()),
            default_cluster: Some(default_cluster.clone()),
            ..RouteConfig::default()
        },
        ..HostOptions::default()
    });
    let names: Vec<String> = if backends.is_empty() {
        vec![default_cluster]
    } else {
        backends.iter().map(|(n, _)| n.clone()).collect()
    };
    for (i, name) in names.iter().enumerate() {
        host.add_cluster(Cluster::new(
            name,
            vec![Endpoint::new(
                &format!("10.0.{i}.1:8000"),
                "zone-a",
                upstream(stream),
            )],
        ));
    }
    host.add_filter(
        PluginConfig::new(module.clone())
            .configuration(config.to_vec())
            // As `sluice render envoy` configures it.
            .allow_on_headers_stop_iteration(true),
    )?;
    let model = args.model.clone().unwrap_or_else(|| {
        backends
            .first()
            .and_then(|(_, models)| models.iter().find(|m| !m.contains('*')).cloned())
            .unwrap_or_else(|| "gpt-4o".into())
    });
    let mut request = Request::post_json("/v1/chat/completions", &chat_body(&model, stream));
    let headers = if args.headers.is_empty() {
        vec!["x-tenant-id:acme".to_owned()]
    } else {
        args.headers.clone()
    };
    for header in &headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow!("--header wants name:value, got {header}"))?;
        request = request.header(name.trim(), value.trim());
    }

    let warmup = host.send_on(0, request.clone());
    host.advance(Duration::from_secs(1));
    host.reset_census();
    let response = host.send_on(0, request);
    let census = host.census().clone();

    let kind = if stream {
        format!("streaming, {} SSE chunks", response.chunks.len())
    } else {
        format!("non-streaming, {BODY_BYTES} B JSON body")
    };
    println!(
        "# {} — {kind}: status {} (warm-up {}), {} attempt(s), {} B to the client",
        module.name,
        response.status,
        warmup.status,
        response.attempts,
        response.body.len()
    );
    println!("{census}");
    if !host.vm_failures().is_empty() {
        bail!("VM failures: {:?}", host.vm_failures());
    }
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let module = load_module(&args.module)?;
    let config = match &args.config {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => Vec::new(),
    };
    if !args.stream {
        run(&args, &module, &config, false)?;
    }
    if !args.json {
        run(&args, &module, &config, true)?;
    }
    Ok(())
}
