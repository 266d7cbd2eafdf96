//! Prints the harness's probe observation document for one request, or
//! compares it with a document captured from Envoy.
//!
//! ```text
//! cargo run -p sluice-host-tests --bin probe-observations -- \
//!     --path /v1/chat/completions --header x-probe-local-reply:429 [--compare envoy.json]
//! ```
//! Exit status 1 when `--compare` finds differences.

use clap::Parser;
use sluice_host_tests::probe::{Difference, ProbeRun, compare, harness_observations};

#[derive(Parser)]
#[command(about = "The harness's view of the sluice conformance probe")]
struct Args {
    #[arg(long, default_value = "POST")]
    method: String,
    #[arg(long, default_value = "/v1/chat/completions?probe=1")]
    path: String,
    /// Extra request header, `name:value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Request body (default: a small chat completion request; "" for none).
    #[arg(long)]
    body: Option<String>,
    #[arg(long, default_value_t = 200)]
    upstream_status: u32,
    #[arg(long)]
    upstream_body: Option<String>,
    /// Probe plugin configuration (JSON).
    #[arg(long)]
    configuration: Option<String>,
    #[arg(long, default_value_t = 1)]
    warmup_requests: usize,
    /// A document captured from Envoy to diff against.
    #[arg(long)]
    compare: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut run = ProbeRun {
        method: args.method,
        path: args.path,
        upstream_status: args.upstream_status,
        warmup_requests: args.warmup_requests,
        ..ProbeRun::default()
    };
    for header in &args.headers {
        let (k, v) = header
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header wants name:value, got {header}"))?;
        run.headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some(body) = args.body {
        run.body = (!body.is_empty()).then_some(body);
    }
    if let Some(body) = args.upstream_body {
        run.upstream_body = body;
    }
    if let Some(config) = args.configuration {
        run.configuration = config;
    }
    let document = harness_observations(&run)?;
    let Some(path) = args.compare else {
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    };
    let envoy: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let differences = compare(&document, &envoy);
    for d in &differences {
        match d {
            Difference::OnlyLeft(k) => println!("only in harness: {k}"),
            Difference::OnlyRight(k) => println!("only in envoy:   {k}"),
            Difference::Value { key, left, right } => {
                println!("differs: {key}\n  harness: {left}\n  envoy:   {right}")
            }
        }
    }
    println!("{} difference(s)", differences.len());
    if !differences.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
