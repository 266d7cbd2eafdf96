//! Benchmarks of the test host itself (not of sluice's filters):
//! - one request through a filter (passthrough probe, and the full probe),
//! - module load: cranelift compile against a precompiled `.cwasm`, and
//!   starting a plugin's VMs,
//! - simulated requests per second in a mesh scenario.
//!
//! Run with `cargo bench --profile native -p sluice-host-tests --bench host`
//! (release host without LTO); results go to `benches/host-tests.md`.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_host_tests::mesh::{Scenario, run};
use sluice_host_tests::module_cache::{engine, locate_filter, precompiled_dir};
use sluice_host_tests::{
    Cluster, Endpoint, EndpointBehavior, FilterModule, Host, HostOptions, PluginConfig, Request,
};

fn host_with(config: &str) -> Host {
    let module = FilterModule::load("sluice-probe").unwrap();
    let mut host = Host::new(HostOptions {
        workers: 1,
        ..HostOptions::default()
    });
    host.add_cluster(Cluster::fixed(
        "backend",
        200,
        r#"{"ok":true}"#,
        Duration::from_millis(1),
    ));
    host.add_filter(
        PluginConfig::new(module)
            .name("bench")
            .vm_id("bench")
            .configuration(config),
    )
    .unwrap();
    host.keep_finished_responses(false);
    host
}

fn one_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Elements(1));
    for (name, config) in [
        ("passthrough_probe", r#"{"mode":"passthrough"}"#),
        ("full_probe", r#"{"tick_ms":100}"#),
    ] {
        let mut host = host_with(config);
        let mut done = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                host.start(
                    Request::post_json("/v1/chat/completions", r#"{"model":"m"}"#)
                        .header("x-probe-id", "bench"),
                );
                done += 1;
                host.run_until(Duration::from_secs(1), |h| h.finished_count() >= done);
            })
        });
    }
    group.finish();
}

/// A policy with one backend, plus `sections`: what `benches/envoy_cpu.py`
/// runs in Envoy, so the two can be read side by side.
fn bench_policy(sections: &str) -> String {
    format!(
        r#"
name = "bench"
[[backend]]
name = "primary"
models = ["sim-large"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:1"]
{sections}
"#
    )
}

/// One 1 KiB chat request through `sluice.wasm` per policy, and through
/// the do-nothing body-reading floor: the guest's own cost per request.
fn sluice_request(c: &mut Criterion) {
    const TOKENS: &str = "[tokens]\ndefault_max_tokens = 256\n  [[tokens.quota]]\n  tokens = \"1000M/min\"\n  requests = \"100M/min\"\n";
    const BREAKER: &str = "[breaker]\nmode = \"consecutive\"\nconsecutive_failures = 1000\n";
    let body = format!(
        r#"{{"model":"sim-large","max_tokens":16,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(900)
    );
    let answer = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":225,"completion_tokens":16,"total_tokens":241}}"#;
    let mut group = c.benchmark_group("sluice");
    group.throughput(Throughput::Elements(1));
    let both = format!("{TOKENS}{BREAKER}");
    for (name, module, config) in [
        ("noop_body", "sluice-noop-body", String::new()),
        ("none", "sluice", bench_policy("")),
        ("tokens", "sluice", bench_policy(TOKENS)),
        ("breaker", "sluice", bench_policy(BREAKER)),
        ("both", "sluice", bench_policy(&both)),
    ] {
        let mut host = Host::new(HostOptions {
            workers: 1,
            ..HostOptions::default()
        });
        host.add_cluster(Cluster::fixed(
            "primary",
            200,
            answer,
            Duration::from_millis(1),
        ));
        host.add_filter(
            PluginConfig::new(FilterModule::load(module).unwrap())
                .name("sluice")
                .vm_id("sluice")
                .configuration(config)
                .allow_on_headers_stop_iteration(true),
        )
        .unwrap();
        host.keep_finished_responses(false);
        let mut done = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                host.start(
                    Request::post_json("/v1/chat/completions", &body).header("x-tenant-id", "acme"),
                );
                done += 1;
                host.run_until(Duration::from_secs(1), |h| h.finished_count() >= done);
            })
        });
    }
    group.finish();
}

fn module_load(c: &mut Criterion) {
    let path = locate_filter("sluice-probe").unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Make sure a precompiled file exists.
    let _ = FilterModule::from_file(&path).unwrap();
    let cwasm = std::fs::read_dir(precompiled_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("sluice_probe-")
                && p.extension().is_some_and(|e| e == "cwasm")
        })
        .expect("precompiled probe");
    let mut group = c.benchmark_group("module_load");
    group.sample_size(10);
    group.bench_function("compile", |b| {
        b.iter(|| wasmtime::Module::new(engine(), &bytes).unwrap())
    });
    // SAFETY: written by this engine's `Module::serialize` (see module_cache).
    group.bench_function("deserialize_precompiled", |b| {
        b.iter(|| unsafe { wasmtime::Module::deserialize_file(engine(), &cwasm) }.unwrap())
    });
    group.bench_function("cached_load", |b| {
        b.iter(|| FilterModule::from_file(&path).unwrap())
    });
    let module = FilterModule::from_file(&path).unwrap();
    group.bench_function("start_plugin_2_workers", |b| {
        b.iter_batched(
            || Host::with_workers(2),
            |mut host| {
                host.add_filter(
                    PluginConfig::new(module.clone()).configuration(r#"{"mode":"passthrough"}"#),
                )
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn mesh(c: &mut Criterion) {
    const REQUESTS: usize = 2_000;
    let module = FilterModule::load("sluice-probe").unwrap();
    let mut group = c.benchmark_group("mesh");
    group.sample_size(10);
    group.throughput(Throughput::Elements(REQUESTS as u64));
    group.bench_function("scenario_2000_sse_requests", |b| {
        b.iter(|| {
            let mut scenario = Scenario::new(7, REQUESTS);
            scenario.rate_per_second = 200.0;
            scenario.clusters = vec![Cluster::new(
                "backend",
                (1..=4)
                    .map(|i| {
                        Endpoint::new(
                            &format!("10.0.0.{i}:8000"),
                            if i <= 2 { "zone-a" } else { "zone-b" },
                            EndpointBehavior::llm(
                                Duration::from_millis(80),
                                Duration::from_millis(10),
                                8,
                            )
                            .with_error_rate(0.02),
                        )
                    })
                    .collect(),
            )];
            scenario.filters = vec![
                PluginConfig::new(module.clone())
                    .configuration(r#"{"mode":"passthrough","retry_on":"5xx","max_retries":2}"#),
            ];
            let report = run(scenario).unwrap();
            assert_eq!(report.trace.len(), REQUESTS);
        })
    });
    group.finish();
}

criterion_group!(benches, one_request, sluice_request, module_load, mesh);
criterion_main!(benches);
