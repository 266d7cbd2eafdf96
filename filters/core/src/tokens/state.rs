//! The shared state: one small blob per tenant × model key, in a bounded
//! table of slots where only a key at rest can lose its place.
//!
//! # Why keys live in probed slots
//!
//! Proxy-wasm shared data cannot delete a key, so the keys a filter writes
//! must be bounded: tenant × model keys live in a fixed table of slots, and
//! a new key must sometimes take the slot of an old one. Two rules make
//! that safe against a client inventing identities:
//!
//! - **Only a key at rest is replaced** ([`KeyState::at_rest`]): every
//!   bucket full again, no stream in flight. Such a state is exactly what a
//!   fresh key starts with, so replacing it loses nothing: a tenant that
//!   comes back finds the same allowance it would have found in its slot. A
//!   key still in debt, or waiting for its buckets to refill, is never
//!   replaced, so a flood of new identities cannot reset anyone's limits.
//! - **A key has few places** ([`probe_slots`], [`PROBES`] slots picked by
//!   hashing), found without a shared index: there is no blob every new
//!   key must rewrite (the compare-and-swap hot spot a flood of keys used
//!   to turn into admitting without limit), and a worker reads only its own
//!   key's slots. When all of a new key's places are busy, it is served by
//!   its rule's **overflow** state ([`KeyId::overflow`]), shared by every
//!   key without a place: bounded, and limited like any key.
//!
//! Tenants the policy names exactly get a region of slots of their own,
//! which other identities cannot enter: a flood can neither take their
//! places nor push them into the overflow.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::limiter::STREAM_LEASE;
use crate::time::Timestamp;

/// Slots a key may live in (the table's probe length).
pub const PROBES: usize = 4;

/// A tenant × model key under one quota rule, as a 64-bit digest: stable
/// across workers, restarts and reloads that keep the rule, a fixed size
/// in a slot, and (being SHA-256) not something a client can forge a
/// collision for by choosing tenant names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub u64);

impl KeyId {
    /// The key of `tenant` asking for `model` under the rule whose stable
    /// identity is `rule` (`Quota::identity`, not its position: reordering
    /// rules keeps every bucket). Two rules matching the same pair keep
    /// separate buckets.
    pub fn new(rule: u64, tenant: &str, model: &str) -> Self {
        let mut h = Sha256::new();
        h.update(rule.to_le_bytes());
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        h.update(
            u64::try_from(tenant.len())
                .unwrap_or(u64::MAX)
                .to_le_bytes(),
        );
        h.update(tenant.as_bytes());
        h.update(model.as_bytes());
        Self::from_digest(&h.finalize())
    }

    /// The owner of rule `rule`'s overflow state: the keys that found no
    /// place of their own share it.
    pub fn overflow(rule: u64) -> Self {
        let mut h = Sha256::new();
        h.update(b"sluice overflow");
        h.update(rule.to_le_bytes());
        Self::from_digest(&h.finalize())
    }

    fn from_digest(digest: &[u8]) -> Self {
        let mut first = [0u8; 8];
        if let Some(bytes) = digest.get(..8) {
            first.copy_from_slice(bytes);
        }
        // 0 means "no owner" in a slot.
        KeyId(u64::from_le_bytes(first).max(1))
    }
}

/// The [`PROBES`] slots (fewer in a smaller table) where `key` may live in a
/// table of `size` slots, in the order to try them (double hashing: a fixed
/// start and step per key, so two keys that collide once part ways).
pub fn probe_slots(key: KeyId, size: u32) -> Vec<u32> {
    let size = u64::from(size.max(1));
    let start = key.0 % size;
    // A step sharing a factor with the size can come back to a slot
    // already listed: the next slot is taken instead, so the slots stay
    // distinct.
    let step = if size > 1 {
        1 + (key.0 >> 32) % (size - 1)
    } else {
        1
    };
    let count = usize::try_from(size).unwrap_or(PROBES).min(PROBES);
    let mut slots: Vec<u32> = Vec::with_capacity(count);
    let mut at = start;
    while slots.len() < count {
        let slot = u32::try_from(at).unwrap_or(0);
        if slots.contains(&slot) {
            at = (at + 1) % size;
            continue;
        }
        slots.push(slot);
        at = (at + step) % size;
    }
    slots
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
    /// Requests admitted and not yet settled (what `concurrent_streams`
    /// limits, when the rule sets it).
    pub(crate) streams: u32,
    /// Last reservation or settlement (ns since the epoch).
    pub(crate) touched: u64,
}

/// Whether a slot's state can serve the key asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is this key's state.
    Owned,
    /// The slot was empty, or its owner was at rest: it is now this key's,
    /// with the full allowance the previous owner had too.
    Fresh,
    /// Another key owns it and is not at rest: leave it alone.
    Taken,
}

