//! The host's clock and shared data.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use sluice_core::shared::{SharedStore, StoreError, Versioned};
use sluice_core::time::{Timestamp, duration_nanos};

/// The host's current time (`proxy_get_current_time_nanoseconds`); the epoch
/// when the host refuses, which the algorithms treat as "no time passed".
pub fn now() -> Timestamp {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(Timestamp::ZERO, |d| {
            Timestamp::from_nanos(duration_nanos(d))
        })
}

/// Proxy-wasm shared data, process-wide per `vm_id`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Versioned, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => Ok(Versioned { value, cas }),
            Err(_) => Err(StoreError::Host),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}
