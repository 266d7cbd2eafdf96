//! Cross-worker state through proxy-wasm shared data.
//!
//! Every capability reads and changes shared state through [`STATE`], the
//! one [`SharedState`] handle over the host's store: one retry bound, one
//! behaviour under contention, documented in `sluice_core::shared`.

use sluice_core::shared::SharedState;

use crate::host::HostStore;

/// The VM's handle on shared data (process-wide per `vm_id`).
pub const STATE: SharedState<HostStore> = SharedState::new(HostStore);
