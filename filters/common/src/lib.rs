//! The engine every sluice capability runs in, and its access to the host.
//!
//! The algorithms live in `sluice-core` and know nothing of proxy-wasm; this
//! crate connects them to Envoy:
//!
//! - [`engine`]: the one proxy-wasm filter — request context, admission,
//!   the response observed once, settlement — into which capabilities plug;
//! - [`host`]: every host call, none of which can panic;
//! - [`state`]: the one handle on cross-worker shared data;
//! - [`metrics`], [`config`] (the policy from `on_configure`) and [`panic`]
//!   (the logger and a panic hook that logs before a VM dies).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod engine;
pub mod host;
pub mod metrics;
pub mod panic;
pub mod state;

pub use config::load_policy;
pub use host::{HostStore, now};
pub use metrics::{Counter, Gauge, Histogram, label};
pub use state::STATE;
