//! sluice-core: the algorithms behind sluice's filters.
//!
//! Nothing here knows about proxy-wasm or reads a clock: every decision takes
//! the current time as an argument, so the same code runs in a filter, in the
//! CLI's simulator and in tests with a fake clock.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod breaker;
pub mod config;
pub mod draw;
pub mod failover;
pub mod llm;
pub mod outcome;
pub mod outlier;
pub mod retry;
pub mod shared;
pub mod tenant;
pub mod time;
pub mod tokens;
pub mod units;
pub mod window;
