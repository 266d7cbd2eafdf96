//! `istio-check [--schemas DIR] FILE...`: validates every document of each
//! YAML file against Istio's CRDs, prints each problem with its file and
//! document index, and exits 1 if there is any.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use istio_check::{Validator, default_schema_dir};

const USAGE: &str = "usage: istio-check [--schemas DIR] FILE...\n\
    Validates Istio manifests (multi-document YAML) against the Istio CRDs in DIR\n\
    (default: $SLUICE_ISTIO_SCHEMAS, else shared/istio beside the repository).";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("istio-check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let mut schemas = None;
    let mut files = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--schemas") => {
                schemas = Some(PathBuf::from(args.next().context("--schemas needs a DIR")?));
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(true);
            }
            Some(flag) if flag.starts_with('-') => bail!("unknown option {flag}\n{USAGE}"),
            _ => files.push(PathBuf::from(arg)),
        }
    }
    if files.is_empty() {
        bail!("no FILE given\n{USAGE}");
    }
    let dir = match schemas {
        Some(dir) => dir,
        None => default_schema_dir()?,
    };
    let validator = Validator::load(&dir)?;
    let mut clean = true;
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (i, result) in validator.validate_yaml_documents(&text).iter().enumerate() {
            if let Err(problems) = result {
                clean = false;
                for problem in problems {
                    println!("{}#{i}: {problem}", file.display());
                }
            }
        }
    }
    Ok(clean)
}
