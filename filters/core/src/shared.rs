//! State shared by every worker VM: read-modify-write with compare-and-swap.
//!
//! Envoy runs one Wasm VM per worker thread; quotas, circuits and budgets
//! must be one state for all of them. Proxy-wasm shared data gives a byte
//! value per key with a version (`cas`): a write carrying a stale version
//! fails, so an update is read → decode → change → encode → write, retried
//! when another worker wrote in between. The retry count is bounded: under
//! contention that persists the caller gets [`UpdateError::Contention`] and
//! applies its documented fallback rather than spinning in the request path.
//!
//! [`SharedStore`] is the host access (implemented over proxy-wasm in
//! `sluice-filter-common`, and by an in-memory store here for tests); values
//! are encoded with MessagePack (rmp-serde), compact and schema-tolerant.
//!
//! [`SharedState`] is the one handle every capability goes through: it owns
//! the retry bound ([`MAX_ATTEMPTS`]) and the two ways of writing back,
//! [`SharedState::update`] (state that changes on every call: buckets,
//! budgets) and [`SharedState::modify`] (state that most calls only read: a
//! closed circuit; writing it back unchanged would turn every worker's read
//! into a compare-and-swap the others can invalidate).
//!
//! # Under contention
//!
//! A lost compare-and-swap re-reads and re-applies the change, which must
//! therefore be a pure function of the state it is given. After
//! [`MAX_ATTEMPTS`] lost races the update fails with
//! [`UpdateError::Contention`] and the caller applies its documented
//! fallback (the token limiter's `on_state_error`; the breaker admits). Each
//! attempt is a few microseconds, so eight lost races in a row take a storm
//! of writers on the *same* key: capabilities keep one key per unit of
//! state (tenant × model, circuit, bulkhead) so that one client's traffic
//! does not contend with another's.
//!
//! # Bounded keys
//!
//! Shared data has no delete and no expiry: every key ever written stays
//! for the life of the process. Keys are therefore made only from what the
//! policy names (backends, model patterns, quota rules) or from slot numbers
//! below a configured bound, never from a value a client sends.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A versioned value as read from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Option<Vec<u8>>,
    /// The version to pass back to [`SharedStore::set`]; `None` when the key
    /// was never written.
    pub cas: Option<u32>,
}

/// Why a write did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the value changed since it was read")]
    CasMismatch,
    #[error("the host refused the shared-data call")]
    Host,
}

/// Access to a shared key-value store with compare-and-swap.
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<Versioned, StoreError>;
    /// Writes `value` if the key's version is still `cas` (`None`: write
    /// unconditionally, as proxy-wasm's cas 0 does).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

impl<S: SharedStore + ?Sized> SharedStore for &S {
    fn get(&self, key: &str) -> Result<Versioned, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// Compare-and-swap attempts before an update gives up (see the module docs).
pub const MAX_ATTEMPTS: u32 = 8;

/// Why an update did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("other workers kept changing the value ({attempts} attempts)")]
    Contention { attempts: u32 },
    #[error("the host refused the shared-data call")]
    Host,
}

/// Updates the state under `key` with `change`, retrying on a concurrent
/// write up to `max_attempts` times. A missing or undecodable value starts
/// from `T::default()` (a value written by an older, incompatible layout is
/// replaced rather than wedging the key). Returns what `change` returned on
/// the attempt that was written.
pub fn update<S, T, R>(
    store: &S,
    key: &str,
    max_attempts: u32,
    mut change: impl FnMut(&mut T) -> R,
) -> Result<R, UpdateError>
where
    S: SharedStore + ?Sized,
    T: Serialize + DeserializeOwned + Default,
{
    let attempts = max_attempts.max(1);
    for _ in 0..attempts {
        let current = store.get(key).map_err(|_| UpdateError::Host)?;
        let mut state: T = current
            .value
            .as_deref()
            .and_then(|b| rmp_serde::from_slice(b).ok())
            .unwrap_or_default();
        let result = change(&mut state);
        let bytes = rmp_serde::to_vec(&state).map_err(|_| UpdateError::Host)?;
        // A key never written has no version, and Envoy writes an absent key
        // whatever cas is given: two workers creating the same key at the
        // same instant can lose one of the two first updates. That window
        // exists once per key, and only until its first write lands.
        match store.set(key, &bytes, current.cas) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contention { attempts })
}

