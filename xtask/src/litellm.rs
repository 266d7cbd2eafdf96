//! The LiteLLM proxy's virtual environment, for the side-by-side drills.
//!
//! The drills compare native Envoy, sluice in Envoy and the LiteLLM proxy on
//! the same llm-sim upstreams. LiteLLM is a big install (hundreds of MB), so
//! it lives apart from the lab venv, at `target/litellm-venv`, and is not part
//! of `cargo xtask test`: the drills that need it call `cargo xtask
//! litellm-venv` (or this function), and the lab test that uses it is skipped
//! without it.
//!
//! Like the lab venv, it is installed only when the pin (or the Python that
//! made it) changes: a stamp file records what was installed. A change of pin
//! rebuilds the venv from scratch, so no package of the old pin lingers and a
//! half-finished install (a full disk, a broken download) is never taken for a
//! good one: the stamp is written last.

use crate::cmd;
use crate::lab::host_python;
use crate::workspace::Workspace;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const STAMP: &str = "sluice-litellm.stamp";
const REQUIREMENTS: &str = "envoy/drills/litellm-requirements.txt";
const CONSTRAINTS: &str = "envoy/drills/litellm-constraints.txt";

/// Creates `target/litellm-venv` with the pinned `litellm[proxy]`, or does
/// nothing when the stamp says it is already there. Returns the `litellm` CLI.
pub fn ensure_litellm_venv(ws: &Workspace) -> Result<PathBuf> {
    let venv = ws.target_dir.join("litellm-venv");
    let read = |rel: &str| {
        let path = ws.root.join(rel);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let requirements = read(REQUIREMENTS)?;
    let constraints = read(CONSTRAINTS)?;
    let python = venv.join("bin/python");
    let litellm = venv.join("bin/litellm");
    let host_version = cmd::stdout(&mut cmd::command(host_python(), ["--version"]))
        .context("python3 is needed")?;
    let stamp_text = format!("{}\n{requirements}\n{constraints}", host_version.trim());
    let stamp_path = venv.join(STAMP);
    let stamp = std::fs::read_to_string(&stamp_path).unwrap_or_default();

    if litellm.is_file() && stamp == stamp_text {
        // Installed and checked before: nothing to do, and nothing slow
        // (importing the proxy to ask its version costs seconds of CPU).
        println!("LiteLLM venv up to date ({})", venv.display());
        return Ok(litellm);
    }

    let started = Instant::now();
    println!(
        "installing the LiteLLM proxy into {} (a few hundred MB, about a minute)",
        venv.display()
    );
    let mut create = cmd::command(host_python(), ["-m", "venv", "--clear"]);
    create.arg(&venv);
    cmd::run(&mut create)?;
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        // The wheels are ~half the venv's size again; keeping them in pip's
        // cache buys little for an install this rare.
        "--no-cache-dir",
        "-r",
    ])
    .arg(ws.root.join(REQUIREMENTS))
    .arg("-c")
    .arg(ws.root.join(CONSTRAINTS))
    .env("PIP_NO_INPUT", "1");
    cmd::run(&mut pip).context("installing litellm[proxy]")?;
    if !litellm.is_file() {
        bail!("pip finished but {} is missing", litellm.display());
    }

    // `--version` imports the proxy: it proves the install runs. No network:
    // the model cost map is read from the wheel, not fetched.
    let reported = cmd::stdout(
        Command::new(&litellm)
            .arg("--version")
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_MODE", "PRODUCTION"),
    )
    .with_context(|| format!("running {} --version", litellm.display()))?;
    let version = reported.split_whitespace().last().unwrap_or_default();
    std::fs::write(&stamp_path, &stamp_text)?;
    println!(
        "installed litellm {version} in {:.0} s; the venv holds {} MB ({})",
        started.elapsed().as_secs_f64(),
        dir_size(&venv) / 1_000_000,
        venv.display()
    );
    Ok(litellm)
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_size(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
