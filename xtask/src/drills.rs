//! `cargo xtask drills [NAME...]`: the chaos drills side by side (sluice in
//! Envoy, Envoy alone, LiteLLM), run by `envoy/drills/run.py`.
//!
//! Everything the drills need is made here with no manual step: the wasm
//! module and the native tools (`llm-sim`, `loadgen`, the `sluice` CLI), the
//! lab venv (Envoy, matplotlib) and the LiteLLM venv. The runner's exit
//! status is passed on: non-zero only when a drill could not be run (a
//! harness error); a MISS verdict is a result, written to the report.

use crate::lab;
use crate::litellm;
use crate::workspace::Workspace;
use anyhow::{Result, bail};
use std::process::Command;

/// Builds, installs both venvs, runs the drills named in `args` (all without).
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let venv = lab::prepare(ws)?;
    litellm::ensure_litellm_venv(ws)?;
    let mut runner = Command::new(&venv.python);
    runner
        .args(["-m", "drills.run", "--out"])
        .arg(ws.target_dir.join("drills"))
        .args(args);
    lab::lab_env(ws, &venv, &mut runner);
    runner.env("SLUICE_LITELLM_VENV", ws.target_dir.join("litellm-venv"));
    eprintln!("$ {runner:?}");
    let status = runner.status()?;
    if !status.success() {
        bail!("the drill runner reported a harness error ({status}); see its output above");
    }
    Ok(())
}
