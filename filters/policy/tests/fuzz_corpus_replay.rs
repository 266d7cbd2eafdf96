//! Every input the fuzzers kept (`fuzz/corpus/<target>/`) is run again here,
//! on stable, through the same checks as the fuzz targets: the check code is
//! `fuzz/src/checks.rs`, compiled into this test as a module. A change that
//! breaks a property on an input the fuzzers already found interesting fails
//! `cargo test` without anyone running a fuzzer. See `fuzz/README.md`.
//!
//! It lives in sluice-policy because the checks need both crates and
//! sluice-policy depends on sluice-core.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/checks.rs"]
#[allow(dead_code)] // the per-target entry points are the fuzz targets'
mod checks;

use checks::Findings;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir/<target>/`, sorted; none when the directory is absent.
fn inputs(dir: &Path, target: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs each input of `dir/<target>/`; the number run, and the files that
/// failed their check.
fn replay(dir: &Path, target: &str, findings: Findings) -> (usize, Vec<String>) {
    let files = inputs(dir, target);
    let mut failed = Vec::new();
    for file in &files {
        let data = match std::fs::read(file) {
            Ok(data) => data,
            // A fuzzer running on the same corpus replaces files as it goes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", file.display()),
        };
        match std::panic::catch_unwind(|| checks::check_with(target, &data, findings)) {
            Ok(true) => {}
            Ok(false) => panic!("no check for target {target}"),
            Err(_) => failed.push(file.display().to_string()),
        }
    }
    (files.len(), failed)
}

/// Fails naming every input that failed (their panics are printed above).
fn assert_all_passed(failed: &[String]) {
    assert!(
        failed.is_empty(),
        "{} input(s) fail their check (replay one with \
         `cargo +nightly fuzz run -s none <target> <file>` from the repository root):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn every_corpus_input_passes_its_check() {
    let corpus = fuzz_dir().join("corpus");
    let mut failed = Vec::new();
    let mut total = 0;
    for target in checks::TARGETS {
        let (n, f) = replay(&corpus, target, Findings::Tolerate);
        assert!(n > 0, "the {target} corpus is empty or missing");
        total += n;
        failed.extend(f);
    }
    assert_all_passed(&failed);
    eprintln!("replayed {total} corpus inputs");
}

/// The inputs of open findings (`fuzz/findings/<target>/`, described in
/// `fuzz/README.md`) with every property asserted. The three found so far
/// are fixed and their inputs live in the corpus (`finding-*`); a new one
/// goes here, with an `#[ignore]`, until it is fixed.
#[test]
fn known_findings_are_fixed() {
    let dir = fuzz_dir().join("findings");
    let mut failed = Vec::new();
    for target in checks::TARGETS {
        failed.extend(replay(&dir, target, Findings::Assert).1);
    }
    assert_all_passed(&failed);
}

/// Finding 2 (fuzz/README.md): a body re-serialized by `rewrite_model` (or
/// `rewrite_body` when it edits the document) carries its floats as
/// serde_json read them, and serde_json's default float parser is not
/// correctly rounded. `7.444e108` goes upstream as `7.443999999999999e108`,
/// which is another number; Rust's own `f64` parser (correctly rounded)
/// tells them apart. The fuzz check cannot see this (it reads both bodies
/// with serde_json), hence a test of its own.
#[test]
fn rewrite_model_keeps_float_values() {
    let body = br#"{"model":"a","x":7.444e108}"#;
    let out = sluice_core::llm::rewrite_model(body, "b").unwrap();
    let out = String::from_utf8(out).unwrap();
    let x = out.split("\"x\":").nth(1).unwrap().trim_end_matches('}');
    assert_eq!(
        x.parse::<f64>().unwrap(),
        "7.444e108".parse::<f64>().unwrap(),
        "{out}"
    );
}

/// Finding 3 (fuzz/README.md): `backend = []` is accepted, where no
/// `backend` key is refused ("the policy declares no backend"): the check in
/// `compile.rs` looks for the key, not for an entry. The policy then names
/// `default_backend = ""`, which its own `sluice explain` output refuses.
#[test]
fn an_empty_backend_list_is_refused() {
    let toml = "backend = []\n\n[tokens]\n\n  [[tokens.quota]]\n  tokens = \"10k/min\"\n";
    let json = r#"{"backend":[],"tokens":{"quota":[{"tokens":"10k/min"}]}}"#;
    assert!(sluice_policy::parse_toml("p.toml", toml).is_err());
    assert!(sluice_policy::parse_json("p.json", json).is_err());
}

/// Finding 1 (fuzz/README.md): a `stream_options` key spelled with an escape
/// is not seen by `rewrite_body`'s splice path; the client's key comes after
/// the spliced one and wins, so `include_usage` stays false.
#[test]
fn an_escaped_stream_options_key_still_gets_include_usage() {
    let body = br#"{"stream_opti\u006fns":{"include_usage":false},"stream":true}"#;
    let edits = sluice_core::llm::Rewrite {
        include_usage: true,
        clamp: None,
    };
    let out = sluice_core::llm::rewrite_body(body, &edits).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        doc["stream_options"]["include_usage"],
        true,
        "{}",
        String::from_utf8_lossy(&out)
    );
}
