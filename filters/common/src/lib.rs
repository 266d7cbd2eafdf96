//! proxy-wasm glue shared by sluice's filters.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
