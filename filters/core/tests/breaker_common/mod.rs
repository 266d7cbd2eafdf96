//! Configurations and a clock shared by the breaker tests.
#![allow(dead_code)]

use std::num::NonZeroU32;
use std::time::Duration;

use sluice_core::config::{
    BreakerConfig, BreakerMode, BreakerScope, BulkheadConfig, DegradeAction, DegradeConfig,
    FailureKind, TenantLimit, Window,
};
use sluice_core::time::Timestamp;
use sluice_core::units::Ratio;

pub fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A timestamp `s` seconds after an arbitrary, realistic origin.
pub fn at(s: f64) -> Timestamp {
    let nanos = 1_800_000_000_000_000_000i128 + (s * 1e9).round() as i128;
    Timestamp::from_nanos(nanos.clamp(0, i128::from(u64::MAX)) as u64)
}

pub fn bulkhead() -> BulkheadConfig {
    BulkheadConfig {
        max_in_flight: nz(1024),
        max_in_flight_per_tenant: None,
        tenants: vec![],
        queue: 0,
        max_wait: Duration::ZERO,
    }
}

pub fn bulkhead_with(
    max: u32,
    per_tenant: Option<u32>,
    queue: u32,
    max_wait: Duration,
) -> BulkheadConfig {
    BulkheadConfig {
        max_in_flight: nz(max),
        max_in_flight_per_tenant: per_tenant.map(nz),
        tenants: vec![TenantLimit {
            tenant: "batch".to_string(),
            max_in_flight: nz(1),
        }],
        queue,
        max_wait,
    }
}

/// A breaker with the README's defaults and `mode`; no jitter unless set.
pub fn breaker(mode: BreakerMode) -> BreakerConfig {
    BreakerConfig {
        mode,
        scope: BreakerScope::BackendModel,
        failure_on: vec![
            FailureKind::Status5xx,
            FailureKind::Reset,
            FailureKind::ConnectFailure,
            FailureKind::Timeout,
        ],
        slow_ttft: secs(10),
        slow_tpot: Duration::from_millis(200),
        open_for: secs(30),
        max_open_for: secs(300),
        backoff: 2.0,
        jitter: Ratio::percent(0),
        half_open_probes: nz(3),
        bulkhead: bulkhead(),
        degrade: DegradeConfig {
            action: DegradeAction::FailFast,
            retry_after: secs(5),
        },
    }
}

pub fn consecutive(n: u32) -> BreakerConfig {
    breaker(BreakerMode::Consecutive { failures: nz(n) })
}

pub fn rate(window: Window, min_calls: u32, failure: u8, slow: u8) -> BreakerConfig {
    breaker(BreakerMode::Rate {
        window,
        min_calls: nz(min_calls),
        failure_rate: Ratio::percent(failure),
        slow_rate: Ratio::percent(slow),
    })
}

pub fn adaptive(k: f64, window: Duration, max_reject: u8) -> BreakerConfig {
    breaker(BreakerMode::Adaptive {
        k,
        window,
        max_reject: Ratio::percent(max_reject),
    })
}
