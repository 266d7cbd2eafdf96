//! A CRD's `openAPIV3Schema` (Kubernetes' structural-schema dialect of
//! OpenAPI 3.0) in two forms:
//!
//! - a plain JSON Schema (draft 4, which OpenAPI 3.0 schemas follow) for the
//!   `jsonschema` crate, with Kubernetes' extensions translated into standard
//!   keywords;
//! - a tree of the structural nodes (`properties`, `items`,
//!   `additionalProperties`) carrying what JSON Schema cannot say: list types
//!   (`x-kubernetes-list-type`) and CEL rules (`x-kubernetes-validations`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use serde_json::{Map, Value, json};

use crate::kcel::{self, CelShape, FieldShape};
use crate::{Check, Problem};

/// Formats the API server checks on strings (kube-openapi's registry). Others,
/// like `int32`, `int64`, `float` and `double`, are width hints it does not
/// enforce, so they are dropped. Of this list the Istio CRDs use `date-time`
/// only; the `jsonschema` crate checks it as RFC 3339.
const CHECKED_FORMATS: &[&str] = &["date-time"];

/// Translates a structural schema node. `structural` is false inside
/// `allOf`/`anyOf`/`oneOf`/`not`, whose `properties` constrain values without
/// declaring fields (so they must not close objects to unknown fields).
pub(crate) fn to_json_schema(node: &Value, structural: bool) -> Value {
    let Value::Object(fields) = node else {
        return node.clone();
    };
    let flag = |name: &str| fields.get(name).and_then(Value::as_bool) == Some(true);
    let mut out = Map::new();
    for (key, value) in fields {
        let translated = match key.as_str() {
            "properties" => Value::Object(
                value
                    .as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(name, p)| (name.clone(), to_json_schema(p, structural)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" => to_json_schema(value, structural),
            "allOf" | "anyOf" | "oneOf" => Value::Array(
                value
                    .as_array()
                    .map(|branches| branches.iter().map(|b| to_json_schema(b, false)).collect())
                    .unwrap_or_default(),
            ),
            "not" => to_json_schema(value, false),
            "format" => match value.as_str() {
                Some(f) if CHECKED_FORMATS.contains(&f) => value.clone(),
                _ => continue,
            },
            // Annotations, and extensions handled below or in the rule tree.
            "description" | "default" | "example" | "nullable" => continue,
            k if k.starts_with("x-kubernetes-") => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), translated);
    }
    if flag("nullable") {
        if let Some(Value::String(t)) = out.get("type") {
            let t = t.clone();
            out.insert("type".into(), json!([t, "null"]));
        }
        if let Some(Value::Array(options)) = out.get_mut("enum")
            && !options.contains(&Value::Null)
        {
            options.push(Value::Null);
        }
    }
    if flag("x-kubernetes-int-or-string") {
        out.remove("type");
        out.entry("anyOf")
            .or_insert_with(|| json!([{"type": "integer"}, {"type": "string"}]));
    }
    // The API server drops fields its schema does not declare, and with
    // strict field validation (kubectl's default) rejects them: close every
    // structural object that does not preserve unknown fields.
    let is_object = fields.get("type").and_then(Value::as_str) == Some("object");
    if structural
        && is_object
        && !flag("x-kubernetes-preserve-unknown-fields")
        && !out.contains_key("additionalProperties")
    {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

/// `x-kubernetes-list-type`.
#[derive(Debug, Clone, PartialEq)]
enum ListType {
    /// Items are unique.
    Set,
    /// Items are objects unique by these keys.
    Map(Vec<String>),
}

/// One `x-kubernetes-validations` entry.
pub(crate) struct Rule {
    source: String,
    compiled: kcel::Compiled,
    message: Option<String>,
    message_expression: Option<kcel::Compiled>,
    field_path: Option<String>,
}

/// A structural schema node with what the JSON Schema pass cannot check.
#[derive(Default)]
pub(crate) struct Node {
    json_type: Option<String>,
    preserve_unknown: bool,
    list_type: Option<ListType>,
    rules: Vec<Rule>,
    properties: BTreeMap<String, Node>,
    items: Option<Box<Node>>,
    additional: Option<Box<Node>>,
}

impl Node {
    /// Builds the tree, compiling every rule; `at` names the node in errors.
    pub(crate) fn build(schema: &Value, env: &Arc<cel::Env>, at: &str) -> anyhow::Result<Node> {
        let mut node = Node {
            json_type: schema
                .get("type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            preserve_unknown: schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                == Some(true),
            ..Node::default()
        };
        node.list_type = match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            None | Some("atomic") => None,
            Some("set") => Some(ListType::Set),
            Some("map") => {
                let keys: Vec<String> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|keys| {
                        keys.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                if keys.is_empty() {
                    return Err(anyhow!(
                        "{at}: list type map without x-kubernetes-list-map-keys"
                    ));
                }
                Some(ListType::Map(keys))
            }
            Some(other) => return Err(anyhow!("{at}: unknown x-kubernetes-list-type {other:?}")),
        };
        if let Some(rules) = schema.get("x-kubernetes-validations") {
            let rules = rules
                .as_array()
                .ok_or_else(|| anyhow!("{at}: x-kubernetes-validations is not a list"))?;
            for rule in rules {
                node.rules.push(Rule::build(rule, env, at)?);
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, p) in props {
                node.properties
                    .insert(name.clone(), Node::build(p, env, &format!("{at}.{name}"))?);
            }
        }
        if let Some(items) = schema.get("items") {
            node.items = Some(Box::new(Node::build(items, env, &format!("{at}[]"))?));
        }
        if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            node.additional = Some(Box::new(Node::build(additional, env, &format!("{at}.*"))?));
        }
        Ok(node)
    }

    /// Number of rules in this subtree: (run on create, transition-only).
    pub(crate) fn rule_counts(&self) -> (usize, usize) {
        let transition = self.rules.iter().filter(|r| r.compiled.transition).count();
        let mut counts = (self.rules.len() - transition, transition);
        let children = self
            .properties
            .values()
            .chain(self.items.as_deref())
            .chain(self.additional.as_deref());
        for child in children {
            let (a, b) = child.rule_counts();
            counts.0 += a;
            counts.1 += b;
        }
        counts
    }

    /// Whether `value` has the JSON type this node declares (rules only run on
    /// values the schema pass accepted the type of).
    fn type_matches(&self, value: &Value) -> bool {
        match self.json_type.as_deref() {
            None => true,
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some(_) => false,
        }
    }

    /// Checks list types and runs the rules of this subtree on `value`.
    pub(crate) fn check(
        &self,
        value: &Value,
        path: &str,
        env: &Arc<cel::Env>,
        problems: &mut Vec<Problem>,
    ) {
        if value.is_null() || !self.type_matches(value) {
            return;
        }
        if let (Some(list_type), Some(items)) = (&self.list_type, value.as_array()) {
            check_list(list_type, items, path, problems);
        }
        if !self.rules.is_empty() {
            let this = kcel::to_cel(value, Some(self));
            for rule in &self.rules {
                rule.check(&this, path, env, problems);
            }
        }
        match value {
            Value::Object(fields) => {
                for (name, v) in fields {
                    let child = self.properties.get(name).or(self.additional.as_deref());
                    if let Some(child) = child {
                        child.check(v, &join(path, name), env, problems);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(child) = &self.items {
                    for (i, v) in items.iter().enumerate() {
                        child.check(v, &format!("{path}[{i}]"), env, problems);
                    }
                }
            }
            _ => {}
        }
    }
}

impl CelShape for Node {
    fn json_type(&self) -> Option<&str> {
        self.json_type.as_deref()
    }

    fn field(&self, name: &str) -> FieldShape<'_, Self> {
        if let Some(p) = self.properties.get(name) {
            FieldShape::Typed(p)
        } else if let Some(a) = &self.additional {
            FieldShape::Typed(a)
        } else if self.preserve_unknown || self.json_type.is_none() {
            FieldShape::Untyped
        } else {
            FieldShape::Unknown
        }
    }

    fn items(&self) -> Option<&Self> {
        self.items.as_deref()
    }
}

impl Rule {
    fn build(rule: &Value, env: &Arc<cel::Env>, at: &str) -> anyhow::Result<Rule> {
        let text = |key: &str| rule.get(key).and_then(Value::as_str).map(str::to_owned);
        let source = text("rule").ok_or_else(|| anyhow!("{at}: validation without a rule"))?;
        let compiled =
            kcel::compile(env, &source).with_context(|| format!("{at}: CEL rule {source:?}"))?;
        let message_expression = match text("messageExpression") {
            Some(expr) => Some(
                kcel::compile(env, &expr)
                    .with_context(|| format!("{at}: CEL messageExpression {expr:?}"))?,
            ),
            None => None,
        };
        Ok(Rule {
            source,
            compiled,
            message: text("message"),
            message_expression,
            field_path: text("fieldPath"),
        })
    }

    fn check(
        &self,
        this: &cel::Value,
        path: &str,
        env: &Arc<cel::Env>,
        problems: &mut Vec<Problem>,
    ) {
        if self.compiled.transition {
            return;
        }
        let path = match &self.field_path {
            Some(field_path) => format!("{path}{field_path}"),
            None => path.to_owned(),
        };
        let check = Check::Cel {
            rule: self.source.clone(),
        };
        let message = match kcel::run(env, &self.compiled.program, this) {
            Ok(cel::Value::Bool(true)) => return,
            Ok(cel::Value::Bool(false)) => self.message(this, env),
            Ok(other) => format!("rule evaluated to {other:?}, not a bool"),
            Err(e) => format!("rule could not be evaluated: {e}"),
        };
        problems.push(Problem {
            path,
            check,
            message,
        });
    }

    /// `messageExpression` if it yields a string, else `message`, else
    /// Kubernetes' default, `failed rule: <rule>`.
    fn message(&self, this: &cel::Value, env: &Arc<cel::Env>) -> String {
        if let Some(expr) = &self.message_expression
            && let Ok(cel::Value::String(s)) = kcel::run(env, &expr.program, this)
            && !s.trim().is_empty()
        {
            return s.to_string();
        }
        match &self.message {
            Some(m) => m.clone(),
            None => format!("failed rule: {}", self.source),
        }
    }
}

/// Unique items for `set`, unique key tuples for `map` (a missing key is a
/// distinct "unset" value), as the API server checks them.
fn check_list(list_type: &ListType, items: &[Value], path: &str, problems: &mut Vec<Problem>) {
    let keys: Vec<String> = items
        .iter()
        .map(|item| match list_type {
            ListType::Map(keys) => {
                let tuple: Vec<Value> = keys
                    .iter()
                    .map(|k| item.get(k).cloned().unwrap_or(Value::Null))
                    .collect();
                Value::Array(tuple).to_string()
            }
            _ => item.to_string(),
        })
        .collect();
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].contains(key) {
            let shown = match list_type {
                ListType::Map(names) => format!("{} {key}", names.join(",")),
                _ => key.clone(),
            };
            problems.push(Problem {
                path: format!("{path}[{i}]"),
                check: Check::ListType,
                message: format!("Duplicate value: {shown}"),
            });
        }
    }
}

/// Appends a field to a Kubernetes-style path (`spec.ports[0].name`).
pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}