/// Like [`update`], but writes only when `change` left the state different
/// (or the key was never written): a read-mostly state stays one read per
/// call, and concurrent readers never invalidate each other.
pub fn modify<S, T, R>(
    store: &S,
    key: &str,
    max_attempts: u32,
    mut change: impl FnMut(&mut T) -> R,
) -> Result<R, UpdateError>
where
    S: SharedStore + ?Sized,
    T: Serialize + DeserializeOwned + Default + PartialEq + Clone,
{
    let attempts = max_attempts.max(1);
    for _ in 0..attempts {
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
    Err(UpdateError::Contention { attempts })
}

/// The handle through which capabilities read and change cross-worker
/// state: a store and the retry bound, [`MAX_ATTEMPTS`] unless a test asks
/// for another.
#[derive(Clone, Copy, Debug, Default)]
pub struct SharedState<S> {
    store: S,
    attempts: u32,
}

impl<S: SharedStore> SharedState<S> {
    /// A handle over `store` with the standard retry bound.
    pub const fn new(store: S) -> Self {
        Self {
            store,
            attempts: MAX_ATTEMPTS,
        }
    }

    /// A handle that gives up after `attempts` lost races (tests).
    pub const fn with_attempts(store: S, attempts: u32) -> Self {
        Self { store, attempts }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The state under `key` (`T::default()` when absent or unreadable).
    pub fn read<T: DeserializeOwned + Default>(&self, key: &str) -> Result<T, UpdateError> {
        read(&self.store, key)
    }

    /// Changes the state under `key` and writes it back every time; see [`update`].
    pub fn update<T, R>(&self, key: &str, change: impl FnMut(&mut T) -> R) -> Result<R, UpdateError>
    where
        T: Serialize + DeserializeOwned + Default,
    {
        update(&self.store, key, self.attempts, change)
    }

    /// Changes the state under `key`, writing only if it changed; see [`modify`].
    pub fn modify<T, R>(&self, key: &str, change: impl FnMut(&mut T) -> R) -> Result<R, UpdateError>
    where
        T: Serialize + DeserializeOwned + Default + PartialEq + Clone,
    {
        modify(&self.store, key, self.attempts, change)
    }
}

/// Reads the state under `key` without changing it (`T::default()` when absent).
pub fn read<S, T>(store: &S, key: &str) -> Result<T, UpdateError>
where
    S: SharedStore + ?Sized,
    T: DeserializeOwned + Default,
{
    let current = store.get(key).map_err(|_| UpdateError::Host)?;
    Ok(current
        .value
        .as_deref()
        .and_then(|b| rmp_serde::from_slice(b).ok())
        .unwrap_or_default())
}

/// An in-memory store with Envoy's semantics, for tests of code that
/// updates shared state: versions start at 1 on the first write and grow by
/// one per write; a set with a stale non-zero cas fails; cas 0 (or `None`)
/// overwrites.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Versioned, StoreError> {
        Ok(match self.entries.borrow().get(key) {
            Some((v, cas)) => Versioned {
                value: Some(v.clone()),
                cas: Some(*cas),
            },
            None => Versioned {
                value: None,
                cas: None,
            },
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut entries = self.entries.borrow_mut();
        let current = entries.get(key).map(|(_, c)| *c);
        if let (Some(expected), Some(actual)) = (cas, current)
            && expected != 0
            && expected != actual
        {
            return Err(StoreError::CasMismatch);
        }
        let next = current.unwrap_or(0).wrapping_add(1).max(1);
        entries.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn update_reads_changes_and_writes() {
        let store = MemoryStore::default();
        for _ in 0..3 {
            update(&store, "k", 4, |n: &mut u64| *n += 1).unwrap();
        }
        assert_eq!(read::<_, u64>(&store, "k").unwrap(), 3);
    }

    /// A store where another worker writes between our read and our write,
    /// a given number of times.
    struct Contended {
        inner: MemoryStore,
        interferences: Cell<u32>,
    }

    impl SharedStore for Contended {
        fn get(&self, key: &str) -> Result<Versioned, StoreError> {
            let v = self.inner.get(key);
            if self.interferences.get() > 0 {
                self.interferences.set(self.interferences.get() - 1);
                let other: u64 = read(&self.inner, key).unwrap();
                self.inner
                    .set(key, &rmp_serde::to_vec(&(other + 100)).unwrap(), None)
                    .unwrap();
            }
            v
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_concurrent_write_is_never_lost() {
        let store = Contended {
            inner: MemoryStore::default(),
            interferences: Cell::new(0),
        };
        update(&store, "k", 4, |n: &mut u64| *n += 1).unwrap();
        store.interferences.set(2);
        let tries = Cell::new(0);
        update(&store, "k", 4, |n: &mut u64| {
            tries.set(tries.get() + 1);
            *n += 1
        })
        .unwrap();
        // 1, then two interfering +100 writes, then our +1 on top of them.
        assert_eq!(read::<_, u64>(&store.inner, "k").unwrap(), 202);
        assert_eq!(tries.get(), 3);
    }

    #[test]
    fn persistent_contention_gives_up_after_the_bound() {
        let store = Contended {
            inner: MemoryStore::default(),
            interferences: Cell::new(0),
        };
        update(&store, "k", 4, |n: &mut u64| *n += 1).unwrap();
        store.interferences.set(u32::MAX);
        assert_eq!(
            update(&store, "k", 3, |n: &mut u64| *n += 1),
            Err(UpdateError::Contention { attempts: 3 })
        );
    }

    #[test]
    fn an_undecodable_value_starts_over() {
        let store = MemoryStore::default();
        store.set("k", b"\xc1 not msgpack", None).unwrap();
        update(&store, "k", 2, |n: &mut u64| *n += 5).unwrap();
        assert_eq!(read::<_, u64>(&store, "k").unwrap(), 5);
    }

    #[test]
    fn modify_writes_only_what_changed() {
        let store = MemoryStore::default();
        let state = SharedState::new(&store);
        state.modify("k", |n: &mut u64| *n = 1).unwrap();
        let version = store.get("k").unwrap().cas;
        // A read-only change leaves the version alone...
        assert_eq!(state.modify("k", |n: &mut u64| *n * 10).unwrap(), 10);
        assert_eq!(store.get("k").unwrap().cas, version);
        // ...an absent key is written even when unchanged (it now exists).
        state.modify("fresh", |_: &mut u64| ()).unwrap();
        assert!(store.get("fresh").unwrap().value.is_some());
    }

    /// Several workers updating one key, their steps interleaved: each of
    /// our reads is followed, with a seeded probability, by a complete
    /// update from one of `others` other workers before our write.
    struct Workers {
        inner: MemoryStore,
        others: u32,
        seed: Cell<u64>,
        interleaved: Cell<u64>,
    }

    impl Workers {
        fn draw(&self) -> u64 {
            let mut x = self.seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.seed.set(x);
            x
        }
    }

    impl SharedStore for Workers {
        fn get(&self, key: &str) -> Result<Versioned, StoreError> {
            let v = self.inner.get(key);
            if !self.draw().is_multiple_of(u64::from(self.others + 1)) {
                update(&self.inner, key, 1, |n: &mut u64| *n += 1).unwrap();
                self.interleaved.set(self.interleaved.get() + 1);
            }
            v
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn contending_workers_lose_no_update_and_give_up_within_the_bound() {
        for others in [1u32, 3] {
            let store = Workers {
                inner: MemoryStore::default(),
                others,
                seed: Cell::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(others)),
                interleaved: Cell::new(0),
            };
            // The key exists before the race: Envoy lets a write to a key
            // never written go through whatever cas it carries (the one
            // window the module docs describe), which is not what this
            // test is about.
            let zero = rmp_serde::to_vec(&0u64).unwrap();
            store.inner.set("k", &zero, None).unwrap();
            let state = SharedState::new(&store);
            let (mut ours, mut gave_up) = (0u64, 0u64);
            for _ in 0..2_000 {
                match state.update("k", |n: &mut u64| *n += 1) {
                    Ok(()) => ours += 1,
                    Err(UpdateError::Contention { attempts }) => {
                        assert_eq!(attempts, MAX_ATTEMPTS);
                        gave_up += 1;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            let total: u64 = read(&store.inner, "k").unwrap();
            // Every write that reported success is in the total, once.
            assert_eq!(total, ours + store.interleaved.get(), "others = {others}");
            // Losing eight races in a row is rare at these odds: (3/4)^8 ≈ 10%
            // with three others, (1/2)^8 < 0.4% with one.
            assert!(ours > 1_500, "others = {others}: {ours} succeeded");
            assert!(gave_up < 400, "others = {others}: {gave_up} gave up");
        }
    }
}
