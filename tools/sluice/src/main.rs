//! `sluice`: validate, explain and render sluice policies.
//!
//! Exit codes: 0 success, 1 an invalid policy (or a failed render), 2 a usage
//! error (clap's convention).

mod package;
mod render;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_policy::{Diagnostics, Format, Policy, explain};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Validate, explain and render sluice policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check policy files; print every error with file, line and column.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the effective policy (every default filled in) and what it does.
    Explain { file: PathBuf },
    /// Render the configuration a policy needs.
    Render {
        #[command(subcommand)]
        target: RenderTarget,
    },
    /// Write sluice.wasm as OCI image layouts (Wasm artifact and Docker-compat
    /// variants) and print their digests.
    Package(package::PackageArgs),
    /// Print the tenant id of an API key read from standard input
    /// (`key-` and 16 hex digits), to name it in `[tenant.names]`.
    HashKey,
}

#[derive(Subcommand)]
enum RenderTarget {
    /// A complete Envoy v3 bootstrap (YAML) for a local Envoy.
    Envoy(render::EnvoyArgs),
    /// Istio resources: the EnvoyFilter that loads sluice.wasm from an OCI
    /// image or URL, and a ServiceEntry and DestinationRule per backend
    /// cluster (multi-document YAML).
    Istio(Box<render::IstioArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Explain { file } => explain_file(&file),
        Command::Render {
            target: RenderTarget::Envoy(args),
        } => render::envoy(&args),
        Command::Render {
            target: RenderTarget::Istio(args),
        } => render::istio(&args),
        Command::Package(args) => package::package(&args),
        Command::HashKey => hash_key(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Reads and parses a policy file; `Ok(Err(_))` is an invalid policy,
/// including a file that is not UTF-8 (located at its first bad byte).
pub fn load(path: &Path) -> anyhow::Result<(Result<Policy, Diagnostics>, String)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let format = format_of(path);
    let parsed = sluice_policy::parse_bytes(&path.display().to_string(), &bytes, format);
    // Exact when the policy is valid, which is when the text is used.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok((parsed, text))
}

/// The syntax of a policy file, by its extension: `.json` is JSON, anything
/// else TOML.
pub fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        _ => Format::Toml,
    }
}

fn report(diagnostics: &Diagnostics) {
    eprint!("{}", diagnostics.render(std::io::stderr().is_terminal()));
}

fn validate(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    for file in files {
        match load(file)?.0 {
            Ok(_) => println!("{}: ok", file.display()),
            Err(d) => {
                report(&d);
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn explain_file(file: &Path) -> anyhow::Result<ExitCode> {
    let policy = match load(file)?.0 {
        Ok(p) => p,
        Err(d) => {
            report(&d);
            return Ok(ExitCode::from(1));
        }
    };
    println!("# {}: what this policy does\n#", file.display());
    for line in explain::summary(&policy) {
        println!("# - {line}");
    }
    println!("#\n# The effective policy, every default filled in:\n");
    print!(
        "{}",
        explain::effective_toml(&policy).context("cannot print the effective policy")?
    );
    Ok(ExitCode::SUCCESS)
}

fn hash_key() -> anyhow::Result<ExitCode> {
    let mut key = String::new();
    std::io::stdin()
        .read_to_string(&mut key)
        .context("cannot read the key from standard input")?;
    let key = key.trim();
    if key.is_empty() {
        anyhow::bail!("no key on standard input");
    }
    println!("{}", sluice_core::tenant::api_key_tenant(key));
    Ok(ExitCode::SUCCESS)
}
