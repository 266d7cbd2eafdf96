//! `cargo xtask build`: the wasm filters and the native lab tools.

use crate::cmd;
use crate::workspace::Workspace;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// The wasm target the filters are built for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// Native tools the Envoy lab and the demo drive (package names).
pub const LAB_TOOLS: &[&str] = &["sluice-cli", "llm-sim", "sluice-loadgen"];

/// Makes sure the wasm target's standard library is installed.
///
/// `RUSTUP_AUTO_INSTALL=0` is set on the project's machines, so the target
/// listed in rust-toolchain.toml is not installed by itself: add it here.
pub fn ensure_wasm_target(ws: &Workspace) -> Result<()> {
    let mut list = cmd::command("rustup", ["target", "list", "--installed"]);
    list.current_dir(&ws.root);
    match cmd::stdout(&mut list) {
        Ok(installed) => {
            if installed.lines().any(|l| l.trim() == WASM_TARGET) {
                return Ok(());
            }
            let mut add = cmd::command("rustup", ["target", "add", WASM_TARGET]);
            add.current_dir(&ws.root);
            cmd::run(&mut add).context("installing the wasm target")
        }
        Err(err) => {
            // No rustup (a distro toolchain): accept it if the sysroot has the target.
            let sysroot = cmd::stdout(&mut cmd::command("rustc", ["--print", "sysroot"]))?;
            let lib = PathBuf::from(sysroot.trim())
                .join("lib/rustlib")
                .join(WASM_TARGET);
            if lib.is_dir() {
                Ok(())
            } else {
                bail!("the {WASM_TARGET} target is missing and rustup is unusable: {err:#}")
            }
        }
    }
}

/// Builds every filter for wasm in release, returning the `.wasm` paths.
pub fn build_filters(ws: &Workspace) -> Result<Vec<PathBuf>> {
    if ws.filters.is_empty() {
        bail!("no filter crate found (a member under filters/ with crate-type cdylib)");
    }
    ensure_wasm_target(ws)?;
    let mut build = cmd::cargo();
    build
        .current_dir(&ws.root)
        .args(["build", "--release", "--target", WASM_TARGET])
        .args(Workspace::package_args(
            ws.filters.iter().map(|f| f.package.as_str()),
        ));
    cmd::run(&mut build)?;
    let dir = ws.wasm_dir();
    ws.filters
        .iter()
        .map(|f| {
            let path = dir.join(&f.wasm_file);
            if path.is_file() {
                Ok(path)
            } else {
                bail!("{} was not produced by the build", path.display())
            }
        })
        .collect()
}

/// Builds the native tools the lab needs into `target/native/`.
pub fn build_lab_tools(ws: &Workspace) -> Result<()> {
    let mut build = cmd::cargo();
    build
        .current_dir(&ws.root)
        .args(["build", "--profile", "native"])
        .args(Workspace::package_args(LAB_TOOLS.iter().copied()));
    cmd::run(&mut build)
}

/// `cargo xtask build`.
pub fn build_all(ws: &Workspace) -> Result<Vec<PathBuf>> {
    let wasm = build_filters(ws)?;
    build_lab_tools(ws)?;
    println!("wasm filters ({}):", ws.wasm_dir().display());
    for path in &wasm {
        let size = std::fs::metadata(path)?.len();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        println!(
            "  {name:<28} {:>8.1} KiB  ({size} bytes)",
            size as f64 / 1024.0
        );
    }
    println!("native tools: {}", ws.native_dir().display());
    Ok(wasm)
}

/// `cargo xtask package`: builds sluice.wasm and the CLI, then runs
/// `sluice package` on it (into `target/oci/` unless `--out` is given).
pub fn package(ws: &Workspace, args: &[String]) -> Result<()> {
    build_all(ws)?;
    let cli = ws.native_dir().join("sluice");
    let mut package = cmd::command(&cli, ["package", "--wasm"]);
    package
        .current_dir(&ws.root)
        .arg(ws.wasm_dir().join("sluice.wasm"));
    if !args.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
        package.arg("--out").arg(ws.target_dir.join("oci"));
    }
    package.args(args);
    cmd::run(&mut package)
}
