//! Configurations the token tests build on.
#![allow(dead_code, clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::Duration;

use sluice_core::config::{
    LargeBody, Match, OverCap, Pattern, Quota, StateErrorPolicy, TokensConfig,
};
use sluice_core::units::{ByteSize, Rate};

pub fn rate(amount: u64, secs: u64) -> Rate {
    Rate {
        amount,
        period: Duration::from_secs(secs),
    }
}

pub fn quota(tokens: Vec<Rate>) -> Quota {
    Quota {
        name: None,
        matcher: Match::default(),
        tokens,
        requests: None,
        concurrent_streams: None,
        max_completion_tokens: None,
        over_cap: OverCap::Reject,
        burst: None,
    }
}

pub fn config(quotas: Vec<Quota>) -> TokensConfig {
    TokensConfig {
        chars_per_token: 4.0,
        model_chars_per_token: vec![(Pattern::new("claude-*"), 3.5)],
        default_max_tokens: NonZeroU32::new(1024).unwrap(),
        max_body: ByteSize(1 << 20),
        on_large_body: LargeBody::Reject,
        include_usage: true,
        ietf_headers: true,
        max_keys: NonZeroU32::new(10_000).unwrap(),
        on_state_error: StateErrorPolicy::Deny,
        quotas,
    }
}
