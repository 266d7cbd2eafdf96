//! Decoding a [`Node`] tree into the raw policy structs.
//!
//! Hand-rolled rather than `#[derive(Deserialize)]` for one reason: a policy
//! author should see every mistake in a file at once, each pointing at its
//! place, and serde stops at the first. The decoder keeps going: a value of
//! the wrong type or an unknown key becomes a [`Diagnostic`] and decoding
//! carries on with the next field.

use std::time::Duration;

use sluice_core::units::{ByteSize, Rate, Ratio};

use crate::diagnostic::{Diagnostic, Loc};
use crate::node::{Entry, Node, Value};
use crate::units;

/// A decoded value and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub loc: Loc,
}

/// Collects the diagnostics of one decoding pass.
#[derive(Debug, Default)]
pub struct Decoder {
    pub errors: Vec<Diagnostic>,
}

impl Decoder {
    pub fn error(&mut self, loc: &Loc, message: impl Into<String>) {
        self.errors.push(Diagnostic::new(loc, message));
    }

    pub fn error_hint(&mut self, loc: &Loc, message: impl Into<String>, hint: impl Into<String>) {
        self.errors
            .push(Diagnostic::new(loc, message).with_hint(hint));
    }

    fn wrong_type(&mut self, node: &Node, expected: &str) {
        self.error(
            &node.loc,
            format!("expected {expected}, found {}", node.value.kind()),
        );
    }
}

/// A type that can be read from a node, reporting what is wrong when not.
pub trait Decode: Sized {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self>;
}

/// Reads the keys of one table, remembering which ones the schema knows so
/// that the rest can be reported as unknown, with a suggestion.
pub struct TableReader<'a> {
    entries: &'a [Entry],
    known: Vec<&'static str>,
}

impl<'a> TableReader<'a> {
    /// Opens `node` as a table, or reports that it is not one.
    pub fn open(node: &'a Node, d: &mut Decoder) -> Option<Self> {
        match &node.value {
            Value::Table(entries) => Some(Self {
                entries,
                known: Vec::new(),
            }),
            _ => {
                d.wrong_type(node, "a table");
                None
            }
        }
    }

    /// The value of `key`, decoded; `None` when absent or invalid (reported).
    pub fn field<T: Decode>(&mut self, key: &'static str, d: &mut Decoder) -> Option<Spanned<T>> {
        self.known.push(key);
        let entry = self.entries.iter().find(|e| e.key == key)?;
        let value = T::decode(&entry.node, d)?;
        Some(Spanned {
            value,
            loc: entry.node.loc.clone(),
        })
    }

    /// Reports every key the schema did not ask for.
    pub fn finish(self, d: &mut Decoder) {
        for entry in self.entries {
            if self.known.contains(&entry.key.as_str()) {
                continue;
            }
            let message = format!("unknown key `{}`", entry.key);
            match did_you_mean(&entry.key, &self.known) {
                Some(best) => {
                    d.error_hint(&entry.key_loc, message, format!("did you mean `{best}`?"))
                }
                None => d.error_hint(
                    &entry.key_loc,
                    message,
                    format!("expected one of {}", quoted_list(&self.known)),
                ),
            }
        }
    }
}

/// The known name closest to `unknown`, when it is close enough to be a typo.
pub fn did_you_mean<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// `"a"`, `"b"` and `"c"` spelled for a message.
pub fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    match quoted.split_last() {
        None => "nothing".into(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Defines a raw policy table: a struct whose fields are all optional and
/// located, and its [`Decode`] and [`Overlay`] impls. A field decodes from
/// the key of the same name unless `= "key"` names another.
macro_rules! raw_table {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident $(= $key:literal)? : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: Option<$crate::decode::Spanned<$ty>>, )*
            /// Where the table itself is.
            pub loc: $crate::diagnostic::Loc,
        }

        impl $crate::decode::Decode for $name {
            fn decode(node: &$crate::node::Node, d: &mut $crate::decode::Decoder) -> Option<Self> {
                let mut t = $crate::decode::TableReader::open(node, d)?;
                let value = Self {
                    $( $field: t.field(raw_table!(@key $field $($key)?), d), )*
                    loc: node.loc.clone(),
                };
                t.finish(d);
                Some(value)
            }
        }

        impl $crate::decode::Overlay for $name {
            fn overlay(&self, over: &Self) -> Self {
                Self {
                    $( $field: $crate::decode::overlay_field(&self.$field, &over.$field), )*
                    loc: over.loc.clone(),
                }
            }
        }
    };
    (@key $field:ident $key:literal) => { $key };
    (@key $field:ident) => { stringify!($field) };
}
pub(crate) use raw_table;

