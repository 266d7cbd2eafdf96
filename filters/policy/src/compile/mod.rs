//! Compiling a raw [`Document`] into a validated [`Policy`].
//!
//! This is the second of the two steps (decode, then compile): defaults are
//! filled in, per-backend overrides are laid over the global sections, names
//! are resolved, and ranges and cross-field rules are checked. Every error
//! found is kept, each with the place it points at.
//!
//! One `Compiler` collects the errors; each capability's rules live in
//! their own file, mirroring `sluice-core`'s layout, so that a section's
//! checks are read and changed next to nothing else. This file holds the
//! driver, the error type and the checks every section shares (required
//! keys, ranges, overrides).

mod backends;
mod breaker;
pub(crate) mod failover;
mod identity;
mod outlier;
mod retry;
mod tokens;

pub use identity::is_key_hash;

use std::num::NonZeroU32;
use std::time::Duration;

use sluice_core::config::{self as cfg, BreakerConfig, Policy};
use sluice_core::units::{HumanDuration, Ratio};

use crate::decode::{Overlay, Spanned, did_you_mean};
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
        self.check_failover_backends(doc, &policy.backends);
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
