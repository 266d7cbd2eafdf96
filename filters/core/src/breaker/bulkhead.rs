//! Concurrency caps per backend × model and per tenant, with a FIFO queue.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::BulkheadConfig;
use crate::time::{Timestamp, duration_nanos};

/// Length of a slot-lease epoch. A slot taken (or renewed) in epoch `e`
/// counts through the end of epoch `e + 1`: it lives between one and two
/// epochs (30–60 s) without renewal. A filter renews the slots of live
/// requests when [`SlotLease::due`] says so (from `on_tick`, or as body
/// chunks stream by), so only slots whose request vanished expire.
pub const SLOT_EPOCH: Duration = Duration::from_secs(30);

/// A held slot; the filter keeps it in the request's context and gives it
/// back with [`Bulkhead::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotLease {
    /// The tenant's key (see [`tenant_key`]).
    pub tenant: u64,
    /// The lease epoch the slot was taken or last renewed in.
    pub epoch: u64,
}

impl SlotLease {
    /// Whether the lease should be renewed at `now` (it was taken in an
    /// earlier epoch, so it expires at the end of this one).
    pub fn due(&self, now: Timestamp) -> bool {
        lease_epoch(now) > self.epoch
    }
}

/// A place in the queue; the filter keeps it while the request is paused
/// and polls with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueTicket {
    pub id: u64,
    pub tenant: u64,
}

/// The answer to [`Bulkhead::try_acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Go ahead; release the lease when the request ends.
    Granted(SlotLease),
    /// Pause the request and [`Bulkhead::poll`] on each tick.
    Queued(QueueTicket),
    /// No slot and no room to wait (or no queue): degrade.
    Full,
}

/// The answer to [`Bulkhead::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// A slot is yours: resume the request.
    Granted { lease: SlotLease, waited: Duration },
    /// Keep waiting; `position` waiters (0-based) are ahead.
    Waiting { position: u32 },
    /// `max_wait` passed (or the ticket was dropped): degrade.
    TimedOut,
}

/// Slots a tenant holds, by lease epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TenantSlots {
    tenant: u64,
    /// The newest lease epoch this entry has seen.
    epoch: u64,
    /// Slots taken or renewed in `epoch`.
    current: u32,
    /// Slots taken or renewed in `epoch − 1`.
    previous: u32,
}

impl TenantSlots {
    fn held(&self) -> u32 {
        self.current.saturating_add(self.previous)
    }

    /// Moves to `epoch`: slots older than the previous epoch expire. A
    /// clock that went back re-anchors here, so held slots still expire
    /// within two epochs of the new time.
    fn roll(&mut self, epoch: u64) {
        if epoch == self.epoch.saturating_add(1) {
            self.previous = self.current;
            self.current = 0;
        } else if epoch > self.epoch {
            self.previous = 0;
            self.current = 0;
        }
        self.epoch = epoch;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Waiter {
    id: u64,
    tenant: u64,
    /// The tenant's cap, resolved from its name when it queued.
    cap: u32,
    since: Timestamp,
}

/// The in-flight accounting of one backend × model: who holds slots and who
/// waits. `Default` is empty, so it can start from an absent shared key.
///
/// Size: one 4-number entry per tenant holding slots, one 4-number entry
/// per waiter (at most `queue`): a few hundred bytes for dozens of tenants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bulkhead {
    tenants: Vec<TenantSlots>,
    queue: Vec<Waiter>,
    next_ticket: u64,
}

impl Bulkhead {
    /// Takes a slot for `tenant` if one is free without jumping the queue,
    /// else queues the request if the queue has room, else answers
    /// [`Acquire::Full`].
    pub fn try_acquire(&mut self, cfg: &BulkheadConfig, tenant: &str, now: Timestamp) -> Acquire {
        self.tidy(cfg, now);
        let key = tenant_key(tenant);
        let cap = tenant_cap(cfg, tenant);
        if self.can_grant(cfg, key, cap, self.queue.len()) {
            return Acquire::Granted(self.take(key, now));
        }
        let room = usize::try_from(cfg.queue).unwrap_or(usize::MAX);
        if self.queue.len() < room && !cfg.max_wait.is_zero() {
            let id = self.next_ticket;
            self.next_ticket = self.next_ticket.wrapping_add(1);
            self.queue.push(Waiter {
                id,
                tenant: key,
                cap,
                since: now,
            });
            return Acquire::Queued(QueueTicket { id, tenant: key });
        }
        Acquire::Full
    }

