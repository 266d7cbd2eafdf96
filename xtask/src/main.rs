//! `cargo xtask`: sluice's build orchestration.
//!
//! Everything a fresh clone needs is installed here, idempotently, so that
//! `cargo xtask test` (what CI runs through `.ci/run`) and `cargo xtask demo`
//! work with no manual step: the wasm32-wasip1 target, the filters, the native
//! tools the Envoy lab drives, and the lab's Python virtual environment with
//! the official Envoy 1.40 binary.

mod bench;
mod build;
mod cmd;
mod drills;
mod lab;
mod litellm;
mod test;
mod workspace;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sluice build orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every wasm filter (release, wasm32-wasip1) and the native lab tools.
    Build,
    /// Run every check: fmt, clippy (native and wasm), build, cargo test, Envoy lab.
    Test {
        /// Run only the Envoy lab stage (after building what it needs).
        #[arg(long)]
        lab_only: bool,
        /// Extra arguments passed to pytest in the lab stage (e.g. `-k openai`).
        #[arg(last = true)]
        pytest_args: Vec<String>,
    },
    /// Build, install the lab and run the demo story through a real Envoy.
    Demo {
        /// Arguments passed to the demo (`--help` lists them).
        #[arg(last = true)]
        demo_args: Vec<String>,
    },
    /// Build sluice.wasm and write it as OCI image layouts (`sluice package`)
    /// under target/oci/.
    Package {
        /// Arguments passed to `sluice package` (e.g. `--tag 1.0.0`).
        #[arg(last = true)]
        package_args: Vec<String>,
    },
    /// Run every benchmark (Envoy CPU per request, criterion) and write the
    /// record: benches/cpu.md, benches/host-tests.md, their plots and
    /// target/bench/results.json.
    Bench {
        /// Only list what would run.
        #[arg(long)]
        list: bool,
        /// Interleaved rounds of the Envoy benchmark.
        #[arg(long, default_value_t = bench::DEFAULT_ROUNDS)]
        rounds: u32,
        /// Seconds of load per variant, workload and round.
        #[arg(long, default_value_t = bench::DEFAULT_SECONDS)]
        seconds: u32,
        /// Write the Markdown pages and plots here instead of benches/.
        #[arg(long)]
        record_dir: Option<std::path::PathBuf>,
    },
    /// Create or update the lab's Python virtual environment (target/lab-venv).
    LabVenv,
    /// Install the LiteLLM proxy the drills compare with (target/litellm-venv).
    ///
    /// Not part of `test`: it is big, and only the side-by-side drills use it.
    LitellmVenv,
    /// Chaos drills side by side (sluice in Envoy, Envoy alone, LiteLLM):
    /// builds, installs the lab and LiteLLM venvs, writes target/drills/.
    Drills {
        /// Drills to run (default: all); runner options such as
        /// `--systems sluice,native` go after `--`.
        names: Vec<String>,
        /// Extra arguments for `python -m drills.run`.
        #[arg(last = true)]
        runner_args: Vec<String>,
    },
    /// Install docker-registry and skopeo (apt-get, if absent) for the OCI
    /// registry lab tests.
    OciTools,
}

fn main() {
    let cli = Cli::parse();
    let result = run(cli.command);
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    let ws = workspace::Workspace::load()?;
    match command {
        Command::Build => build::build_all(&ws).map(|_| ()),
        Command::Test {
            lab_only,
            pytest_args,
        } => test::run(&ws, lab_only, &pytest_args),
        Command::Demo { demo_args } => lab::demo(&ws, &demo_args),
        Command::Package { package_args } => build::package(&ws, &package_args),
        Command::Bench {
            list,
            rounds,
            seconds,
            record_dir,
        } => {
            let opts = bench::Options {
                rounds,
                seconds,
                record_dir,
            };
            if list {
                bench::list(&ws, &opts);
                Ok(())
            } else {
                bench::run(&ws, &opts)
            }
        }
        Command::Drills { names, runner_args } => {
            let args: Vec<String> = names.into_iter().chain(runner_args).collect();
            drills::run(&ws, &args)
        }
        Command::LabVenv => lab::ensure_venv(&ws).map(|_| ()),
        Command::LitellmVenv => litellm::ensure_litellm_venv(&ws).map(|_| ()),
        Command::OciTools => match lab::ensure_oci_tools() {
            lab::OciTools::Present => Ok(()),
            lab::OciTools::Unavailable(reason) => anyhow::bail!(reason),
        },
    }
}
