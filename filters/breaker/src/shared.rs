//! Circuit and bulkhead state in proxy-wasm shared data, written only when
//! it changed.
//!
//! `sluice_core::shared::update` always writes back, which is right for state
//! that changes on every call. A closed circuit in `consecutive` or `rate`
//! mode is *read* by nearly every admission and changed by few: writing it
//! back unchanged would make every worker's admission a compare-and-swap
//! that the others can invalidate. Here the value is decoded, changed on a
//! copy, and written (with the version it was read at) only when the copy
//! differs; a lost race re-reads and tries again, a bounded number of times.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_core::shared::{SharedStore, StoreError, UpdateError};
use sluice_filter_common::HostStore;

/// Compare-and-swap attempts before giving up (other workers kept winning).
const MAX_ATTEMPTS: u32 = 8;

/// Applies `change` to the state under `key`; returns what it returned on the
/// attempt that counted. A missing or undecodable value starts from
/// `T::default()`.
pub fn modify<T, R>(key: &str, mut change: impl FnMut(&mut T) -> R) -> Result<R, UpdateError>
where
    T: Serialize + DeserializeOwned + Default + PartialEq + Clone,
{
    let store = HostStore;
    for _ in 0..MAX_ATTEMPTS {
        let current = store.get(key).map_err(|_| UpdateError::Host)?;
        let before: T = current
            .value
            .as_deref()
            .and_then(|b| rmp_serde::from_slice(b).ok())
            .unwrap_or_default();
        let mut after = before.clone();
        let result = change(&mut after);
        if after == before && current.value.is_some() {
            return Ok(result);
        }
        let bytes = rmp_serde::to_vec(&after).map_err(|_| UpdateError::Host)?;
        match store.set(key, &bytes, current.cas) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contention {
        attempts: MAX_ATTEMPTS,
    })
}

/// Reads the state under `key` (`T::default()` when absent or unreadable).
pub fn read<T: DeserializeOwned + Default>(key: &str) -> T {
    sluice_core::shared::read(&HostStore, key).unwrap_or_default()
}
