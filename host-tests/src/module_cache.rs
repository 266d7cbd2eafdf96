//! Finding a filter's `.wasm` and compiling it once per test run.
//!
//! Compiling a module with cranelift takes ~0.7 s even with the optimised
//! compiler crates; hundreds of tests cannot pay that each. A module is
//! compiled once per process (kept in a process-wide map; `Module` is a cheap
//! `Arc` clone) and also precompiled to `<target>/sluice-host-cache/` keyed by
//! a hash of the wasm bytes and the engine's compatibility hash, so the next
//! test binary loads it with `Module::deserialize_file` in well under a
//! millisecond.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context as _, anyhow};
use wasmtime::{Config, Engine, Module};

/// The engine every module and store of the process uses.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = Config::new();
        Engine::new(&config).unwrap_or_else(|e| panic!("wasmtime engine: {e}"))
    })
}

/// The workspace root (two levels up from this crate's manifest).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The target directory cargo builds into (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path of a filter's `.wasm`, by crate name (`sluice-probe` or `sluice_probe`).
///
/// Looks in `$SLUICE_WASM_DIR`, then `$CARGO_TARGET_DIR/wasm32-wasip1/release`,
/// then `<workspace>/target/wasm32-wasip1/release`. Fails with a message that
/// says how to build it.
pub fn locate_filter(crate_name: &str) -> anyhow::Result<PathBuf> {
    let file = format!("{}.wasm", crate_name.replace('-', "_"));
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("SLUICE_WASM_DIR") {
        candidates.push(PathBuf::from(dir).join(&file));
    }
    candidates.push(target_dir().join("wasm32-wasip1/release").join(&file));
    candidates.push(
        workspace_root()
            .join("target/wasm32-wasip1/release")
            .join(&file),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "filter module {file} not found (looked in: {}).\n\
             Build the filters first: `cargo xtask build` \
             (or `cargo build --release --target wasm32-wasip1 -p {crate_name}`), \
             or point SLUICE_WASM_DIR at a directory holding {file}.",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// A compiled filter module, cheap to clone.
#[derive(Clone)]
pub struct FilterModule {
    pub(crate) module: Module,
    /// Where it came from (for messages).
    pub name: String,
}

impl std::fmt::Debug for FilterModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilterModule({})", self.name)
    }
}

impl FilterModule {
    /// Loads a filter by crate name (see [`locate_filter`]), compiled once per process.
    pub fn load(crate_name: &str) -> anyhow::Result<Self> {
        let path = locate_filter(crate_name)?;
        Self::from_file(&path)
    }

    /// Loads a `.wasm` file, compiled once per process and cached on disk.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        static CACHE: OnceLock<Mutex<HashMap<(PathBuf, u64), Module>>> = OnceLock::new();
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let hash = content_hash(&bytes);
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cache = CACHE.get_or_init(Default::default);
        // Holding the lock while compiling makes parallel tests wait for one
        // compilation instead of all compiling the same module.
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = cache.get(&(path.to_path_buf(), hash)) {
            return Ok(Self {
                module: module.clone(),
                name,
            });
        }
        let module = load_or_precompile(&bytes, hash, &name)?;
        cache.insert((path.to_path_buf(), hash), module.clone());
        Ok(Self { module, name })
    }

    /// Compiles from bytes without any cache (for benchmarks of compilation).
    pub fn compile_uncached(bytes: &[u8], name: &str) -> anyhow::Result<Self> {
        let module = Module::new(engine(), bytes).map_err(|e| anyhow!("compiling {name}: {e}"))?;
        Ok(Self {
            module,
            name: name.to_owned(),
        })
    }

    /// Names of the functions the module imports, as `module.name`.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect()
    }

    /// Names of the module's exports.
    pub fn exports(&self) -> Vec<String> {
        self.module.exports().map(|e| e.name().to_owned()).collect()
    }
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    engine().precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

/// Where precompiled modules are kept.
pub fn precompiled_dir() -> PathBuf {
    target_dir().join("sluice-host-cache")
}

fn load_or_precompile(bytes: &[u8], hash: u64, name: &str) -> anyhow::Result<Module> {
    let dir = precompiled_dir();
    let file = dir.join(format!("{name}-{hash:016x}.cwasm"));
    if file.is_file() {
        // SAFETY: the file was written by `Module::serialize` of an engine with
        // the same compatibility hash (it is part of the file name) in this
        // target directory; nothing else writes there.
        match unsafe { Module::deserialize_file(engine(), &file) } {
            Ok(module) => return Ok(module),
            Err(e) => log::warn!("ignoring stale precompiled module {}: {e}", file.display()),
        }
    }
    let module = Module::new(engine(), bytes).map_err(|e| anyhow!("compiling {name}: {e}"))?;
    if let Ok(serialized) = module.serialize() {
        // Best effort: write to a temporary name, then rename atomically.
        let _ = std::fs::create_dir_all(&dir);
        let tmp = dir.join(format!("{name}-{hash:016x}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, serialized).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    Ok(module)
}
