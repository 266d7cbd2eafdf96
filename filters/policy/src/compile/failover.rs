//! `[failover]`: zone preference and spill-over.
//!
//! Like `[outlier]` and `[retry]`, the global section applies to every
//! backend, and a backend's `[backend.failover]` overrides its keys or
//! switches it on or off for that backend alone. The zones a section names
//! (the global one and each backend's effective copy) must exist in some
//! backend, and each backend failover is on for must be shaped the way it
//! routes, so those checks run after the backends are compiled:
//!
//! - it moves requests between zones by naming endpoints to the cluster's
//!   `override_host` load balancing, which picks only among its own
//!   cluster's endpoints: every zone of a backend must be one cluster;
//! - it judges a zone's health from `[outlier]`'s endpoint records
//!   (ejections, 429 benches, attempts, time to first token), so a backend
//!   it has zones to move between (two or more that list endpoints) needs
//!   `[outlier]` on.
//!
//! A backend with one zone, or with fewer than two zones that list
//! endpoints, gives failover nothing to do: that is not an error (a
//! fallback pool in one zone is common), and `sluice explain` says so. A
//! backend with zones that is not meant to fail over (one next to a
//! failover backend, without `[outlier]`) says `enabled = false` in its
//! `[backend.failover]`, and none of these checks apply to it.

use sluice_core::config::{self as cfg, FailoverConfig, LocalZone};

use super::{Compiler, loc_of, or};
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw::{self, Document};

/// How a backend that should not fail over leaves it, as hints say it.
const SWITCH_OFF: &str =
    "switch failover off for this backend with `enabled = false` in its `[backend.failover]`";

/// The zones of `backend` that failover can send requests to: those whose
/// endpoints the policy lists (it names endpoints, never zones, to Envoy).
pub(crate) fn routable_zones(backend: &cfg::Backend) -> Vec<&cfg::Zone> {
    backend
        .zones
        .iter()
        .filter(|z| !z.endpoints.is_empty())
        .collect()
}

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

    /// Zones named by a `[failover]` section (global, or a backend's
    /// effective one) must exist in some backend, and `order` gives each
    /// one place.
    pub(super) fn check_failover_zones(&mut self, raw: &raw::Failover, backends: &[cfg::Backend]) {
        let mut known: Vec<String> = Vec::new();
        for zone in backends.iter().flat_map(|b| &b.zones) {
            if !known.contains(&zone.name) {
                known.push(zone.name.clone());
            }
        }
        let order: Vec<(&str, &Loc)> = raw
            .order
            .iter()
            .flat_map(|o| o.value.iter().map(|z| (z.value.as_str(), &z.loc)))
            .collect();
        for (i, (zone, loc)) in order.iter().enumerate() {
            if order[..i].iter().any(|(earlier, _)| earlier == zone) {
                self.invalid(
                    loc,
                    format!("zone `{zone}` is named twice in `order`"),
                    Some("a zone has one place in the order of preference; remove one of them"),
                );
            }
        }
        let mut named = order;
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

    /// Each backend failover is on for is one Envoy cluster, with
    /// `[outlier]` on (see the module docs for why).
    pub(super) fn check_failover_backends(&mut self, doc: &Document, backends: &[cfg::Backend]) {
        let Some(list) = &doc.backend else {
            return;
        };
        // `backends` holds the raw backends that have a name, in order.
        let raws = list.value.iter().filter(|r| r.name.is_some());
        for (backend, raw) in backends.iter().zip(raws) {
            if backend.failover.is_none() {
                continue;
            }
            self.check_one_cluster(backend, raw);
            self.check_outlier_for_failover(doc, backend, raw);
        }
    }

    fn check_one_cluster(&mut self, backend: &cfg::Backend, raw: &raw::Backend) {
        let raw_zones: Vec<&raw::Zone> = raw
            .zone
            .iter()
            .flat_map(|l| &l.value)
            .filter(|z| z.name.is_some())
            .collect();
        let Some((first, first_raw)) = backend.zones.first().zip(raw_zones.first()) else {
            return;
        };
        for (zone, zone_raw) in backend.zones.iter().zip(&raw_zones).skip(1) {
            if zone.cluster == first.cluster {
                continue;
            }
            // At the `cluster` that differs from the backend's default, or
            // from the first zone's.
            let loc = match (&zone_raw.cluster, &first_raw.cluster) {
                (Some(c), _) => c.loc.clone(),
                (None, Some(c)) => c.loc.clone(),
                (None, None) => zone_raw.loc.clone(),
            };
            self.invalid(
                &loc,
                format!(
                    "backend `{}` has zones in two clusters (`{}` in `{}`, `{}` in `{}`), but [failover] needs all of a backend's zones in one",
                    backend.name, first.name, first.cluster, zone.name, zone.cluster
                ),
                Some(&format!(
                    "failover sends a request to another zone by naming its endpoints to the cluster's override_host load balancing, which picks only among its own cluster's endpoints; give every zone of `{}` the same `cluster` (or none: the default is the backend's name), or {SWITCH_OFF}",
                    backend.name
                )),
            );
        }
    }

    fn check_outlier_for_failover(
        &mut self,
        doc: &Document,
        backend: &cfg::Backend,
        raw: &raw::Backend,
    ) {
        let zones = routable_zones(backend);
        if zones.len() < 2 || backend.outlier.is_some() {
            return;
        }
        let names: Vec<String> = zones.iter().map(|z| format!("`{}`", z.name)).collect();
        let message = format!(
            "backend `{}` has [outlier] off, but [failover] judges the health of its zones ({}) from it",
            backend.name,
            names.join(", ")
        );
        let switched_off = |section: &Option<crate::decode::Spanned<raw::Outlier>>| {
            section
                .as_ref()
                .and_then(|s| s.value.enabled.as_ref())
                .filter(|e| !e.value)
                .map(|e| e.loc.clone())
        };
        let why = "zone health is judged from [outlier]'s endpoint records (ejections, 429 benches, attempts, time to first token)";
        let (loc, fix) = if let Some(loc) = switched_off(&raw.outlier) {
            (loc, "remove `enabled = false` here")
        } else if let Some(loc) = switched_off(&doc.outlier) {
            (
                loc,
                "remove `enabled = false` here (or switch it on in this backend's `[backend.outlier]`)",
            )
        } else {
            (
                loc_of(&raw.name, &raw.loc),
                "add `[outlier]` (its defaults are fine)",
            )
        };
        self.invalid(
            &loc,
            message,
            Some(&format!("{why}; {fix}, or {SWITCH_OFF}")),
        );
    }
}
