//! A backend's endpoints in shared data: the records every worker merges
//! its tallies into, and the ejection decisions taken on them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::detect::{Reason, suspects};
use super::record::{EndpointRecord, Health};
use super::tally::Tally;
use crate::config::OutlierConfig;
use crate::time::Timestamp;

/// What a flush changed, for logs and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Taken out of rotation for `length`.
    Ejected {
        addr: String,
        reason: Reason,
        length: Duration,
    },
    /// Its ejection ended; probes decide its return.
    Probing { addr: String },
    /// Back in rotation.
    Returned { addr: String },
    /// A detector flagged it, but the ejection cap kept it in rotation.
    Spared { addr: String, reason: Reason },
}

/// Endpoints in and out of rotation, per zone (what zone failover reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ZoneHealth {
    pub zone: String,
    pub endpoints: u32,
    pub in_rotation: u32,
}

/// Every endpoint of one backend, as shared by all workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    pub endpoints: Vec<EndpointRecord>,
}

impl BackendState {
    /// Makes the records match the policy's endpoints (`(addr, zone)`, in
    /// the policy's order): a record is kept by its address across reloads
    /// that reorder or rezone endpoints, added for a new one, and dropped
    /// for one the policy no longer lists (the key stays bounded by the
    /// policy).
    pub fn align(&mut self, endpoints: &[(String, String)]) {
        let mut old = std::mem::take(&mut self.endpoints);
        for (addr, zone) in endpoints {
            if self.endpoints.iter().any(|r| &r.addr == addr) {
                continue;
            }
            let record = match old.iter().position(|r| &r.addr == addr) {
                Some(i) => {
                    let mut r = old.swap_remove(i);
                    r.zone.clone_from(zone);
                    r
                }
                None => EndpointRecord::new(addr, zone),
            };
            self.endpoints.push(record);
        }
    }

    /// Folds this worker's tallies in (by address; unknown addresses are
    /// ignored), moves ejections forward in time, and runs the detectors.
    /// Must be a pure function of `self` (it is re-run on a lost
    /// compare-and-swap); `rand` is drawn once per ejection.
    pub fn flush(
        &mut self,
        tallies: &[(String, Tally)],
        cfg: &OutlierConfig,
        now: Timestamp,
        mut rand: impl FnMut() -> f64,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for r in &mut self.endpoints {
            r.age(now, cfg);
        }
        for (addr, tally) in tallies {
            let Some(r) = self.endpoints.iter_mut().find(|r| &r.addr == addr) else {
                continue;
            };
            r.absorb(tally);
            if let Health::Probing { left } = r.health {
                if tally.failures > 0 {
                    let length = r.eject(Reason::FailedProbe, now, cfg, rand());
                    events.push(Event::Ejected {
                        addr: addr.clone(),
                        reason: Reason::FailedProbe,
                        length,
                    });
                } else if tally.successes >= left {
                    r.restore(now);
                    events.push(Event::Returned { addr: addr.clone() });
                } else {
                    r.health = Health::Probing {
                        left: left - tally.successes,
                    };
                }
            }
        }
        for r in &mut self.endpoints {
            if let Health::Ejected { until, .. } = r.health
                && now >= until
            {
                r.health = Health::Probing {
                    left: cfg.probes.get(),
                };
                events.push(Event::Probing {
                    addr: r.addr.clone(),
                });
            }
        }
        let in_rotation: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].health == Health::Healthy)
            .collect();
        let mut out = self.endpoints.len() - in_rotation.len();
        let cap = self.ejection_cap(cfg);
        for (i, reason) in suspects(&self.endpoints, &in_rotation, cfg, now) {
            let r = &mut self.endpoints[i];
            if out >= cap {
                events.push(Event::Spared {
                    addr: r.addr.clone(),
                    reason,
                });
                continue;
            }
            let length = r.eject(reason, now, cfg, rand());
            out += 1;
            events.push(Event::Ejected {
                addr: r.addr.clone(),
                reason,
                length,
            });
        }
        events
    }

    /// Most endpoints out of rotation at once: `max_ejection` of them, at
    /// least one, never all.
    pub fn ejection_cap(&self, cfg: &OutlierConfig) -> usize {
        let n = self.endpoints.len();
        let share = (n as f64 * cfg.max_ejection.get()).floor() as usize;
        share.max(1).min(n.saturating_sub(1))
    }

    /// Records a 429's reset time at once (the worker that saw it does not
    /// wait for its tick: the next request must already go elsewhere).
    pub fn throttle(&mut self, addr: &str, until: Timestamp) -> bool {
        match self.endpoints.iter_mut().find(|r| r.addr == addr) {
            Some(r) if r.throttled_until < until => {
                r.throttled_until = until;
                true
            }
            _ => false,
        }
    }

    /// Endpoints in rotation per zone, in the order zones first appear.
    pub fn zones(&self, now: Timestamp) -> Vec<ZoneHealth> {
        let mut zones: Vec<ZoneHealth> = Vec::new();
        for r in &self.endpoints {
            let i = match zones.iter().position(|z| z.zone == r.zone) {
                Some(i) => i,
                None => {
                    zones.push(ZoneHealth {
                        zone: r.zone.clone(),
                        ..ZoneHealth::default()
                    });
                    zones.len() - 1
                }
            };
            zones[i].endpoints += 1;
            zones[i].in_rotation += u32::from(r.in_rotation(now));
        }
        zones
    }
}
