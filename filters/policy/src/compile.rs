//! Compiling a raw [`Document`] into a validated [`Policy`].
//!
//! This is the second of the two steps (decode, then compile): defaults are
//! filled in, per-backend overrides are laid over the global sections, names
//! are resolved, and ranges and cross-field rules are checked. Every error
//! found is kept, each with the place it points at.

use std::num::NonZeroU32;
use std::time::Duration;

use sluice_core::config::{
    self as cfg, ApiKeyName, BreakerConfig, BulkheadConfig, DegradeAction, DegradeConfig,
    FailoverConfig, LocalZone, ModelSource, OutlierConfig, Pattern, Policy, Quota, RetryConfig,
    TenantIdentity, TenantLimit, TenantSource, TokensConfig, Window,
};
use sluice_core::units::{ByteSize, HumanDuration, Rate, Ratio};

use crate::decode::{Overlay, Spanned, did_you_mean};
use crate::defaults as dflt;
use crate::diagnostic::{Diagnostic, Loc};
use crate::raw::{self, Document};

/// Why a decoded policy is not valid.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CompileError {
    #[error("missing required key `{key}`")]
    Missing { key: &'static str, loc: Loc },
    #[error("`{key}` must be {bound}, found {found}")]
    OutOfRange {
        key: &'static str,
        bound: String,
        found: String,
        loc: Loc,
    },
    #[error("unknown {what} `{name}`")]
    UnknownName {
        what: &'static str,
        name: String,
        suggestion: Option<String>,
        known: Vec<String>,
        loc: Loc,
    },
    #[error("{what} `{name}` is declared twice")]
    Duplicate {
        what: &'static str,
        name: String,
        loc: Loc,
    },
    #[error(
        "`{key}` is {found}, but a request may reserve {cap} tokens (the completion cap), so it could never be admitted"
    )]
    BelowCompletionCap {
        key: &'static str,
        found: u64,
        cap: u64,
        loc: Loc,
    },
    #[error("{message}")]
    Invalid {
        message: String,
        hint: Option<String>,
        loc: Loc,
    },
}

impl CompileError {
    pub fn loc(&self) -> &Loc {
        match self {
            CompileError::Missing { loc, .. }
            | CompileError::OutOfRange { loc, .. }
            | CompileError::UnknownName { loc, .. }
            | CompileError::Duplicate { loc, .. }
            | CompileError::BelowCompletionCap { loc, .. }
            | CompileError::Invalid { loc, .. } => loc,
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            CompileError::Missing { key, .. } => Some(format!("add `{key} = …` here")),
            CompileError::UnknownName {
                suggestion: Some(s),
                ..
            } => Some(format!("did you mean `{s}`?")),
            CompileError::UnknownName { known, .. } if !known.is_empty() => {
                Some(format!("declared: {}", known.join(", ")))
            }
            CompileError::Duplicate { .. } => Some("names must be unique".into()),
            CompileError::BelowCompletionCap { cap, .. } => Some(format!(
                "raise it to at least {cap}, or lower `max_completion_tokens`"
            )),
            CompileError::Invalid { hint, .. } => hint.clone(),
            _ => None,
        }
    }

    pub fn to_diagnostic(&self) -> Diagnostic {
        let d = Diagnostic::new(self.loc(), self.to_string());
        match self.hint() {
            Some(h) => d.with_hint(h),
            None => d,
        }
    }
}

/// All the errors of one document.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{} error(s) in the policy", .0.len())]
pub struct CompileErrors(pub Vec<CompileError>);

impl TryFrom<&Document> for Policy {
    type Error = CompileErrors;

    fn try_from(doc: &Document) -> Result<Self, Self::Error> {
        let mut cx = Compiler::default();
        let policy = cx.policy(doc);
        if cx.errors.is_empty() {
            Ok(policy)
        } else {
            Err(CompileErrors(cx.errors))
        }
    }
}

#[derive(Default)]
struct Compiler {
    errors: Vec<CompileError>,
    global_breaker: Option<BreakerConfig>,
}

/// The value of an optional field, or its default.
fn or<T: Clone>(field: &Option<Spanned<T>>, default: T) -> T {
    field.as_ref().map_or(default, |s| s.value.clone())
}

