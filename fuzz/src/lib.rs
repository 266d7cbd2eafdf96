//! sluice's fuzz targets: the checks live in [`checks`], shared with the
//! corpus replay test that `cargo test` runs on stable
//! (`filters/policy/tests/fuzz_corpus_replay.rs`).

pub mod checks;
