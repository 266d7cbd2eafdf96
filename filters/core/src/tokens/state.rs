//! The shared state: one small blob per tenant × model key, and the bounded
//! index that says which keys exist.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::QuotaId;
use crate::time::Timestamp;

/// A tenant × model key under one quota, as a 64-bit digest: stable across
/// workers and restarts, a fixed size in the index, and (being SHA-256) not
/// something a client can forge a collision for by choosing tenant names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub u64);

impl KeyId {
    /// The key of `tenant` asking for `model` under `quota`. The quota is
    /// part of the key: two rules matching the same pair (say by path) keep
    /// separate buckets.
    pub fn new(quota: QuotaId, tenant: &str, model: &str) -> Self {
        let mut h = Sha256::new();
        h.update(quota.0.to_le_bytes());
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        h.update(
            u64::try_from(tenant.len())
                .unwrap_or(u64::MAX)
                .to_le_bytes(),
        );
        h.update(tenant.as_bytes());
        h.update(model.as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        // 0 means "no owner" in a slot.
        KeyId(u64::from_le_bytes(first).max(1))
    }
}

/// One key's limiter state, as stored in shared data (rmp-serde, a few dozen
/// bytes; see the `bytes_per_key` test).
///
/// Every operation on it is a pure function of (state, now, request), so a
/// compare-and-swap that fails is simply re-applied to the fresh state: no
/// merge logic, and workers never double-count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The key this slot belongs to (0: none yet).
    pub(crate) owner: u64,
    /// Per token limit, in the quota's order: the instant (ns since the
    /// epoch) at which that bucket is full again.
    pub(crate) tokens: Vec<u64>,
    /// The same for the request-rate limit.
    pub(crate) requests: u64,
    /// Streams admitted and not yet released.
    pub(crate) streams: u32,
    /// Last reservation or settlement (ns since the epoch).
    pub(crate) touched: u64,
}

/// Whether a slot's state belongs to the key using it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is this key's state.
    Owned,
    /// The slot was empty and is now this key's.
    Fresh,
    /// Another key owns the slot (the index reassigned it since this worker
    /// looked): look the key up again rather than touch it.
    Taken,
}

impl KeyState {
    /// Checks, and for an empty slot sets, who owns this state.
    pub fn claim(&mut self, key: KeyId) -> Claim {
        if self.owner == key.0 {
            Claim::Owned
        } else if self.owner == 0 {
            *self = KeyState {
                owner: key.0,
                ..KeyState::default()
            };
            Claim::Fresh
        } else {
            Claim::Taken
        }
    }

    /// Hands the slot to `key` with a fresh state (after
    /// [`KeyIndex::assign`] evicted the previous owner).
    pub fn take_over(&mut self, key: KeyId) {
        *self = KeyState {
            owner: key.0,
            ..KeyState::default()
        };
    }

    /// The owner, if any.
    pub fn owner(&self) -> Option<KeyId> {
        (self.owner != 0).then_some(KeyId(self.owner))
    }

    /// Streams admitted and not yet released.
    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// Last reservation or settlement.
    pub fn touched(&self) -> Timestamp {
        Timestamp(self.touched)
    }
}

/// How stale an index entry's last-use time may get before
/// [`KeyIndex::touch`] asks for a write: idleness is judged to this
/// granularity, and a busy key costs one index write per minute at most.
pub const TOUCH_EVERY_SECS: u64 = 60;

/// Which keys have state, bounded by `max_keys`: key `i` of the index lives
/// in shared-data slot `i`, so the set of shared-data keys is bounded too
/// (proxy-wasm shared data has no delete). When full, the key idle the
/// longest gives up its slot.
///
/// Stored as one blob of about 15 bytes per key (a 64-bit key id and a
/// last-use time in seconds); lookups scan it, so a worker should cache
/// `KeyId → slot` and come back here only for keys it has not seen (and when
/// a slot's [`Claim`] says [`Claim::Taken`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIndex {
    /// Slot `i`: (key id, last use in seconds since the epoch).
    slots: Vec<(u64, u64)>,
}

