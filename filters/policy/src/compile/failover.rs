//! `[failover]`: zone preference and spill-over.
//!
//! The zones it names must exist in some backend, so that check runs after
//! the backends are compiled.

use sluice_core::config::{self as cfg, FailoverConfig, LocalZone};

use super::{Compiler, or};
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw;

impl Compiler {
    pub(super) fn failover(&mut self, raw: &raw::Failover) -> FailoverConfig {
        let l = &raw.loc;
        FailoverConfig {
            local_zone: match raw.local_zone.as_ref().map(|z| z.value.as_str()) {
                None | Some("auto") => LocalZone::Auto,
                Some(name) => LocalZone::Named(name.to_string()),
            },
            order: raw
                .order
                .as_ref()
                .map(|o| o.value.iter().map(|z| z.value.clone()).collect())
                .unwrap_or_default(),
            min_healthy: self.ratio_above_zero(
                &raw.min_healthy,
                "min_healthy",
                dflt::FAILOVER_MIN_HEALTHY,
                l,
            ),
            max_utilization: self.ratio_above_zero(
                &raw.max_utilization,
                "max_utilization",
                dflt::FAILOVER_MAX_UTILIZATION,
                l,
            ),
            spill: match or(&raw.spill, raw::Spill::Gradual) {
                raw::Spill::Gradual => cfg::Spill::Gradual,
                raw::Spill::All => cfg::Spill::All,
            },
            failback_after: or(&raw.failback_after, dflt::FAILOVER_FAILBACK_AFTER),
            probe_interval: self.positive(
                &raw.probe_interval,
                "probe_interval",
                dflt::FAILOVER_PROBE_INTERVAL,
                l,
            ),
            cross_region: or(&raw.cross_region, true),
        }
    }

    /// Zones named by `[failover]` must exist in some backend.
    pub(super) fn check_failover_zones(&mut self, raw: &raw::Failover, backends: &[cfg::Backend]) {
        let mut known: Vec<String> = backends
            .iter()
            .flat_map(|b| b.zones.iter().map(|z| z.name.clone()))
            .collect();
        known.dedup();
        let mut named: Vec<(&str, &Loc)> = raw
            .order
            .iter()
            .flat_map(|o| o.value.iter().map(|z| (z.value.as_str(), &z.loc)))
            .collect();
        if let Some(z) = &raw.local_zone
            && z.value != "auto"
        {
            named.push((z.value.as_str(), &z.loc));
        }
        for (zone, loc) in named {
            if !known.iter().any(|k| k == zone) {
                self.unknown_name("zone", zone, &known, loc);
            }
        }
    }
}