/// Where a field is, or else where its table is.
fn loc_of<T>(field: &Option<Spanned<T>>, table: &Loc) -> Loc {
    field
        .as_ref()
        .map_or_else(|| table.clone(), |s| s.loc.clone())
}

impl Compiler {
    fn push(&mut self, e: CompileError) {
        self.errors.push(e);
    }

    fn invalid(&mut self, loc: &Loc, message: impl Into<String>, hint: Option<&str>) {
        self.push(CompileError::Invalid {
            message: message.into(),
            hint: hint.map(Into::into),
            loc: loc.clone(),
        });
    }

    fn required<T: Clone>(
        &mut self,
        field: &Option<Spanned<T>>,
        key: &'static str,
        table: &Loc,
    ) -> Option<T> {
        if field.is_none() {
            self.push(CompileError::Missing {
                key,
                loc: table.clone(),
            });
        }
        field.as_ref().map(|s| s.value.clone())
    }

    /// A count that must be at least 1.
    fn nonzero(
        &mut self,
        field: &Option<Spanned<u32>>,
        key: &'static str,
        default: u32,
        table: &Loc,
    ) -> NonZeroU32 {
        let value = or(field, default);
        NonZeroU32::new(value).unwrap_or_else(|| {
            self.out_of_range(key, "at least 1", value, &loc_of(field, table));
            NonZeroU32::MIN
        })
    }

    /// A duration that must not be zero.
    fn positive(
        &mut self,
        field: &Option<Spanned<Duration>>,
        key: &'static str,
        default: Duration,
        table: &Loc,
    ) -> Duration {
        let value = or(field, default);
        if value.is_zero() {
            self.out_of_range(
                key,
                "longer than 0s",
                HumanDuration(value),
                &loc_of(field, table),
            );
            return default;
        }
        value
    }

    fn out_of_range(&mut self, key: &'static str, bound: &str, found: impl ToString, loc: &Loc) {
        self.push(CompileError::OutOfRange {
            key,
            bound: bound.into(),
            found: found.to_string(),
            loc: loc.clone(),
        });
    }

    fn unknown_name(&mut self, what: &'static str, name: &str, known: &[String], loc: &Loc) {
        let refs: Vec<&str> = known.iter().map(String::as_str).collect();
        self.push(CompileError::UnknownName {
            what,
            name: name.into(),
            suggestion: did_you_mean(name, &refs).map(Into::into),
            known: known.to_vec(),
            loc: loc.clone(),
        });
    }

    fn policy(&mut self, doc: &Document) -> Policy {
        if let Some(v) = &doc.version
            && v.value != 1
        {
            self.invalid(
                &v.loc,
                format!("unsupported policy version {}", v.value),
                Some("this sluice reads version 1"),
            );
        }
        let tenant = self.tenant(doc.tenant.as_ref().map(|s| &s.value), &doc.loc);
        let model = self.model(doc.model.as_ref().map(|s| &s.value));
        let mut policy = Policy {
            name: doc.name.as_ref().map(|s| s.value.clone()),
            tenant,
            model,
            default_backend: String::new(),
            backends: Vec::new(),
            routes: Vec::new(),
            outlier: self.enabled(&doc.outlier, |cx, raw| cx.outlier(raw)),
            breaker: None,
            tokens: self.enabled(&doc.tokens, |cx, raw| cx.tokens(raw)),
            retry: self.enabled(&doc.retry, |cx, raw| cx.retry(raw)),
            failover: self.enabled(&doc.failover, |cx, raw| cx.failover(raw)),
        };
        policy.backends = self.backends(doc);
        let names: Vec<String> = policy.backends.iter().map(|b| b.name.clone()).collect();
        policy.default_backend = match &doc.default_backend {
            Some(d) if !names.contains(&d.value) => {
                self.unknown_name("backend", &d.value, &names, &d.loc);
                d.value.clone()
            }
            Some(d) => d.value.clone(),
            None => names.first().cloned().unwrap_or_default(),
        };
        policy.routes = self.routes(doc, &names);
        policy.breaker = self.global_breaker.take();
        if let Some(raw) = &doc.failover
            && policy.failover.is_some()
        {
            self.check_failover_zones(&raw.value, &policy.backends);
        }
        self.check_quota_caps(doc, &policy);
        policy
    }

