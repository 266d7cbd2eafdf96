//! `cargo xtask bench`: runs every benchmark and writes the record.
//!
//! One command makes the numbers in `benches/`, so that they are all from
//! one run on one machine and can be made again the same way:
//!
//! 1. builds what the benchmarks need (the wasm filters, the native tools
//!    with llm-sim, the lab venv with Envoy 1.40 and matplotlib, the
//!    criterion bench binary) before anything is measured, so no compile
//!    runs alongside a measurement;
//! 2. runs `benches/envoy_cpu.py` once with [`ENVOY_VARIANTS`] side by side
//!    (their load runs interleaved round by round);
//! 3. runs the criterion benches of [`CRITERION`] in quick mode;
//! 4. runs `benches/record.py`, which writes `target/bench/results.json`,
//!    the generated parts of `benches/cpu.md` and `benches/host-tests.md`,
//!    and their plots.
//!
//! A stage that fails does not stop the others: what ran is recorded, the
//! failure is written into the record, and the command exits non-zero.

use crate::build;
use crate::cmd;
use crate::lab;
use crate::workspace::Workspace;
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// A criterion bench of the workspace.
struct Bench {
    package: &'static str,
    /// The package's directory, relative to the workspace root.
    dir: &'static str,
    bench: &'static str,
    what: &'static str,
}

/// The criterion benches run (quick mode, `native` profile: release without
/// LTO, as the recorded numbers always were). There are no benches of the
/// core algorithms yet (`filters/core` has no `benches/`).
const CRITERION: &[Bench] = &[Bench {
    package: "sluice-host-tests",
    dir: "host-tests",
    bench: "host",
    what: "filters in the wasmtime proxy-wasm test host (per-request cost, module load, \
           a mesh scenario)",
}];

/// The Envoy variants of the record, in the order of its tables: the
/// floors, each capability alone, every section together, and Envoy's own
/// rate limiter (see `benches/envoy_cpu.py` for what each one is).
/// [failover] needs [outlier]'s picker, so `sluice-failover` is the two.
pub const ENVOY_VARIANTS: &[&str] = &[
    "none",
    "noop",
    "noop-body",
    "sluice-tokens",
    "sluice-breaker",
    "sluice-outlier",
    "sluice-retry",
    "sluice-failover",
    "sluice-every",
    "local_ratelimit",
];

/// How long the Envoy benchmark runs.
pub struct Options {
    pub rounds: u32,
    pub seconds: u32,
    /// Where the Markdown pages and plots go (default `benches/`).
    pub record_dir: Option<std::path::PathBuf>,
}

/// `cargo xtask bench --list`.
pub fn list(ws: &Workspace, opts: &Options) {
    println!("`cargo xtask bench` runs, after building what they need:");
    println!(
        "  envoy    PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py \
         --rounds {} --seconds {} --variants {}\n           \
         Envoy CPU per request, every capability side by side (about {} min)",
        opts.rounds,
        opts.seconds,
        ENVOY_VARIANTS.join(","),
        envoy_minutes(opts)
    );
    for b in CRITERION {
        let present = ws.root.join(b.dir).join("benches").is_dir();
        let state = if present { "" } else { " (missing)" };
        println!(
            "  {:<8} cargo bench --profile native -p {} --bench {} -- --quick{state}\n           {}",
            b.bench, b.package, b.bench, b.what
        );
    }
    println!(
        "then benches/record.py writes target/bench/results.json, benches/cpu.md, \
         benches/host-tests.md and their plots.\n\
         Other studies (benches/envoy-cpu.md) are run by hand with envoy_cpu.py --variants."
    );
}

/// Whole minutes the Envoy benchmark measures for (two workloads per round).
fn envoy_minutes(opts: &Options) -> u64 {
    let secs = u64::from(opts.rounds) * u64::from(opts.seconds) * 2 * ENVOY_VARIANTS.len() as u64;
    secs.div_ceil(60)
}