/// Where a key lives, from [`KeyIndex::assign`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub slot: u32,
    /// The key was not in the index: its slot's state must be
    /// [taken over](KeyState::take_over).
    pub new: bool,
    /// The key that lost this slot to make room.
    pub evicted: Option<KeyId>,
}

impl KeyIndex {
    /// The slot of `key`, if it has one.
    pub fn slot_of(&self, key: KeyId) -> Option<u32> {
        self.slots
            .iter()
            .position(|&(k, _)| k == key.0)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Keys in the index.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot for `key`, giving it one if needed: a free slot while fewer
    /// than `max_keys` are used, else the slot of the key idle the longest.
    pub fn assign(&mut self, key: KeyId, now: Timestamp, max_keys: u32) -> Assignment {
        let secs = now.as_nanos() / 1_000_000_000;
        if let Some(slot) = self.slot_of(key) {
            self.touch(slot, now);
            return Assignment {
                slot,
                new: false,
                evicted: None,
            };
        }
        let max = usize::try_from(max_keys.max(1)).unwrap_or(usize::MAX);
        if self.slots.len() < max {
            self.slots.push((key.0, secs));
            return Assignment {
                slot: u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX),
                new: true,
                evicted: None,
            };
        }
        // Full (or shrunk by a new policy: slots beyond max_keys are left to
        // idle and are never handed out again).
        let idlest = self.slots[..max]
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(i, _)| i)
            .unwrap_or(0);
        let evicted = KeyId(self.slots[idlest].0);
        self.slots[idlest] = (key.0, secs);
        Assignment {
            slot: u32::try_from(idlest).unwrap_or(u32::MAX),
            new: true,
            evicted: Some(evicted),
        }
    }

    /// Records a use of `slot`; true when the stored time was older than
    /// [`TOUCH_EVERY_SECS`] and the index should be written back.
    pub fn touch(&mut self, slot: u32, now: Timestamp) -> bool {
        let secs = now.as_nanos() / 1_000_000_000;
        match self
            .slots
            .get_mut(usize::try_from(slot).unwrap_or(usize::MAX))
        {
            Some((_, used)) if secs >= used.saturating_add(TOUCH_EVERY_SECS) => {
                *used = secs;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        let q = QuotaId(0);
        assert_eq!(
            KeyId::new(q, "acme", "gpt-4o"),
            KeyId::new(q, "acme", "gpt-4o")
        );
        assert_ne!(
            KeyId::new(q, "acme", "gpt-4o"),
            KeyId::new(QuotaId(1), "acme", "gpt-4o")
        );
        assert_ne!(KeyId::new(q, "ab", "c"), KeyId::new(q, "a", "bc"));
    }

    #[test]
    fn index_evicts_the_idlest_key() {
        let mut index = KeyIndex::default();
        let keys: Vec<KeyId> = (0..3)
            .map(|i| KeyId::new(QuotaId(0), &format!("t{i}"), "m"))
            .collect();
        assert_eq!(index.assign(keys[0], t(100), 2).slot, 0);
        assert_eq!(index.assign(keys[1], t(200), 2).slot, 1);
        // keys[0] used again, later than keys[1].
        assert!(index.touch(0, t(300)));
        assert!(!index.touch(0, t(330)), "within the touch granularity");
        let a = index.assign(keys[2], t(400), 2);
        assert_eq!(
            a,
            Assignment {
                slot: 1,
                new: true,
                evicted: Some(keys[1])
            }
        );
        assert_eq!(index.len(), 2);
        assert_eq!(index.slot_of(keys[1]), None);
        assert_eq!(
            index.assign(keys[0], t(500), 2),
            Assignment {
                slot: 0,
                new: false,
                evicted: None
            }
        );
    }

    #[test]
    fn claims() {
        let a = KeyId(7);
        let b = KeyId(9);
        let mut s = KeyState::default();
        assert_eq!(s.claim(a), Claim::Fresh);
        s.streams = 3;
        assert_eq!(s.claim(a), Claim::Owned);
        assert_eq!(s.claim(b), Claim::Taken);
        assert_eq!(s.streams(), 3, "a taken slot is left alone");
        s.take_over(b);
        assert_eq!(s.owner(), Some(b));
        assert_eq!(s.streams(), 0);
    }
}
