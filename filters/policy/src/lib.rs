//! sluice-policy: the policy language mesh admins write.
//!
//! A policy is read in two steps, shared by the `sluice` CLI and every filter
//! so that what `sluice validate` accepts is exactly what a filter accepts:
//!
//! 1. **decode**: TOML (written by hand) or JSON (what Istio's `pluginConfig`
//!    becomes) is parsed into a located tree and decoded into the raw structs
//!    of [`raw`], reporting every type error and unknown key at once;
//! 2. **compile**: the raw document becomes a validated
//!    [`sluice_core::config::Policy`] through `TryFrom`, filling defaults
//!    ([`defaults`]), applying per-backend overrides and checking ranges and
//!    cross-field rules, again reporting every error.
//!
//! Errors come back as [`Diagnostics`]: file, line, column and a hint for
//! TOML; a JSON pointer for JSON.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod compile;
pub mod decode;
pub mod defaults;
pub mod diagnostic;
pub mod explain;
pub mod node;
pub mod raw;
pub mod units;

pub use compile::{CompileError, CompileErrors, HasEnabled, is_key_hash};
pub use diagnostic::{Diagnostic, Diagnostics, Format, LineCol, Loc, Source};
pub use sluice_core::config::Policy;

use decode::{Decode, Decoder};

/// Reads a policy from its text, in either syntax; errors are in the order
/// of the text.
pub fn parse(source: Source) -> Result<Policy, Diagnostics> {
    parse_unsorted(source).map_err(|mut d| {
        d.items.sort_by_key(|i| {
            (
                i.loc.span.as_ref().map_or(usize::MAX, |s| s.start),
                i.loc.pointer.clone(),
            )
        });
        d
    })
}

fn parse_unsorted(source: Source) -> Result<Policy, Diagnostics> {
    let tree = match source.format {
        Format::Toml => node::from_toml(&source.text),
        Format::Json => node::from_json(&source.text),
    };
    let tree = match tree {
        Ok(tree) => tree,
        Err(items) => return Err(Diagnostics { source, items }),
    };
    let mut decoder = Decoder::default();
    let doc = raw::Document::decode(&tree, &mut decoder);
    if !decoder.errors.is_empty() {
        return Err(Diagnostics {
            source,
            items: decoder.errors,
        });
    }
    let Some(doc) = doc else {
        return Err(Diagnostics {
            source,
            items: decoder.errors,
        });
    };
    Policy::try_from(&doc).map_err(|errors| Diagnostics {
        items: errors.0.iter().map(CompileError::to_diagnostic).collect(),
        source,
    })
}

/// Reads a policy from TOML text; `name` is what messages call the file.
pub fn parse_toml(name: &str, text: &str) -> Result<Policy, Diagnostics> {
    parse(Source::new(name, text, Format::Toml))
}

/// Reads a policy from JSON text (Istio's `pluginConfig`).
pub fn parse_json(name: &str, text: &str) -> Result<Policy, Diagnostics> {
    parse(Source::new(name, text, Format::Json))
}

/// Reads a filter's configuration bytes: JSON when they start with `{`
/// (Istio), TOML otherwise (an Envoy `StringValue`).
pub fn parse_config_bytes(name: &str, bytes: &[u8]) -> Result<Policy, Diagnostics> {
    let text = String::from_utf8_lossy(bytes);
    let format = if text.trim_start().starts_with('{') {
        Format::Json
    } else {
        Format::Toml
    };
    parse(Source::new(name, text.into_owned(), format))
}

/// The module that enforces every capability (`sluice.wasm`), and its
/// name in Envoy's configuration (filter name, `root_id`, `vm_id`).
pub const MODULE: &str = "sluice";

/// The capabilities a policy can switch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Outlier,
    Breaker,
    Tokens,
    Retry,
    Failover,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Outlier,
        Capability::Breaker,
        Capability::Tokens,
        Capability::Retry,
        Capability::Failover,
    ];

    /// The policy section that configures it.
    pub fn section(self) -> &'static str {
        match self {
            Capability::Outlier => "outlier",
            Capability::Breaker => "breaker",
            Capability::Tokens => "tokens",
            Capability::Retry => "retry",
            Capability::Failover => "failover",
        }
    }

    /// Whether `sluice.wasm` enforces this capability yet. Until it does,
    /// the section is accepted but `explain` and `render` say plainly that it
    /// is not enforced: nothing may look protected that is not.
    pub fn is_enforced(self) -> bool {
        matches!(self, Capability::Tokens | Capability::Breaker)
    }

    /// Whether `policy` switches it on.
    pub fn is_enabled_in(self, policy: &Policy) -> bool {
        match self {
            Capability::Outlier => {
                policy.outlier.is_some() || policy.backends.iter().any(|b| b.outlier.is_some())
            }
            Capability::Breaker => {
                policy.breaker.is_some() || policy.backends.iter().any(|b| b.breaker.is_some())
            }
            Capability::Tokens => policy.tokens.is_some(),
            Capability::Retry => {
                policy.retry.is_some() || policy.backends.iter().any(|b| b.retry.is_some())
            }
            Capability::Failover => policy.failover.is_some(),
        }
    }
}
