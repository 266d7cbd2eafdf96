//! sluice-loadgen: drives OpenAI-shaped chat completions at a proxy and
//! records what each client saw, for chaos drills.
//!
//! Latency is measured from when a request was *due*, not from when it was
//! sent: in the open loop a slow phase of the server makes later requests
//! wait, and that wait is part of what a user sees. A generator that only
//! sends when it is ready (or stops sending while the server stalls) drops
//! exactly the samples that show the stall; this one keeps them.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod client;
pub mod config;
pub mod record;
pub mod run;
pub mod sse;
pub mod summary;

pub use config::{Args, Config, ConfigError, Mode, Tenant};
pub use record::{ErrorKind, Outcome, Record};
pub use run::run;
pub use summary::Summary;