/// Defines a keyword enum's spellings and its [`Decode`] impl, which
/// suggests the closest spelling for a typo.
macro_rules! keywords {
    ($name:ident { $($spelling:literal => $variant:ident),* $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const SPELLINGS: &'static [&'static str] = &[$($spelling),*];
        }

        impl $crate::decode::Decode for $name {
            fn decode(node: &$crate::node::Node, d: &mut $crate::decode::Decoder) -> Option<Self> {
                let s = <String as $crate::decode::Decode>::decode(node, d)?;
                match s.as_str() {
                    $($spelling => Some(Self::$variant),)*
                    _ => {
                        $crate::decode::unknown_keyword(node, &s, Self::SPELLINGS, d);
                        None
                    }
                }
            }
        }

        impl $crate::decode::Overlay for $name {}
    };
}
pub(crate) use keywords;

/// Reports `found` as not one of `expected`, suggesting the closest.
pub fn unknown_keyword(node: &Node, found: &str, expected: &[&'static str], d: &mut Decoder) {
    let message = format!("unknown value `{found}`");
    match did_you_mean(found, expected) {
        Some(best) => d.error_hint(&node.loc, message, format!("did you mean `{best}`?")),
        None => d.error_hint(
            &node.loc,
            message,
            format!("expected {}", quoted_list(expected)),
        ),
    }
}

/// Laying an override over a base: keys the override sets win, tables are
/// merged key by key.
pub trait Overlay: Clone {
    fn overlay(&self, over: &Self) -> Self {
        over.clone()
    }
}

/// Overlays one optional field.
pub fn overlay_field<T: Overlay>(
    base: &Option<Spanned<T>>,
    over: &Option<Spanned<T>>,
) -> Option<Spanned<T>> {
    match (base, over) {
        (Some(b), Some(o)) => Some(Spanned {
            value: b.value.overlay(&o.value),
            loc: o.loc.clone(),
        }),
        (b, None) => b.clone(),
        (None, o) => o.clone(),
    }
}

// ---- leaf values ---------------------------------------------------------

impl Decode for String {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                d.wrong_type(node, "a string");
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                d.wrong_type(node, "`true` or `false`");
                None
            }
        }
    }
}

/// An integer, also from a JSON double with no fraction (Istio sends numbers
/// as doubles).
fn integer(node: &Node, d: &mut Decoder) -> Option<i128> {
    match node.value {
        Value::Int(i) => Some(i128::from(i)),
        Value::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => Some(f as i128),
        _ => {
            d.wrong_type(node, "a whole number");
            None
        }
    }
}

impl Decode for u32 {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        let i = integer(node, d)?;
        u32::try_from(i).ok().or_else(|| {
            d.error(
                &node.loc,
                format!("{i} is out of range (0 to {})", u32::MAX),
            );
            None
        })
    }
}

impl Decode for u16 {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        let i = integer(node, d)?;
        u16::try_from(i).ok().or_else(|| {
            d.error(
                &node.loc,
                format!("{i} is out of range (0 to {})", u16::MAX),
            );
            None
        })
    }
}

impl Decode for f64 {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        match node.value {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) if f.is_finite() => Some(f),
            _ => {
                d.wrong_type(node, "a number");
                None
            }
        }
    }
}

/// Decodes a string through a unit parser, reporting its message with `hint`.
fn spelled<T>(
    node: &Node,
    d: &mut Decoder,
    what: &str,
    hint: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    let Value::Str(s) = &node.value else {
        d.error_hint(
            &node.loc,
            format!("expected a {what}, found {}", node.value.kind()),
            hint,
        );
        return None;
    };
    match parse(s) {
        Ok(v) => Some(v),
        Err(why) => {
            d.error_hint(&node.loc, format!("invalid {what}: {why}"), hint);
            None
        }
    }
}

impl Decode for Duration {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        spelled(
            node,
            d,
            "duration",
            "write a number and a unit: \"250ms\", \"30s\", \"5m\", \"2h\"",
            units::parse_duration,
        )
    }
}

impl Decode for Rate {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        spelled(
            node,
            d,
            "rate",
            "write an amount per period: \"60k/min\", \"600/min\", \"5M/day\"",
            units::parse_rate,
        )
    }
}

impl Decode for Ratio {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        spelled(
            node,
            d,
            "percentage",
            "write a percentage: \"20%\"",
            units::parse_percent,
        )
    }
}

impl Decode for ByteSize {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        if let Value::Int(_) = node.value {
            return integer(node, d)
                .and_then(|i| u64::try_from(i).ok())
                .map(ByteSize);
        }
        spelled(
            node,
            d,
            "size",
            "write a size: \"256KiB\", \"1MiB\"",
            units::parse_bytes,
        )
        .map(ByteSize)
    }
}

