//! Where a tenant × model key's buckets live in shared data.
//!
//! Keys live in a fixed table of slots, `sluice_tokens.slot.<n>` for
//! `n < max_keys` (`sluice_tokens.named.<n>` for tenants the policy names),
//! each key in one of its few probe slots; a key whose slots are all busy
//! uses its rule's `sluice_tokens.overflow.<rule>` state
//! (`sluice_core::tokens::state` explains why only keys at rest lose their
//! slot). Each worker caches key → slot, so a known key costs one read and
//! one write of its own slot, and only a key it has not seen (or one that
//! lost its slot) reads its probe slots.

use std::cell::RefCell;
use std::collections::HashMap;

use sluice_core::shared::UpdateError;
use sluice_core::time::Timestamp;
use sluice_core::tokens::{Claim, KeyId, KeyState, SlotChoice, choose_slot, probe_slots};
use sluice_filter_common::STATE;

/// Which table a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Region {
    /// Every identity the policy does not name.
    Open,
    /// Tenants the policy names exactly: no other identity enters.
    Named,
}

/// Where a key's state is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    Slot(Region, u32),
    /// The rule's overflow state (its identity).
    Overflow(u64),
}

impl Place {
    fn key(self) -> String {
        match self {
            Place::Slot(Region::Open, n) => format!("sluice_tokens.slot.{n}"),
            Place::Slot(Region::Named, n) => format!("sluice_tokens.named.{n}"),
            Place::Overflow(rule) => format!("sluice_tokens.overflow.{rule:016x}"),
        }
    }
}

/// A key's state as it was found: where, and which owner it is kept under
/// (the key itself, or the rule's overflow owner).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub place: Place,
    pub owner: KeyId,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("shared data: {0}")]
    Store(#[from] UpdateError),
}

pub struct Slots {
    open: u32,
    named: u32,
    /// key → its slot, as this worker last found it.
    cache: RefCell<HashMap<KeyId, Place>>,
}

impl Slots {
    /// Tables of `open` and `named` slots.
    pub fn new(open: u32, named: u32) -> Self {
        Self {
            open: open.max(1),
            named: named.max(1),
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// Applies `change` to `key`'s state (finding or taking its slot, else
    /// its rule's overflow state); returns where it was and what `change`
    /// returned.
    pub fn update<R>(
        &self,
        key: KeyId,
        rule: u64,
        region: Region,
        now: Timestamp,
        mut change: impl FnMut(&mut KeyState) -> R,
    ) -> Result<(Held, R), SlotError> {
        let cached = self.cache.borrow().get(&key).copied();
        if let Some(place) = cached {
            if let Some(r) = claim_and_change(place, key, now, &mut change)? {
                return Ok((Held { place, owner: key }, r));
            }
            // Lost its slot (it was at rest, and another key took it).
            self.cache.borrow_mut().remove(&key);
        }
        let size = match region {
            Region::Open => self.open,
            Region::Named => self.named,
        };
        let slots = probe_slots(key, size);
        // Two passes: a race lost to another worker taking the same free
        // slot is answered by looking again.
        for _ in 0..2 {
            let mut states = Vec::with_capacity(slots.len());
            for &n in &slots {
                states.push(STATE.read::<KeyState>(&Place::Slot(region, n).key())?);
            }
            let index = match choose_slot(key, &states, now) {
                SlotChoice::Owned(i) | SlotChoice::Free(i) => i,
                SlotChoice::Full => break,
            };
            let Some(&n) = slots.get(index) else {
                break;
            };
            let place = Place::Slot(region, n);
            if let Some(r) = claim_and_change(place, key, now, &mut change)? {
                self.remember(key, place);
                return Ok((Held { place, owner: key }, r));
            }
        }
        let place = Place::Overflow(rule);
        let owner = KeyId::overflow(rule);
        let r = STATE.update(&place.key(), |state: &mut KeyState| {
            // The overflow state always belongs to its rule.
            if state.owner() != Some(owner) {
                *state = KeyState::default();
                let _ = state.claim(owner, now);
            }
            change(state)
        })?;
        Ok((Held { place, owner }, r))
    }

    /// Applies `change` to the state `held` names, if its owner still has
    /// it; `None` when the key lost its slot since (it was then at rest:
    /// nothing was owed).
    pub fn update_held<R>(
        &self,
        held: Held,
        change: impl FnMut(&mut KeyState) -> R,
    ) -> Result<Option<R>, SlotError> {
        let mut change = change;
        Ok(STATE.update(&held.place.key(), |state: &mut KeyState| {
            (state.owner() == Some(held.owner)).then(|| change(state))
        })?)
    }

    fn remember(&self, key: KeyId, place: Place) {
        let mut cache = self.cache.borrow_mut();
        // At most what the tables hold (plus slack): a flood of keys this
        // worker saw once is forgotten when it overflows.
        let bound = usize::try_from(self.open.saturating_add(self.named))
            .unwrap_or(usize::MAX)
            .saturating_mul(2);
        if cache.len() >= bound {
            cache.clear();
        }
        cache.insert(key, place);
    }
}

/// Claims `place` for `key` (its own, empty, or at rest) and applies
/// `change`; `None` when another key holds it.
fn claim_and_change<R>(
    place: Place,
    key: KeyId,
    now: Timestamp,
    change: &mut impl FnMut(&mut KeyState) -> R,
) -> Result<Option<R>, SlotError> {
    Ok(STATE.modify(&place.key(), |state: &mut KeyState| {
        match state.claim(key, now) {
            Claim::Owned | Claim::Fresh => Some(change(state)),
            Claim::Taken => None,
        }
    })?)
}
