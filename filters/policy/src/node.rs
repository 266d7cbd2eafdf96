//! A located value tree, the common ground of TOML and JSON policies.
//!
//! Both syntaxes are first turned into [`Node`]s that remember where they
//! came from; the decoder then walks that tree once, whatever the syntax,
//! collecting every error instead of stopping at the first as a derived
//! `serde::Deserialize` would.

use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Diagnostic, Loc};

/// A value and where it is.
#[derive(Clone, Debug)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Node>),
    /// Entries in source order; each key carries its own location.
    Table(Vec<Entry>),
    /// A TOML date or time: valid syntax, never a valid policy value.
    Datetime,
    /// JSON `null`.
    Null,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub key: String,
    /// Location of the key itself (where "unknown key" points).
    pub key_loc: Loc,
    pub node: Node,
}

impl Value {
    /// The name of this kind of value in messages ("a string", "a table").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
            Value::Datetime => "a date",
            Value::Null => "null",
        }
    }
}

/// Parses TOML text into a tree; syntax errors are all reported.
pub fn from_toml(text: &str) -> Result<Node, Vec<Diagnostic>> {
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| {
                let loc = Loc {
                    pointer: String::new(),
                    span: e.span(),
                };
                Diagnostic::new(&loc, format!("invalid TOML: {}", e.message().trim()))
            })
            .collect());
    }
    let root = Loc {
        pointer: String::new(),
        span: Some(doc.span()),
    };
    Ok(Node {
        value: toml_table(doc.get_ref(), &root),
        loc: root,
    })
}

fn toml_table(table: &DeTable<'_>, at: &Loc) -> Value {
    let entries = table
        .iter()
        .map(|(key, value)| {
            let key_loc = at.child(key.get_ref(), Some(key.span()));
            let loc = at.child(key.get_ref(), Some(value.span()));
            Entry {
                key: key.get_ref().to_string(),
                key_loc,
                node: toml_node(value.get_ref(), loc),
            }
        })
        .collect();
    Value::Table(entries)
}

fn toml_node(value: &DeValue<'_>, loc: Loc) -> Node {
    let value = match value {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Value::Int(n),
            // Out of i64's range: keep it as a float so range checks report it.
            Err(_) => Value::Float(i.as_str().parse().unwrap_or(f64::INFINITY)),
        },
        DeValue::Float(f) => Value::Float(f.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(_) => Value::Datetime,
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let loc = loc.child(&i.to_string(), Some(item.span()));
                    toml_node(item.get_ref(), loc)
                })
                .collect(),
        ),
        DeValue::Table(t) => toml_table(t, &loc),
    };
    Node { value, loc }
}

/// Parses JSON text into a tree. JSON nodes carry pointers, not spans;
/// a syntax error carries the span serde_json reports.
pub fn from_json(text: &str) -> Result<Node, Vec<Diagnostic>> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => Ok(json_node(&v, Loc::default())),
        Err(e) => {
            let span = offset_of(text, e.line(), e.column()).map(|o| o..o);
            let loc = Loc {
                pointer: String::new(),
                span,
            };
            Err(vec![Diagnostic::new(&loc, format!("invalid JSON: {e}"))])
        }
    }
}

fn json_node(value: &serde_json::Value, loc: Loc) -> Node {
    use serde_json::Value as J;
    let value = match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| json_node(item, loc.child(&i.to_string(), None)))
                .collect(),
        ),
        J::Object(map) => Value::Table(
            map.iter()
                .map(|(k, v)| Entry {
                    key: k.clone(),
                    key_loc: loc.child(k, None),
                    node: json_node(v, loc.child(k, None)),
                })
                .collect(),
        ),
    };
    Node { value, loc }
}

/// Byte offset of a 1-based line and column, as serde_json counts them.
fn offset_of(text: &str, line: usize, column: usize) -> Option<usize> {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let offset = line_start + column.saturating_sub(1);
    (offset <= text.len()).then_some(offset)
}
