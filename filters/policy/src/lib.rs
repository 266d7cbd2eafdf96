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
/// (Istio), TOML otherwise (an Envoy `StringValue`). Bytes that are not
/// UTF-8 are an error, as they are for `sluice validate`.
pub fn parse_config_bytes(name: &str, bytes: &[u8]) -> Result<Policy, Diagnostics> {
    let format = if String::from_utf8_lossy(bytes).trim_start().starts_with('{') {
        Format::Json
    } else {
        Format::Toml
    };
    parse_bytes(name, bytes, format)
}

/// Reads a policy from bytes as stored in a file. A policy is UTF-8 text:
/// anything else is reported at its first invalid byte (line and column)
/// rather than read with replacement characters, which would accept a
/// policy whose names or values are not what the file says.
pub fn parse_bytes(name: &str, bytes: &[u8], format: Format) -> Result<Policy, Diagnostics> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(Source::new(name, text, format)),
        Err(e) => Err(not_utf8(name, bytes, format, &e)),
    }
}

/// The diagnostic for bytes that are not UTF-8, located at the first bad
/// byte. The text kept for rendering is the lossy decoding: its prefix up to
/// that byte is the file's own, so line, column and caret are exact there.
fn not_utf8(name: &str, bytes: &[u8], format: Format, e: &std::str::Utf8Error) -> Diagnostics {
    let at = e.valid_up_to();
    let message = match (bytes.get(at), e.error_len()) {
        (Some(byte), Some(_)) => {
            format!("not valid UTF-8: byte 0x{byte:02X} is not part of a character")
        }
        _ => "not valid UTF-8: the text ends inside a character".to_string(),
    };
    let loc = Loc {
        pointer: String::new(),
        // The replacement character the lossy text has there.
        span: Some(at..at + char::REPLACEMENT_CHARACTER.len_utf8()),
    };
    let hint = "policies must be UTF-8 text; convert the file, for example with `iconv -f latin1 -t utf-8`";
    Diagnostics {
        source: Source::new(name, String::from_utf8_lossy(bytes).into_owned(), format),
        items: vec![Diagnostic::new(&loc, message).with_hint(hint)],
    }
}

/// The module that enforces every capability (`sluice.wasm`), and its
/// name in Envoy's configuration (filter name, `root_id`, `vm_id`).
pub const MODULE: &str = "sluice";

/// The `root_id` of `sluice.wasm` as a cluster's upstream filter, where it
/// observes each attempt (the engine's `ATTEMPT_ROOT_ID`).
pub const ATTEMPT_ROOT_ID: &str = "sluice.attempt";

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

    /// Whether `sluice.wasm` enforces this capability yet. A capability
    /// that is not is accepted, but `explain` and `render` say plainly that
    /// it is not enforced: nothing may look protected that is not. Every
    /// capability is enforced today; a new one starts here as `false`.
    pub fn is_enforced(self) -> bool {
        match self {
            Capability::Tokens
            | Capability::Breaker
            | Capability::Outlier
            | Capability::Retry
            | Capability::Failover => true,
        }
    }

    /// Whether it learns from each upstream attempt (retries included), so
    /// the render adds `sluice.wasm` as an upstream filter of the clusters:
    /// outlier's endpoint records, retry's per-zone budgets, and failover's
    /// zone health (each attempt's zone, status and time to first token).
    pub fn learns_from_attempts(self) -> bool {
        matches!(
            self,
            Capability::Outlier | Capability::Retry | Capability::Failover
        )
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
            Capability::Failover => {
                policy.failover.is_some() || policy.backends.iter().any(|b| b.failover.is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(d: &Diagnostics) -> (usize, usize, &str) {
        let item = &d.items[0];
        let lc = d.line_col(item).unwrap();
        (lc.line, lc.column, item.message.as_str())
    }

    #[test]
    fn a_byte_that_is_not_utf8_is_located() {
        // "é" in UTF-8 before the bad byte: columns count characters.
        let bytes = b"name = \"caf\xc3\xa9\"\n[tenant]\nmissing = \"ano\xe9nyme\"\n";
        let d = parse_bytes("p.toml", bytes, Format::Toml).unwrap_err();
        assert_eq!(d.items.len(), 1);
        assert_eq!(
            place(&d),
            (
                3,
                15,
                "not valid UTF-8: byte 0xE9 is not part of a character"
            )
        );
        assert!(
            d.items[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("must be UTF-8")
        );
        let rendered = d.render(false);
        assert!(rendered.contains("--> p.toml:3:15"), "{rendered}");
    }

    #[test]
    fn text_cut_inside_a_character_is_located_at_its_start() {
        let bytes = b"name = \"x\"\n# caf\xc3";
        let d = parse_bytes("p.toml", bytes, Format::Toml).unwrap_err();
        assert_eq!(
            place(&d),
            (2, 6, "not valid UTF-8: the text ends inside a character")
        );
    }

    #[test]
    fn a_filter_rejects_configuration_bytes_that_are_not_utf8() {
        let json = b"{\"name\": \"\xff\"}";
        let d = parse_config_bytes("plugin", json).unwrap_err();
        assert_eq!(d.source.format, Format::Json);
        assert_eq!(
            place(&d),
            (
                1,
                11,
                "not valid UTF-8: byte 0xFF is not part of a character"
            )
        );
    }
}
