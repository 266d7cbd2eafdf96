//! proxy-wasm glue shared by sluice's filters.
//!
//! The algorithms live in `sluice-core` and know nothing of proxy-wasm; this
//! crate is the thin layer that connects them to the host: the host clock,
//! shared data as a [`sluice_core::shared::SharedStore`], metrics, reading
//! the policy in `on_configure`, and a panic hook that logs before a VM dies.
//! Every filter uses these, so they behave the same in each.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod host;
pub mod identity;
pub mod metrics;
pub mod panic;

pub use config::load_policy;
pub use host::{HostStore, now};
pub use metrics::{Counter, Gauge, Histogram};