/// Where a key's state is among its probe slots (see [`choose_slot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChoice {
    /// The key owns the slot at this index.
    Owned(usize),
    /// The key owns none; the slot at this index is free (or at rest).
    Free(usize),
    /// Every slot belongs to another key that is not at rest.
    Full,
}

/// The choice for `key` given its probe slots' states (in probe order): its
/// own slot wherever it is, else the first free one.
pub fn choose_slot(key: KeyId, states: &[KeyState], now: Timestamp) -> SlotChoice {
    if let Some(i) = states.iter().position(|s| s.owner == key.0) {
        return SlotChoice::Owned(i);
    }
    match states.iter().position(|s| s.at_rest(now)) {
        Some(i) => SlotChoice::Free(i),
        None => SlotChoice::Full,
    }
}

impl KeyState {
    /// Whether the state is what a fresh key would have: no owner, or every
    /// bucket full again and no stream in flight (streams of a key silent
    /// for [`STREAM_LEASE`] count as leaked, as the limiter treats them).
    pub fn at_rest(&self, now: Timestamp) -> bool {
        let t = now.as_nanos();
        let streams_done = self.streams == 0 || now.since(Timestamp(self.touched)) > STREAM_LEASE;
        self.owner == 0
            || (streams_done && self.requests <= t && self.tokens.iter().all(|&b| b <= t))
    }

    /// Checks, and for an empty slot or one at rest takes, who owns this
    /// state.
    pub fn claim(&mut self, key: KeyId, now: Timestamp) -> Claim {
        if self.owner == key.0 {
            Claim::Owned
        } else if self.at_rest(now) {
            *self = KeyState {
                owner: key.0,
                ..KeyState::default()
            };
            Claim::Fresh
        } else {
            Claim::Taken
        }
    }

    /// The owner, if any.
    pub fn owner(&self) -> Option<KeyId> {
        (self.owner != 0).then_some(KeyId(self.owner))
    }

    /// Requests admitted and not yet settled.
    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// Last reservation or settlement.
    pub fn touched(&self) -> Timestamp {
        Timestamp(self.touched)
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
        assert_eq!(
            KeyId::new(7, "acme", "gpt-4o"),
            KeyId::new(7, "acme", "gpt-4o")
        );
        assert_ne!(
            KeyId::new(7, "acme", "gpt-4o"),
            KeyId::new(8, "acme", "gpt-4o")
        );
        assert_ne!(KeyId::new(7, "ab", "c"), KeyId::new(7, "a", "bc"));
        assert_ne!(KeyId::overflow(7), KeyId::overflow(8));
        assert_ne!(KeyId::overflow(7), KeyId::new(7, "", ""));
    }

    #[test]
    fn probe_slots_are_distinct_and_in_range() {
        for size in [1u32, 2, 3, 4, 5, 7, 64, 10_000] {
            for k in 0..200u64 {
                let key = KeyId(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                let slots = probe_slots(key, size);
                assert_eq!(slots.len(), PROBES.min(size as usize), "size {size}");
                assert!(slots.iter().all(|&s| s < size));
                let mut sorted = slots.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), slots.len(), "size {size}: {slots:?}");
            }
        }
    }

    #[test]
    fn only_a_key_at_rest_gives_up_its_slot() {
        let (a, b) = (KeyId(7), KeyId(9));
        let mut s = KeyState::default();
        assert_eq!(s.claim(a, t(0)), Claim::Fresh);
        s.tokens = vec![t(10).as_nanos()];
        assert_eq!(s.claim(a, t(5)), Claim::Owned);
        // a's bucket refills until t = 10 s: b must wait for it.
        assert_eq!(s.claim(b, t(5)), Claim::Taken);
        assert_eq!(s.owner(), Some(a));
        // A stream in flight keeps it busy too, until its lease runs out.
        s.streams = 1;
        s.touched = t(10).as_nanos();
        assert_eq!(s.claim(b, t(11)), Claim::Taken);
        let leaked = Timestamp(t(10).as_nanos() + STREAM_LEASE.as_nanos() as u64 + 1);
        assert_eq!(s.claim(b, leaked), Claim::Fresh);
        assert_eq!(s.owner(), Some(b));
        assert_eq!(s.streams(), 0);
    }

    #[test]
    fn a_key_finds_its_own_slot_before_a_free_one() {
        let key = KeyId(5);
        let busy = KeyState {
            owner: 3,
            tokens: vec![t(100).as_nanos()],
            ..KeyState::default()
        };
        let mine = KeyState {
            owner: 5,
            ..KeyState::default()
        };
        let empty = KeyState::default();
        let now = t(1);
        assert_eq!(
            choose_slot(key, &[empty.clone(), busy.clone(), mine], now),
            SlotChoice::Owned(2)
        );
        assert_eq!(
            choose_slot(key, &[busy.clone(), empty], now),
            SlotChoice::Free(1)
        );
        assert_eq!(
            choose_slot(key, &[busy.clone(), busy], now),
            SlotChoice::Full
        );
    }
}
