//! `sluice.wasm`: every capability a sluice policy enables, in one
//! proxy-wasm filter.
//!
//! The engine (`sluice_filter_common::engine`) owns the filter: identity,
//! routing, the one body parse, the response observed once, shared state.
//! This crate lists the capabilities and, for each, implements the engine's
//! hooks over its algorithm in `sluice-core`. Their order is the order of
//! admission: the token limiter first (a request over quota never takes a
//! bulkhead slot), then the breaker (an open circuit answers before the
//! upstream is called; the tokens reserved for it are refunded when the
//! request is done), then zone failover, which picks the request's zone,
//! then outlier detection, which picks the endpoint within that zone for a
//! request every earlier capability let go (a refused request takes no
//! endpoint's load), and last the retry budget, which bounds the router's
//! retries over the endpoints the outlier capability named.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod breaker;
pub mod failover;
pub mod outlier;
pub mod retry;
pub mod tokens;

use sluice_core::config::Policy;
use sluice_filter_common::engine::{self, Capability};

proxy_wasm::main! {{
    engine::start("sluice", capabilities);
}}

/// The capabilities `policy` enables, in admission order.
pub fn capabilities(policy: &Policy) -> Vec<Box<dyn Capability>> {
    let mut caps: Vec<Box<dyn Capability>> = Vec::new();
    if let Some(tokens) = tokens::Tokens::from_policy(policy) {
        caps.push(Box::new(tokens));
    }
    if let Some(breaker) = breaker::Breaker::from_policy(policy) {
        caps.push(Box::new(breaker));
    }
    if let Some(failover) = failover::Failover::from_policy(policy) {
        caps.push(Box::new(failover));
    }
    if let Some(outlier) = outlier::Outlier::from_policy(policy) {
        caps.push(Box::new(outlier));
    }
    if let Some(retry) = retry::Retry::from_policy(policy) {
        caps.push(Box::new(retry));
    }
    caps
}