    /// Compiles a section unless it is absent or says `enabled = false`.
    fn enabled<R: HasEnabled, T>(
        &mut self,
        raw: &Option<Spanned<R>>,
        compile: impl FnOnce(&mut Self, &R) -> T,
    ) -> Option<T> {
        let raw = &raw.as_ref()?.value;
        raw.enabled().then(|| compile(self, raw))
    }

    fn tenant(&mut self, raw: Option<&raw::Tenant>, doc_loc: &Loc) -> TenantIdentity {
        let default = raw::Tenant {
            loc: doc_loc.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let missing = or(&raw.missing, dflt::TENANT_MISSING.to_string());
        let source = match or(&raw.from, raw::TenantFrom::Header) {
            raw::TenantFrom::Header => {
                if let Some(names) = &raw.names {
                    self.invalid(
                        &names.loc,
                        "`names` applies only to `from = \"api-key\"`",
                        Some("remove it, or identify tenants by API key"),
                    );
                }
                let header = or(&raw.header, dflt::TENANT_HEADER.to_string());
                self.check_header_name(&header, &loc_of(&raw.header, &raw.loc));
                TenantSource::Header {
                    header: header.to_ascii_lowercase(),
                }
            }
            raw::TenantFrom::ApiKey => {
                if let Some(h) = &raw.header {
                    self.invalid(
                        &h.loc,
                        "`header` applies only to `from = \"header\"`",
                        Some("API keys are read from `authorization: Bearer …` or `x-api-key`"),
                    );
                }
                let names = raw
                    .names
                    .as_ref()
                    .map(|m| m.value.0.as_slice())
                    .unwrap_or_default();
                let names = names
                    .iter()
                    .map(|(hash, tenant)| {
                        if !is_key_hash(&hash.value) {
                            self.invalid(&hash.loc, format!("`{}` is not an API key hash", hash.value), Some("write `key-` and 16 hex digits, as `sluice hash-key` prints; never the key itself"));
                        }
                        ApiKeyName { hash: hash.value.clone(), tenant: tenant.value.clone() }
                    })
                    .collect();
                TenantSource::ApiKey { names }
            }
        };
        TenantIdentity { source, missing }
    }

    fn check_header_name(&mut self, name: &str, loc: &Loc) {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !name.starts_with(':');
        if !valid {
            self.invalid(
                loc,
                format!("`{name}` is not a valid header name"),
                Some("use letters, digits and `-`, like `x-tenant-id`"),
            );
        }
    }

    fn model(&mut self, raw: Option<&raw::Model>) -> ModelSource {
        let default = raw::Model::default();
        let raw = raw.unwrap_or(&default);
        let header = or(&raw.header, dflt::MODEL_HEADER.to_string());
        self.check_header_name(&header, &loc_of(&raw.header, &raw.loc));
        ModelSource {
            from: match or(&raw.from, raw::ModelFrom::Body) {
                raw::ModelFrom::Body => cfg::ModelFrom::Body,
                raw::ModelFrom::Header => cfg::ModelFrom::Header,
            },
            header: header.to_ascii_lowercase(),
            default: raw.default.as_ref().map(|s| s.value.clone()),
        }
    }

    fn backends(&mut self, doc: &Document) -> Vec<cfg::Backend> {
        let Some(list) = &doc.backend else {
            self.invalid(&doc.loc, "the policy declares no backend", Some("add a `[[backend]]` table with a `name`, `models` and at least one `[[backend.zone]]`"));
            return Vec::new();
        };
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
            });
        }
        // Breakers resolve fallback backends, so they compile once all
        // backends are known; the global section first, so that its errors
        // are reported once, at its own keys.
        let snapshot = backends.clone();
        self.global_breaker = match &doc.breaker {
            Some(raw) if raw.value.enabled() => Some(self.breaker(&raw.value, &snapshot)),
            _ => None,
        };
        for (backend, raw) in backends
            .iter_mut()
            .zip(list.value.iter().filter(|r| r.name.is_some()))
        {
            backend.breaker =
                self.overridden(&doc.breaker, &raw.breaker, |cx, r| cx.breaker(r, &snapshot));
        }
        backends
    }

    /// The effective section for one backend: the global section with the
    /// backend's keys laid over it (a backend may also switch a capability on
    /// or off for itself). Errors already reported for the global section are
    /// not repeated.
    fn overridden<R: Overlay + HasEnabled + Default, T>(
        &mut self,
        global: &Option<Spanned<R>>,
        local: &Option<Spanned<R>>,
        compile: impl FnOnce(&mut Self, &R) -> T,
    ) -> Option<T> {
        let merged = match (global, local) {
            (None, None) => return None,
            (Some(g), None) => g.value.clone(),
            (None, Some(l)) => R::default().overlay(&l.value),
            (Some(g), Some(l)) => g.value.overlay(&l.value),
        };
        if !merged.enabled() {
            return None;
        }
        let before = self.errors.len();
        let compiled = compile(self, &merged);
        let new: Vec<CompileError> = self.errors.drain(before..).collect();
        for e in new {
            if !self.errors.contains(&e) {
                self.errors.push(e);
            }
        }
        Some(compiled)
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

    fn check_name(&mut self, what: &'static str, name: &str, loc: &Loc) {
        let valid = !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
            });
        if !valid {
            self.invalid(loc, format!("{what} name `{name}` is not valid"), Some("use lowercase letters, digits, `-`, `_` and `.`: it becomes part of Envoy cluster and metric names"));
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
            });
        }
        if list.value.is_empty() {
            self.invalid(&list.loc, format!("backend `{backend}` has no zone"), None);
        }
        zones
    }

    fn routes(&mut self, doc: &Document, backends: &[String]) -> Vec<cfg::Route> {
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

    fn matcher(&mut self, raw: Option<&raw::Match>) -> cfg::Match {
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

    fn ratio_above_zero(
        &mut self,
        field: &Option<Spanned<Ratio>>,
        key: &'static str,
        default: Ratio,
        table: &Loc,
    ) -> Ratio {
        let value = or(field, default);
        if value.get() <= 0.0 {
            self.out_of_range(key, "above 0%", value, &loc_of(field, table));
            return default;
        }
        value
    }

    fn outlier(&mut self, raw: &raw::Outlier) -> OutlierConfig {
        let l = &raw.loc;
        let base = self.positive(
            &raw.base_ejection_time,
            "base_ejection_time",
            dflt::OUTLIER_BASE_EJECTION,
            l,
        );
        let max = self.positive(
            &raw.max_ejection_time,
            "max_ejection_time",
            dflt::OUTLIER_MAX_EJECTION,
            l,
        );
        if max < base {
            self.out_of_range(
                "max_ejection_time",
                &format!("at least `base_ejection_time` ({})", HumanDuration(base)),
                HumanDuration(max),
                &loc_of(&raw.max_ejection_time, l),
            );
        }
        OutlierConfig {
            interval: self.positive(&raw.interval, "interval", dflt::OUTLIER_INTERVAL, l),
            consecutive_errors: or(&raw.consecutive_errors, dflt::OUTLIER_CONSECUTIVE_ERRORS),
            consecutive_429: or(&raw.consecutive_429, dflt::OUTLIER_CONSECUTIVE_429),
            failure_rate: self.ratio_above_zero(
                &raw.failure_rate,
                "failure_rate",
                dflt::OUTLIER_FAILURE_RATE,
                l,
            ),
            min_requests: or(&raw.min_requests, dflt::OUTLIER_MIN_REQUESTS),
            slow_ttft: self.positive(&raw.slow_ttft, "slow_ttft", dflt::SLOW_TTFT, l),
            slow_tpot: self.positive(&raw.slow_tpot, "slow_tpot", dflt::SLOW_TPOT, l),
            slow_rate: self.ratio_above_zero(
                &raw.slow_rate,
                "slow_rate",
                dflt::OUTLIER_SLOW_RATE,
                l,
            ),
            base_ejection_time: base,
            max_ejection_time: max,
            max_ejection: or(&raw.max_ejection, dflt::OUTLIER_MAX_EJECTION_SHARE),
        }
    }

    fn breaker(&mut self, raw: &raw::Breaker, backends: &[cfg::Backend]) -> BreakerConfig {
        let l = &raw.loc;
        let mode = match or(&raw.mode, raw::BreakerModeKind::Rate) {
            raw::BreakerModeKind::Consecutive => cfg::BreakerMode::Consecutive {
                failures: self.nonzero(
                    &raw.consecutive_failures,
                    "consecutive_failures",
                    dflt::BREAKER_CONSECUTIVE_FAILURES,
                    l,
                ),
            },
            raw::BreakerModeKind::Rate => {
                let window = match or(
                    &raw.window,
                    crate::decode::WindowSpec::Calls(dflt::BREAKER_WINDOW_CALLS),
                ) {
                    crate::decode::WindowSpec::Calls(n) => {
                        Window::Calls(NonZeroU32::new(n).unwrap_or_else(|| {
                            self.out_of_range(
                                "window",
                                "at least 1 call",
                                0,
                                &loc_of(&raw.window, l),
                            );
                            NonZeroU32::MIN
                        }))
                    }
                    crate::decode::WindowSpec::Time(d) => {
                        if d < Duration::from_secs(1) {
                            self.out_of_range(
                                "window",
                                "at least 1s",
                                HumanDuration(d),
                                &loc_of(&raw.window, l),
                            );
                        }
                        Window::Time(d)
                    }
                };
                let min_calls =
                    self.nonzero(&raw.min_calls, "min_calls", dflt::BREAKER_MIN_CALLS, l);
                if let Window::Calls(n) = window
                    && min_calls > n
                {
                    self.out_of_range(
                        "min_calls",
                        &format!("at most the window ({n} calls)"),
                        min_calls,
                        &loc_of(&raw.min_calls, l),
                    );
                }
                cfg::BreakerMode::Rate {
                    window,
                    min_calls,
                    failure_rate: self.ratio_above_zero(
                        &raw.failure_rate,
                        "failure_rate",
                        dflt::BREAKER_FAILURE_RATE,
                        l,
                    ),
                    slow_rate: self.ratio_above_zero(
                        &raw.slow_rate,
                        "slow_rate",
                        dflt::BREAKER_SLOW_RATE,
                        l,
                    ),
                }
            }
            raw::BreakerModeKind::Adaptive => {
                let k = or(&raw.k, dflt::ADAPTIVE_K);
                if !(1.0..=10.0).contains(&k) {
                    self.out_of_range("k", "between 1.0 and 10.0", k, &loc_of(&raw.k, l));
                }
                let window = match or(
                    &raw.window,
                    crate::decode::WindowSpec::Time(dflt::ADAPTIVE_WINDOW),
                ) {
                    crate::decode::WindowSpec::Time(d) if !d.is_zero() => d,
                    _ => {
                        self.invalid(
                            &loc_of(&raw.window, l),
                            "adaptive throttling needs a time window",
                            Some("write a duration, like \"2m\""),
                        );
                        dflt::ADAPTIVE_WINDOW
                    }
                };
                cfg::BreakerMode::Adaptive {
                    k,
                    window,
                    max_reject: self.ratio_above_zero(
                        &raw.max_reject,
                        "max_reject",
                        dflt::ADAPTIVE_MAX_REJECT,
                        l,
                    ),
                }
            }
        };
        let open_for = self.positive(&raw.open_for, "open_for", dflt::BREAKER_OPEN_FOR, l);
        let max_open_for = self.positive(
            &raw.max_open_for,
            "max_open_for",
            dflt::BREAKER_MAX_OPEN_FOR,
            l,
        );
        if max_open_for < open_for {
            self.out_of_range(
                "max_open_for",
                &format!("at least `open_for` ({})", HumanDuration(open_for)),
                HumanDuration(max_open_for),
                &loc_of(&raw.max_open_for, l),
            );
        }
        let backoff = or(&raw.backoff, dflt::BREAKER_BACKOFF);
        if !(1.0..=10.0).contains(&backoff) {
            self.out_of_range(
                "backoff",
                "between 1.0 and 10.0",
                backoff,
                &loc_of(&raw.backoff, l),
            );
        }
        let failure_on = or(&raw.failure_on, dflt::BREAKER_FAILURE_ON.to_vec())
            .into_iter()
            .map(failure_kind)
            .collect();
        BreakerConfig {
            mode,
            scope: match or(&raw.scope, raw::BreakerScope::BackendModel) {
                raw::BreakerScope::BackendModel => cfg::BreakerScope::BackendModel,
                raw::BreakerScope::Endpoint => cfg::BreakerScope::Endpoint,
            },
            failure_on,
            slow_ttft: self.positive(&raw.slow_ttft, "slow_ttft", dflt::SLOW_TTFT, l),
            slow_tpot: self.positive(&raw.slow_tpot, "slow_tpot", dflt::SLOW_TPOT, l),
            open_for,
            max_open_for,
            backoff,
            jitter: or(&raw.jitter, dflt::BREAKER_JITTER),
            half_open_probes: self.nonzero(
                &raw.half_open_probes,
                "half_open_probes",
                dflt::BREAKER_HALF_OPEN_PROBES,
                l,
            ),
            bulkhead: self.bulkhead(raw.bulkhead.as_ref().map(|b| &b.value), l),
            degrade: self.degrade(raw.degrade.as_ref().map(|d| &d.value), l, backends),
        }
    }

    fn bulkhead(&mut self, raw: Option<&raw::Bulkhead>, parent: &Loc) -> BulkheadConfig {
        let default = raw::Bulkhead {
            loc: parent.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let l = &raw.loc;
        let max_in_flight = self.nonzero(
            &raw.max_in_flight,
            "max_in_flight",
            dflt::BULKHEAD_MAX_IN_FLIGHT,
            l,
        );
        let per_tenant = raw.max_in_flight_per_tenant.as_ref().map(|_| {
            self.nonzero(
                &raw.max_in_flight_per_tenant,
                "max_in_flight_per_tenant",
                1,
                l,
            )
        });
        let tenants = raw
            .tenants
            .as_ref()
            .map(|m| {
                m.value
                    .0
                    .iter()
                    .map(|(tenant, cap)| {
                        let cap = NonZeroU32::new(cap.value).unwrap_or_else(|| {
                            self.out_of_range("tenants", "at least 1", 0, &cap.loc);
                            NonZeroU32::MIN
                        });
                        TenantLimit {
                            tenant: tenant.value.clone(),
                            max_in_flight: cap,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let queue = or(&raw.queue, dflt::BULKHEAD_QUEUE);
        let max_wait = or(&raw.max_wait, dflt::BULKHEAD_MAX_WAIT);
        if queue > 0 && max_wait.is_zero() {
            self.invalid(
                &loc_of(&raw.queue, l),
                "a queue with `max_wait = \"0s\"` never lets anyone wait",
                Some("set `max_wait`, for example \"2s\", or remove `queue`"),
            );
        }
        BulkheadConfig {
            max_in_flight,
            max_in_flight_per_tenant: per_tenant,
            tenants,
            queue,
            max_wait,
        }
    }

    fn degrade(
        &mut self,
        raw: Option<&raw::Degrade>,
        parent: &Loc,
        backends: &[cfg::Backend],
    ) -> DegradeConfig {
        let default = raw::Degrade {
            loc: parent.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let l = &raw.loc;
        let action = match or(&raw.action, raw::DegradeActionKind::FailFast) {
            raw::DegradeActionKind::FailFast => DegradeAction::FailFast,
            raw::DegradeActionKind::FallbackModel => {
                let model = self
                    .required(&raw.fallback_model, "fallback_model", l)
                    .unwrap_or_default();
                let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
                let backend = match &raw.fallback_backend {
                    Some(b) => {
                        if !names.contains(&b.value) {
                            self.unknown_name("backend", &b.value, &names, &b.loc);
                        }
                        b.value.clone()
                    }
                    None => match backends
                        .iter()
                        .find(|b| b.models.iter().any(|p| p.matches(&model)))
                    {
                        Some(b) => b.name.clone(),
                        None => {
                            if raw.fallback_model.is_some() {
                                self.invalid(&loc_of(&raw.fallback_model, l), format!("no backend serves the fallback model `{model}`"), Some("add it to a backend's `models`, or name `fallback_backend`"));
                            }
                            String::new()
                        }
                    },
                };
                DegradeAction::FallbackModel { model, backend }
            }
            raw::DegradeActionKind::Static => DegradeAction::Static {
                text: self
                    .required(&raw.static_text, "static_text", l)
                    .unwrap_or_default(),
            },
        };
        DegradeConfig {
            action,
            retry_after: or(&raw.retry_after, dflt::DEGRADE_RETRY_AFTER),
        }
    }

    fn tokens(&mut self, raw: &raw::Tokens) -> TokensConfig {
        let l = &raw.loc;
        let chars_per_token = self.chars_per_token(
            or(&raw.chars_per_token, dflt::CHARS_PER_TOKEN),
            &loc_of(&raw.chars_per_token, l),
        );
        let model_chars_per_token = raw
            .model_chars_per_token
            .as_ref()
            .map(|m| {
                m.value
                    .0
                    .iter()
                    .map(|(p, r)| {
                        (
                            Pattern::new(p.value.clone()),
                            self.chars_per_token(r.value, &r.loc),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let default_max_tokens = self.nonzero(
            &raw.default_max_tokens,
            "default_max_tokens",
            dflt::DEFAULT_MAX_TOKENS,
            l,
        );
        let max_body = or(&raw.max_body, ByteSize(dflt::MAX_BODY));
        if max_body.0 < 1024 || max_body.0 > 64 << 20 {
            self.out_of_range(
                "max_body",
                "between 1KiB and 64MiB",
                max_body,
                &loc_of(&raw.max_body, l),
            );
        }
        let quotas = raw
            .quota
            .as_ref()
            .map(|q| q.value.iter().map(|q| self.quota(q)).collect())
            .unwrap_or_default();
        TokensConfig {
            chars_per_token,
            model_chars_per_token,
            default_max_tokens,
            max_body,
            on_large_body: match or(&raw.on_large_body, raw::LargeBody::Reject) {
                raw::LargeBody::Reject => cfg::LargeBody::Reject,
                raw::LargeBody::Estimate => cfg::LargeBody::Estimate,
            },
            include_usage: or(&raw.include_usage, true),
            ietf_headers: or(&raw.ietf_headers, false),
            max_keys: self.nonzero(&raw.max_keys, "max_keys", dflt::MAX_KEYS, l),
            quotas,
        }
    }

    fn chars_per_token(&mut self, value: f64, loc: &Loc) -> f64 {
        if !(0.5..=20.0).contains(&value) {
            self.out_of_range("chars_per_token", "between 0.5 and 20", value, loc);
            return dflt::CHARS_PER_TOKEN;
        }
        value
    }

    fn quota(&mut self, raw: &raw::Quota) -> Quota {
        let l = &raw.loc;
        let tokens: Vec<Rate> = raw
            .tokens
            .as_ref()
            .map(|t| t.value.iter().map(|r| r.value).collect())
            .unwrap_or_default();
        let mut periods: Vec<Duration> = Vec::new();
        for r in raw.tokens.iter().flat_map(|t| &t.value) {
            if periods.contains(&r.value.period) {
                self.invalid(
                    &r.loc,
                    format!(
                        "two token limits over the same period ({})",
                        HumanDuration(r.value.period)
                    ),
                    Some("keep one limit per period"),
                );
            }
            periods.push(r.value.period);
        }
        let max_completion_tokens = raw
            .max_completion_tokens
            .as_ref()
            .map(|_| self.nonzero(&raw.max_completion_tokens, "max_completion_tokens", 1, l));
        let concurrent_streams = raw
            .concurrent_streams
            .as_ref()
            .map(|_| self.nonzero(&raw.concurrent_streams, "concurrent_streams", 1, l));
        if tokens.is_empty() && raw.requests.is_none() && concurrent_streams.is_none() {
            self.invalid(
                l,
                "this quota limits nothing",
                Some("set `tokens`, `requests` or `concurrent_streams`"),
            );
        }
        Quota {
            matcher: self.matcher(raw.matcher.as_ref().map(|m| &m.value)),
            tokens,
            requests: raw.requests.as_ref().map(|r| r.value),
            concurrent_streams,
            max_completion_tokens,
            over_cap: match or(&raw.over_cap, raw::OverCap::Reject) {
                raw::OverCap::Reject => cfg::OverCap::Reject,
                raw::OverCap::Clamp => cfg::OverCap::Clamp,
            },
            burst: raw.burst.as_ref().map(|b| b.value.0),
        }
    }

    /// Every token limit and burst must hold the largest completion a request
    /// may reserve, or such requests could never be admitted.
    fn check_quota_caps(&mut self, doc: &Document, policy: &Policy) {
        let (Some(raw), Some(tokens)) = (&doc.tokens, &policy.tokens) else {
            return;
        };
        let raws = raw
            .value
            .quota
            .as_ref()
            .map(|q| q.value.as_slice())
            .unwrap_or_default();
        for (q, rq) in tokens.quotas.iter().zip(raws) {
            let cap = u64::from(
                q.max_completion_tokens
                    .unwrap_or(tokens.default_max_tokens)
                    .get(),
            );
            if let (Some(burst), Some(b)) = (q.burst, &rq.burst)
                && burst < cap
            {
                self.push(CompileError::BelowCompletionCap {
                    key: "burst",
                    found: burst,
                    cap,
                    loc: b.loc.clone(),
                });
            }
            for r in rq.tokens.iter().flat_map(|t| &t.value) {
                if r.value.amount < cap {
                    self.push(CompileError::BelowCompletionCap {
                        key: "tokens",
                        found: r.value.amount,
                        cap,
                        loc: r.loc.clone(),
                    });
                }
            }
        }
    }

    fn retry(&mut self, raw: &raw::Retry) -> RetryConfig {
        let l = &raw.loc;
        let base = self.positive(
            &raw.backoff_base,
            "backoff_base",
            dflt::RETRY_BACKOFF_BASE,
            l,
        );
        let max = or(&raw.backoff_max, base * 10);
        if max < base {
            self.out_of_range(
                "backoff_max",
                &format!("at least `backoff_base` ({})", HumanDuration(base)),
                HumanDuration(max),
                &loc_of(&raw.backoff_max, l),
            );
        }
        let max_retries = or(&raw.max_retries, dflt::RETRY_MAX_RETRIES);
        if max_retries > 10 {
            self.out_of_range(
                "max_retries",
                "at most 10",
                max_retries,
                &loc_of(&raw.max_retries, l),
            );
        }
        let retry_on: Vec<cfg::FailureKind> = or(&raw.retry_on, dflt::RETRY_ON.to_vec())
            .into_iter()
            .map(failure_kind)
            .collect();
        if retry_on.is_empty() && max_retries > 0 {
            self.invalid(&loc_of(&raw.retry_on, l), "`retry_on` is empty, so nothing is ever retried", Some("list conditions such as \"5xx\", \"reset\", \"connect-failure\", or set `max_retries = 0`"));
        }
        RetryConfig {
            budget: or(&raw.budget, dflt::RETRY_BUDGET),
            min_retries_per_second: or(&raw.min_retries_per_second, dflt::RETRY_MIN_PER_SECOND),
            ttl: self.positive(&raw.ttl, "ttl", dflt::RETRY_TTL, l),
            max_retries,
            retry_on,
            backoff_base: base,
            backoff_max: max,
            honor_retry_after: or(&raw.honor_retry_after, true),
        }
    }

    fn failover(&mut self, raw: &raw::Failover) -> FailoverConfig {
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
            cross_region: or(&raw.cross_region, true),
        }
    }

    /// Zones named by `[failover]` must exist in some backend.
    fn check_failover_zones(&mut self, raw: &raw::Failover, backends: &[cfg::Backend]) {
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

/// Sections that can be switched off with `enabled = false`.
pub trait HasEnabled {
    fn enabled(&self) -> bool;
}

macro_rules! has_enabled {
    ($($t:ty),*) => { $(impl HasEnabled for $t { fn enabled(&self) -> bool { or(&self.enabled, true) } })* };
}
has_enabled!(
    raw::Outlier,
    raw::Breaker,
    raw::Tokens,
    raw::Retry,
    raw::Failover
);

fn failure_kind(k: raw::FailureKind) -> cfg::FailureKind {
    match k {
        raw::FailureKind::Status5xx => cfg::FailureKind::Status5xx,
        raw::FailureKind::GatewayError => cfg::FailureKind::GatewayError,
        raw::FailureKind::Status429 => cfg::FailureKind::Status429,
        raw::FailureKind::Reset => cfg::FailureKind::Reset,
        raw::FailureKind::ConnectFailure => cfg::FailureKind::ConnectFailure,
        raw::FailureKind::Timeout => cfg::FailureKind::Timeout,
    }
}

/// `key-` followed by 16 lowercase hex digits.
pub fn is_key_hash(s: &str) -> bool {
    s.strip_prefix("key-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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
