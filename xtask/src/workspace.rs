//! What the workspace holds, read from `cargo metadata` so that a new filter
//! crate is picked up without editing xtask.

use crate::cmd;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A workspace member that builds a `.wasm` filter.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The package name (`sluice-probe`).
    pub package: String,
    /// The file name cargo gives the module (`sluice_probe.wasm`).
    pub wasm_file: String,
}

/// The parts of the workspace xtask drives.
#[derive(Debug)]
pub struct Workspace {
    /// The workspace root (where the root Cargo.toml is).
    pub root: PathBuf,
    /// Cargo's target directory (honours `CARGO_TARGET_DIR`).
    pub target_dir: PathBuf,
    /// Members under `filters/` with a `cdylib` library target.
    pub filters: Vec<Filter>,
    /// Every member under `filters/` (the crates that must also build for wasm).
    pub filter_dir_packages: Vec<String>,
    /// Names of all workspace members.
    pub members: Vec<String>,
}

impl Workspace {
    /// Reads the workspace layout with `cargo metadata --no-deps`.
    pub fn load() -> Result<Self> {
        let text = cmd::stdout(cmd::cargo().args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ]))
        .or_else(|_| {
            cmd::stdout(cmd::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))
        })?;
        let meta: Value = serde_json::from_str(&text).context("parsing cargo metadata")?;
        let root = PathBuf::from(
            meta["workspace_root"]
                .as_str()
                .context("cargo metadata has no workspace_root")?,
        );
        let target_dir = PathBuf::from(
            meta["target_directory"]
                .as_str()
                .context("cargo metadata has no target_directory")?,
        );
        let filters_dir = root.join("filters");
        let mut filters = Vec::new();
        let mut filter_dir_packages = Vec::new();
        let mut members = Vec::new();
        for pkg in meta["packages"].as_array().into_iter().flatten() {
            let name = pkg["name"].as_str().unwrap_or_default().to_owned();
            let manifest = Path::new(pkg["manifest_path"].as_str().unwrap_or_default());
            members.push(name.clone());
            if !manifest.starts_with(&filters_dir) {
                continue;
            }
            filter_dir_packages.push(name.clone());
            for target in pkg["targets"].as_array().into_iter().flatten() {
                let is_cdylib = target["crate_types"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t == "cdylib");
                if is_cdylib {
                    let lib = target["name"].as_str().unwrap_or(&name).replace('-', "_");
                    filters.push(Filter {
                        package: name.clone(),
                        wasm_file: format!("{lib}.wasm"),
                    });
                }
            }
        }
        filters.sort_by(|a, b| a.package.cmp(&b.package));
        filter_dir_packages.sort();
        Ok(Self {
            root,
            target_dir,
            filters,
            filter_dir_packages,
            members,
        })
    }

    /// Where the release `.wasm` filters land.
    pub fn wasm_dir(&self) -> PathBuf {
        self.target_dir.join("wasm32-wasip1").join("release")
    }

    /// Where the native tools (`--profile native`) land.
    pub fn native_dir(&self) -> PathBuf {
        self.target_dir.join("native")
    }

    /// The lab's Python virtual environment.
    pub fn venv_dir(&self) -> PathBuf {
        self.target_dir.join("lab-venv")
    }

    /// `-p NAME` for each package.
    pub fn package_args<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        names
            .into_iter()
            .flat_map(|n| ["-p".to_owned(), n.to_owned()])
            .collect()
    }

    /// Whether `name` is a workspace member.
    pub fn has_member(&self, name: &str) -> bool {
        self.members.iter().any(|m| m == name)
    }
}
