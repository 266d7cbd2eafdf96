//! `[[backend]]`, `[[backend.zone]]` and `[[route]]`: where requests go.
//!
//! Every other section refers to these names (fallback backends, failover
//! zones), so they are declared and checked for uniqueness here first, and
//! each backend's effective per-capability sections are built by laying its
//! overrides over the global ones.

use sluice_core::config::{self as cfg, Pattern};

use super::{CompileError, Compiler, HasEnabled, loc_of, or};
use crate::decode::Spanned;
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw::{self, Document};

impl Compiler {
    pub(super) fn backends(&mut self, doc: &Document) -> Vec<cfg::Backend> {
        let hint =
            "add a `[[backend]]` table with a `name`, `models` and at least one `[[backend.zone]]`";
        let Some(list) = &doc.backend else {
            self.invalid(&doc.loc, "the policy declares no backend", Some(hint));
            return Vec::new();
        };
        if list.value.is_empty() {
            // `backend = []`: a policy that routes nowhere (found by fuzzing).
            self.invalid(&list.loc, "the policy declares no backend", Some(hint));
            return Vec::new();
        }
        let mut backends: Vec<cfg::Backend> = Vec::new();
        for raw in &list.value {
            let taken = backends.iter().map(|b| b.name.as_str());
            let Some(name) = self.declared_name("backend", &raw.name, &raw.loc, taken) else {
                continue;
            };
            let models = self
                .required(&raw.models, "models", &raw.loc)
                .unwrap_or_default();
            if raw.models.is_some() && models.is_empty() {
                self.invalid(
                    &loc_of(&raw.models, &raw.loc),
                    "a backend must serve at least one model",
                    Some("list model names, or \"*\" for any"),
                );
            }
            let zones = self.zones(raw, &name);
            // Overrides: the backend's keys laid over the global section.
            let outlier = self.overridden(&doc.outlier, &raw.outlier, |cx, r| cx.outlier(r));
            let retry = self.overridden(&doc.retry, &raw.retry, |cx, r| cx.retry(r));
            backends.push(cfg::Backend {
                name,
                api: match or(&raw.api, raw::Api::Openai) {
                    raw::Api::Openai => cfg::Api::Openai,
                    raw::Api::Anthropic => cfg::Api::Anthropic,
                },
                models: models.into_iter().map(Pattern::new).collect(),
                timeout: or(&raw.timeout, dflt::BACKEND_TIMEOUT),
                zones,
                outlier,
                breaker: None,
                retry,
                failover: None,
            });
        }
        // Breakers resolve fallback backends and failover resolves zones,
        // so they compile once all backends are known; the global sections
        // first, so that their errors are reported once, at their own keys.
        let snapshot = backends.clone();
        self.global_breaker = match &doc.breaker {
            Some(raw) if raw.value.enabled() => Some(self.breaker(&raw.value, &snapshot)),
            _ => None,
        };
        if let Some(raw) = &doc.failover
            && raw.value.enabled()
        {
            self.check_failover_zones(&raw.value, &snapshot);
        }
        for (backend, raw) in backends
            .iter_mut()
            .zip(list.value.iter().filter(|r| r.name.is_some()))
        {
            backend.breaker =
                self.overridden(&doc.breaker, &raw.breaker, |cx, r| cx.breaker(r, &snapshot));
            backend.failover = self.overridden(&doc.failover, &raw.failover, |cx, r| {
                cx.check_failover_zones(r, &snapshot);
                cx.failover(r)
            });
        }
        backends
    }

