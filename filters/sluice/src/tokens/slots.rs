//! Where a tenant × model key's buckets live in shared data.
//!
//! Shared data has no delete, so keys are slots: a bounded index
//! (`sluice_core::tokens::KeyIndex`, one shared blob) gives each key a slot
//! number, and the key's state lives under `sluice_tokens.slot.<n>`. Reading
//! the index is the expensive part (about 15 bytes per key), so each worker
//! caches key → slot and only goes back to the index for a key it has not
//! seen, for a slot another key took over, and once a minute per key to mark
//! it in use (the index evicts the idlest key when full).

use std::cell::RefCell;
use std::collections::HashMap;

use sluice_core::shared::UpdateError;
use sluice_core::time::Timestamp;
use sluice_core::tokens::{Claim, KeyId, KeyIndex, KeyState, TOUCH_EVERY_SECS};
use sluice_filter_common::STATE;

const INDEX_KEY: &str = "sluice_tokens.index";

fn slot_key(slot: u32) -> String {
    format!("sluice_tokens.slot.{slot}")
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("shared data: {0}")]
    Store(#[from] UpdateError),
    #[error("the key lost its slot twice in a row")]
    Churn,
}

pub struct Slots {
    max_keys: u32,
    /// key → (slot, last time this worker marked it used, in seconds).
    cache: RefCell<HashMap<KeyId, (u32, u64)>>,
}

impl Slots {
    pub fn new(max_keys: u32) -> Self {
        Self {
            max_keys,
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// Applies `change` to `key`'s state, finding or assigning its slot.
    /// Returns the slot and what `change` returned.
    pub fn update<R>(
        &self,
        key: KeyId,
        now: Timestamp,
        mut change: impl FnMut(&mut KeyState) -> R,
    ) -> Result<(u32, R), SlotError> {
        for _ in 0..2 {
            let (slot, fresh) = self.slot_for(key, now)?;
            let outcome = STATE.update(&slot_key(slot), |state: &mut KeyState| {
                if fresh {
                    // The index just gave us this slot: whatever is there
                    // belonged to the evicted key.
                    state.take_over(key);
                }
                match state.claim(key) {
                    Claim::Owned | Claim::Fresh => Some(change(state)),
                    Claim::Taken => None,
                }
            })?;
            match outcome {
                Some(result) => return Ok((slot, result)),
                // Another worker's index update gave the slot away: look again.
                None => {
                    self.cache.borrow_mut().remove(&key);
                }
            }
        }
        Err(SlotError::Churn)
    }

    /// Applies `change` to `key`'s state in a known slot; `None` when the key
    /// no longer owns it (evicted since).
    pub fn update_owned<R>(
        &self,
        slot: u32,
        key: KeyId,
        mut change: impl FnMut(&mut KeyState) -> R,
    ) -> Result<Option<R>, SlotError> {
        Ok(STATE.update(&slot_key(slot), |state: &mut KeyState| {
            (state.owner() == Some(key)).then(|| change(state))
        })?)
    }

    /// The slot of `key` and whether it was just assigned.
    fn slot_for(&self, key: KeyId, now: Timestamp) -> Result<(u32, bool), SlotError> {
        let secs = now.as_nanos() / 1_000_000_000;
        if let Some(&(slot, marked)) = self.cache.borrow().get(&key)
            && secs < marked.saturating_add(TOUCH_EVERY_SECS)
        {
            return Ok((slot, false));
        }
        let max_keys = self.max_keys;
        let assignment = STATE.update(INDEX_KEY, |index: &mut KeyIndex| {
            index.assign(key, now, max_keys)
        })?;
        let mut cache = self.cache.borrow_mut();
        // The cache holds at most what the index does (plus slack): keys
        // evicted from the index are forgotten here when it overflows.
        if cache.len()
            >= usize::try_from(max_keys)
                .unwrap_or(usize::MAX)
                .saturating_mul(2)
        {
            cache.clear();
        }
        cache.insert(key, (assignment.slot, secs));
        Ok((assignment.slot, assignment.new))
    }
}
