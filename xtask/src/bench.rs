//! `cargo xtask bench`: what benchmarks exist, and running the cheap ones.
//!
//! Criterion benches build in the `bench` profile (release with LTO), which is
//! minutes of compiling for the wasmtime host: they run only with `--run`.

use crate::cmd;
use crate::workspace::Workspace;
use anyhow::Result;

struct Bench {
    name: &'static str,
    package: &'static str,
    /// The package's directory, relative to the workspace root.
    dir: &'static str,
    bench: &'static str,
    what: &'static str,
    /// Arguments after `--` (criterion's quick mode keeps the run short).
    args: &'static [&'static str],
}

const BENCHES: &[Bench] = &[Bench {
    name: "host",
    package: "sluice-host-tests",
    dir: "host-tests",
    bench: "host",
    what: "filters in the wasmtime proxy-wasm test host (per-call cost of the ABI events)",
    args: &["--quick"],
}];

const LATER: &[&str] = &[
    "whole Envoy under load, CPU per request of each filter against no filter, the \
     do-nothing filter and local_ratelimit (after `cargo xtask build` and \
     `cargo xtask lab-venv`): PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py",
    "[outlier]'s cost, sluice-all against sluice-both on the same four simulators: \
     benches/envoy_cpu.py --variants none,sluice-both,sluice-all,sluice-all-noattempt \
     (benches/envoy-cpu.md)",
    "core algorithms (filters/core): criterion benches, not written yet",
];

/// Lists the benches; with `run`, runs those whose package exists.
pub fn run(ws: &Workspace, run: bool) -> Result<()> {
    println!("benchmarks:");
    for b in BENCHES {
        let present = ws.root.join(b.dir).join("benches").is_dir();
        let state = if present { "" } else { " (missing)" };
        println!(
            "  {:<8} cargo bench -p {} --bench {}{state}\n           {}",
            b.name, b.package, b.bench, b.what
        );
    }
    for later in LATER {
        println!("  -        {later}");
    }
    if !run {
        println!("(run them with `cargo xtask bench --run`)");
        return Ok(());
    }
    for b in BENCHES {
        if !ws.has_member(b.package) {
            println!(
                "skipping {}: package {} is not in the workspace",
                b.name, b.package
            );
            continue;
        }
        cmd::run(
            cmd::cargo()
                .current_dir(&ws.root)
                .args(["bench", "-p", b.package, "--bench", b.bench, "--"])
                .args(b.args),
        )?;
    }
    Ok(())
}