    /// Asks whether a queued request may go now. Waiters are served in
    /// arrival order, except that a waiter whose tenant is at its cap does
    /// not hold up those behind it.
    pub fn poll(&mut self, cfg: &BulkheadConfig, ticket: QueueTicket, now: Timestamp) -> Poll {
        self.tidy(cfg, now);
        let Some(index) = self.queue.iter().position(|w| w.id == ticket.id) else {
            return Poll::TimedOut;
        };
        let Some(waiter) = self.queue.get(index).copied() else {
            return Poll::TimedOut;
        };
        if self.can_grant(cfg, waiter.tenant, waiter.cap, index) {
            self.queue.remove(index);
            let lease = self.take(waiter.tenant, now);
            return Poll::Granted {
                lease,
                waited: now.since(waiter.since),
            };
        }
        Poll::Waiting {
            position: u32::try_from(index).unwrap_or(u32::MAX),
        }
    }

    /// Leaves the queue (the client went away while waiting).
    pub fn cancel(&mut self, ticket: QueueTicket) {
        self.queue.retain(|w| w.id != ticket.id);
    }

    /// Gives a slot back. A lease that had already expired frees nothing.
    pub fn release(&mut self, lease: SlotLease, now: Timestamp) {
        let epoch = lease_epoch(now);
        if let Some(slots) = self.tenants.iter_mut().find(|s| s.tenant == lease.tenant) {
            slots.roll(epoch);
            if lease.epoch >= slots.epoch {
                slots.current = slots.current.saturating_sub(1);
            } else if lease.epoch.saturating_add(1) == slots.epoch {
                slots.previous = slots.previous.saturating_sub(1);
            }
        }
        self.tenants.retain(|s| s.held() > 0);
    }

    /// Renews a live request's slot into the current epoch. `None` when the
    /// lease had expired and no slot is free to take again: the request
    /// runs on, uncounted.
    pub fn renew(
        &mut self,
        cfg: &BulkheadConfig,
        tenant: &str,
        lease: SlotLease,
        now: Timestamp,
    ) -> Option<SlotLease> {
        let epoch = lease_epoch(now);
        let live = self
            .tenants
            .iter_mut()
            .find(|s| s.tenant == lease.tenant)
            .and_then(|slots| {
                slots.roll(epoch);
                if lease.epoch >= slots.epoch && slots.current > 0 {
                    Some(())
                } else if lease.epoch.saturating_add(1) == slots.epoch && slots.previous > 0 {
                    slots.previous -= 1;
                    slots.current = slots.current.saturating_add(1);
                    Some(())
                } else {
                    None
                }
            });
        if live.is_some() {
            return Some(SlotLease {
                tenant: lease.tenant,
                epoch,
            });
        }
        // Expired: take a slot again only as a newcomer could.
        self.tidy(cfg, now);
        let cap = tenant_cap(cfg, tenant);
        self.can_grant(cfg, lease.tenant, cap, self.queue.len())
            .then(|| self.take(lease.tenant, now))
    }

    /// Slots held at `now`, all tenants together.
    pub fn in_flight(&self, now: Timestamp) -> u32 {
        let epoch = lease_epoch(now);
        self.tenants
            .iter()
            .map(|s| {
                let mut s = *s;
                s.roll(epoch);
                s.held()
            })
            .fold(0, u32::saturating_add)
    }