/// A count of tokens: an integer, or a string with a `k`/`M` suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u64);

impl Decode for Count {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        if let Value::Int(_) | Value::Float(_) = node.value {
            let i = integer(node, d)?;
            return match u64::try_from(i) {
                Ok(n) => Some(Count(n)),
                Err(_) => {
                    d.error(&node.loc, format!("{i} is negative"));
                    None
                }
            };
        }
        spelled(
            node,
            d,
            "count",
            "write a count: 50000 or \"50k\"",
            units::parse_count,
        )
        .map(Count)
    }
}

/// A sliding window: a number of calls (integer) or a duration (string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    Calls(u32),
    Time(Duration),
}

impl Decode for WindowSpec {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        match node.value {
            Value::Str(_) => Duration::decode(node, d).map(WindowSpec::Time),
            Value::Int(_) | Value::Float(_) => u32::decode(node, d).map(WindowSpec::Calls),
            _ => {
                d.wrong_type(node, "a number of calls (100) or a duration (\"60s\")");
                None
            }
        }
    }
}

/// A list, also written as a single item (`tenants = "acme"`).
impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        match &node.value {
            Value::Array(items) => {
                let before = d.errors.len();
                let decoded: Vec<T> = items.iter().filter_map(|item| T::decode(item, d)).collect();
                (d.errors.len() == before).then_some(decoded)
            }
            _ => T::decode(node, d).map(|one| vec![one]),
        }
    }
}

/// A list of located items, for lists whose entries are checked one by one
/// later (backend names, zone names).
impl<T: Decode> Decode for Spanned<T> {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        T::decode(node, d).map(|value| Spanned {
            value,
            loc: node.loc.clone(),
        })
    }
}

/// A table with free-form keys (tenant names, model patterns).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Map<T>(pub Vec<(Spanned<String>, Spanned<T>)>);

impl<T: Decode> Decode for Map<T> {
    fn decode(node: &Node, d: &mut Decoder) -> Option<Self> {
        let Value::Table(entries) = &node.value else {
            d.wrong_type(node, "a table");
            return None;
        };
        let items = entries
            .iter()
            .filter_map(|e| {
                let value = T::decode(&e.node, d)?;
                Some((
                    Spanned {
                        value: e.key.clone(),
                        loc: e.key_loc.clone(),
                    },
                    Spanned {
                        value,
                        loc: e.node.loc.clone(),
                    },
                ))
            })
            .collect();
        Some(Map(items))
    }
}

macro_rules! leaf_overlay {
    ($($t:ty),*) => { $(impl Overlay for $t {})* };
}
leaf_overlay!(
    String, bool, u16, u32, f64, Duration, Rate, Ratio, ByteSize, Count, WindowSpec
);
impl<T: Clone> Overlay for Vec<T> {}
impl<T: Clone> Overlay for Map<T> {}
impl<T: Clone> Overlay for Spanned<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::from_toml;

    raw_table! {
        pub struct Sample {
            size: u32,
            when = "timeout": Duration,
            names: Vec<String>,
        }
    }

    fn decode(text: &str) -> (Option<Sample>, Vec<Diagnostic>) {
        let node = from_toml(text).unwrap();
        let mut d = Decoder::default();
        let v = Sample::decode(&node, &mut d);
        (v, d.errors)
    }

    #[test]
    fn reports_every_error_not_just_the_first() {
        let (v, errors) = decode("size = \"big\"\ntimeout = \"3 weeks\"\nnmaes = []\n");
        let v = v.unwrap();
        assert!(v.size.is_none() && v.when.is_none());
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "expected a whole number, found a string",
                "invalid duration: `weeks` is not a duration unit",
                "unknown key `nmaes`"
            ]
        );
        assert_eq!(errors[2].hint.as_deref(), Some("did you mean `names`?"));
    }

    #[test]
    fn single_items_are_lists() {
        let (v, errors) = decode("names = \"a\"\n");
        assert!(errors.is_empty());
        assert_eq!(v.unwrap().names.unwrap().value, vec!["a".to_string()]);
    }

    #[test]
    fn overlay_keeps_base_keys_the_override_does_not_set() {
        let (base, _) = decode("size = 1\ntimeout = \"1s\"\n");
        let (over, _) = decode("size = 2\n");
        let merged = base.unwrap().overlay(&over.unwrap());
        assert_eq!(merged.size.unwrap().value, 2);
        assert_eq!(merged.when.unwrap().value, Duration::from_secs(1));
    }
}