/// `cargo xtask bench`.
pub fn run(ws: &Workspace, opts: &Options) -> Result<()> {
    // Build everything first: nothing compiles while something is measured.
    build::build_all(ws)?;
    let venv = lab::ensure_venv(ws)?;
    let criterion: Vec<&Bench> = CRITERION
        .iter()
        .filter(|b| {
            let present = ws.has_member(b.package);
            if !present {
                println!("skipping bench {}: no package {}", b.bench, b.package);
            }
            present
        })
        .collect();
    for b in &criterion {
        cmd::run(criterion_command(ws, b).arg("--no-run"))?;
    }

    let out = ws.target_dir.join("bench");
    std::fs::create_dir_all(&out)?;
    let since = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let envoy_json = out.join("envoy-cpu.json");

    let mut envoy = Command::new(&venv.python);
    envoy
        .current_dir(&ws.root)
        .env("PYTHONPATH", ws.root.join("envoy"))
        .arg("benches/envoy_cpu.py")
        .args(["--rounds", &opts.rounds.to_string()])
        .args(["--seconds", &opts.seconds.to_string()])
        .args(["--variants", &ENVOY_VARIANTS.join(",")])
        .arg("--target-dir")
        .arg(&ws.target_dir)
        // The script's own report (envoy-cpu.md's format) stays in target/:
        // the record is written by record.py.
        .arg("--out")
        .arg(out.join("envoy-cpu-report.md"))
        .arg("--json")
        .arg(&envoy_json);
    let envoy_exit = exit_code(cmd::status(&mut envoy)?);

    let mut criterion_exit = 0;
    for b in &criterion {
        let code = exit_code(cmd::status(
            criterion_command(ws, b).args(["--", "--quick"]),
        )?);
        if code != 0 {
            criterion_exit = code;
        }
    }

    let record_dir = opts
        .record_dir
        .clone()
        .unwrap_or_else(|| ws.root.join("benches"));
    let mut command = String::from("cargo xtask bench");
    if opts.rounds != DEFAULT_ROUNDS || opts.seconds != DEFAULT_SECONDS {
        command.push_str(&format!(
            " --rounds {} --seconds {}",
            opts.rounds, opts.seconds
        ));
    }
    let mut record = Command::new(&venv.python);
    record
        .current_dir(&ws.root)
        .arg("benches/record.py")
        .arg("--envoy")
        .arg(&envoy_json)
        .arg("--criterion")
        .arg(ws.target_dir.join("criterion"))
        .args(["--since", &since.to_string()])
        .arg("--results")
        .arg(out.join("results.json"))
        .arg("--benches")
        .arg(&record_dir)
        .args(["--command", &command])
        .args(["--envoy-exit", &envoy_exit.to_string()])
        .args(["--criterion-exit", &criterion_exit.to_string()]);
    let recorded = cmd::status(&mut record)?.success();

    report_path(&record_dir.join("cpu.md"));
    report_path(&record_dir.join("host-tests.md"));
    report_path(&out.join("results.json"));
    if envoy_exit != 0 {
        bail!(
            "the Envoy benchmark failed (exit {envoy_exit}: a variant failed or got non-2xx \
             answers); the record says which"
        );
    }
    if criterion_exit != 0 {
        bail!("a criterion bench failed (exit {criterion_exit})");
    }
    if !recorded {
        bail!("benches/record.py could not write the whole record");
    }
    Ok(())
}

/// Default rounds and seconds: 10 variants × 2 workloads × 4 rounds × 4 s
/// is under 6 minutes of load, which with the criterion benches keeps the
/// whole command near 10 minutes on 2 cores once built.
pub const DEFAULT_ROUNDS: u32 = 4;
pub const DEFAULT_SECONDS: u32 = 4;

fn criterion_command(ws: &Workspace, b: &Bench) -> Command {
    let mut c = cmd::cargo();
    // The bench loads the filters just built (`cargo xtask build`).
    c.env("SLUICE_WASM_DIR", ws.wasm_dir());
    c.current_dir(&ws.root).args([
        "bench",
        "--profile",
        "native",
        "-p",
        b.package,
        "--bench",
        b.bench,
    ]);
    c
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or(-1)
}

fn report_path(path: &Path) {
    if path.exists() {
        println!("  {}", path.display());
    }
}