    /// The required `name` of a declared backend or zone: well formed, and
    /// not among the names already `taken`.
    fn declared_name<'t>(
        &mut self,
        what: &'static str,
        field: &Option<Spanned<String>>,
        table: &Loc,
        mut taken: impl Iterator<Item = &'t str>,
    ) -> Option<String> {
        let name = self.required(field, "name", table)?;
        let loc = loc_of(field, table);
        self.check_name(what, &name, &loc);
        if taken.any(|t| t == name) {
            self.push(CompileError::Duplicate {
                what,
                name: name.clone(),
                loc,
            });
        }
        Some(name)
    }

    /// A name the policy declares (backend, zone, quota rule): lowercase
    /// letters, digits, `-`, `_` and `.`.
    pub(super) fn check_name(&mut self, what: &'static str, name: &str, loc: &Loc) {
        let valid = !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
            });
        if !valid {
            let hint = if what == "quota" {
                "use lowercase letters, digits, `-`, `_` and `.`, as in backend names"
            } else {
                "use lowercase letters, digits, `-`, `_` and `.`: it becomes part of Envoy cluster and metric names"
            };
            self.invalid(
                loc,
                format!("{what} name `{name}` is not valid"),
                Some(hint),
            );
        }
    }

    fn zones(&mut self, raw: &raw::Backend, backend: &str) -> Vec<cfg::Zone> {
        let Some(list) = &raw.zone else {
            self.invalid(
                &raw.loc,
                format!("backend `{backend}` has no zone"),
                Some("add a `[[backend.zone]]` with a `name` (and `endpoints` or a `cluster`)"),
            );
            return Vec::new();
        };
        let mut zones: Vec<cfg::Zone> = Vec::new();
        for z in &list.value {
            let taken = zones.iter().map(|z| z.name.as_str());
            let Some(name) = self.declared_name("zone", &z.name, &z.loc, taken) else {
                continue;
            };
            let endpoints: Vec<String> = z
                .endpoints
                .as_ref()
                .map(|e| {
                    e.value
                        .iter()
                        .map(|ep| {
                            if !is_host_port(&ep.value) {
                                self.invalid(
                                    &ep.loc,
                                    format!("`{}` is not a `host:port` endpoint", ep.value),
                                    Some("write an address and a port, like \"10.0.0.7:8000\""),
                                );
                            }
                            ep.value.clone()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let cluster = or(&z.cluster, backend.to_string());
            zones.push(cfg::Zone {
                region: or(&z.region, dflt::REGION.to_string()),
                cluster,
                endpoints,
                name,
                requests_per_minute: z.requests_per_minute.as_ref().map(|_| {
                    self.nonzero(&z.requests_per_minute, "requests_per_minute", 1, &z.loc)
                }),
                tokens_per_minute: z
                    .tokens_per_minute
                    .as_ref()
                    .map(|_| self.nonzero(&z.tokens_per_minute, "tokens_per_minute", 1, &z.loc)),
            });
        }
        if list.value.is_empty() {
            self.invalid(&list.loc, format!("backend `{backend}` has no zone"), None);
        }
        zones
    }

    pub(super) fn routes(&mut self, doc: &Document, backends: &[String]) -> Vec<cfg::Route> {
        let Some(list) = &doc.route else {
            return Vec::new();
        };
        list.value
            .iter()
            .filter_map(|r| {
                let backend = self.required(&r.backend, "backend", &r.loc)?;
                if !backends.contains(&backend) {
                    self.unknown_name("backend", &backend, backends, &loc_of(&r.backend, &r.loc));
                }
                let matcher = self.matcher(r.matcher.as_ref().map(|m| &m.value));
                Some(cfg::Route { matcher, backend })
            })
            .collect()
    }

    pub(super) fn matcher(&mut self, raw: Option<&raw::Match>) -> cfg::Match {
        let Some(raw) = raw else {
            return cfg::Match::default();
        };
        let patterns = |f: &Option<Spanned<Vec<String>>>| {
            f.as_ref()
                .map(|v| v.value.iter().map(Pattern::new).collect())
                .unwrap_or_default()
        };
        let prefixes = or(&raw.path_prefix, Vec::new());
        for p in &prefixes {
            if !p.starts_with('/') {
                self.invalid(
                    &loc_of(&raw.path_prefix, &raw.loc),
                    format!("path prefix `{p}` does not start with `/`"),
                    None,
                );
            }
        }
        cfg::Match {
            path_prefix: prefixes,
            authority: or(&raw.authority, Vec::new()),
            models: patterns(&raw.models),
            tenants: patterns(&raw.tenants),
        }
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535 (IPv6 in brackets).
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[') == host.ends_with(']'))
        && !host.contains(char::is_whitespace);
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}