    /// Slots `tenant` holds at `now`.
    pub fn in_flight_of(&self, tenant: &str, now: Timestamp) -> u32 {
        let key = tenant_key(tenant);
        self.tenants
            .iter()
            .find(|s| s.tenant == key)
            .map(|s| {
                let mut s = *s;
                s.roll(lease_epoch(now));
                s.held()
            })
            .unwrap_or(0)
    }

    /// Requests waiting (including any whose time ran out but that no call
    /// has swept yet).
    pub fn queue_len(&self) -> u32 {
        u32::try_from(self.queue.len()).unwrap_or(u32::MAX)
    }

    /// Whether a request of `tenant` (with cap `cap`) may take a slot, given
    /// the waiters ahead of it (`queue[..ahead]`), which are served first.
    fn can_grant(&self, cfg: &BulkheadConfig, tenant: u64, cap: u32, ahead: usize) -> bool {
        // Serve the waiters ahead on paper: each takes a slot if its tenant
        // has room under its cap.
        let mut held: Vec<(u64, u32)> = self.tenants.iter().map(|s| (s.tenant, s.held())).collect();
        let mut total = held.iter().map(|&(_, n)| n).fold(0, u32::saturating_add);
        for w in self.queue.iter().take(ahead) {
            let n = count_of(&mut held, w.tenant);
            if *n < w.cap {
                *n = n.saturating_add(1);
                total = total.saturating_add(1);
            }
        }
        let mine = *count_of(&mut held, tenant);
        mine < cap && total < cfg.max_in_flight.get()
    }

    fn take(&mut self, tenant: u64, now: Timestamp) -> SlotLease {
        let epoch = lease_epoch(now);
        match self.tenants.iter_mut().find(|s| s.tenant == tenant) {
            Some(slots) => {
                slots.roll(epoch);
                slots.current = slots.current.saturating_add(1);
            }
            None => self.tenants.push(TenantSlots {
                tenant,
                epoch,
                current: 1,
                previous: 0,
            }),
        }
        SlotLease { tenant, epoch }
    }

    /// Expires old slot leases and waiters past `max_wait`.
    fn tidy(&mut self, cfg: &BulkheadConfig, now: Timestamp) {
        let epoch = lease_epoch(now);
        for slots in &mut self.tenants {
            slots.roll(epoch);
        }
        self.tenants.retain(|s| s.held() > 0);
        let max_wait = duration_nanos(cfg.max_wait);
        for w in &mut self.queue {
            // The clock went back: the wait counts from the new "now".
            if w.since > now {
                w.since = now;
            }
        }
        self.queue
            .retain(|w| duration_nanos(now.since(w.since)) < max_wait);
    }
}

fn count_of(held: &mut Vec<(u64, u32)>, tenant: u64) -> &mut u32 {
    let index = match held.iter().position(|&(t, _)| t == tenant) {
        Some(i) => i,
        None => {
            held.push((tenant, 0));
            held.len() - 1
        }
    };
    // `index` is in bounds: found above, or just pushed.
    &mut held[index].1
}

/// The cap on `tenant`'s in-flight requests: its override, else
/// `max_in_flight_per_tenant`, else the whole `max_in_flight`; never more
/// than `max_in_flight`.
pub fn tenant_cap(cfg: &BulkheadConfig, tenant: &str) -> u32 {
    let cap = cfg
        .tenants
        .iter()
        .find(|t| t.tenant == tenant)
        .map(|t| t.max_in_flight)
        .or(cfg.max_in_flight_per_tenant)
        .unwrap_or(cfg.max_in_flight);
    cap.get().min(cfg.max_in_flight.get())
}

/// A tenant's key in the shared state: 64-bit FNV-1a of its name. Fixed
/// size whatever the name (tenant names can come from client headers), and
/// the same in every worker VM; written by hand because it is five lines
/// and must never change between builds, which `std`'s hasher does not
/// promise.
pub fn tenant_key(tenant: &str) -> u64 {
    tenant.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn lease_epoch(now: Timestamp) -> u64 {
    now.as_nanos() / duration_nanos(SLOT_EPOCH).max(1)
}
