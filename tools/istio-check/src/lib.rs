//! Offline validation of Istio manifests against Istio's own
//! CustomResourceDefinitions, judging them as the Kubernetes API server would
//! on create: the `openAPIV3Schema` (with Kubernetes' structural-schema
//! extensions), list types, the CEL rules in `x-kubernetes-validations`, and
//! the object's `apiVersion`, `kind` and `metadata`.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let validator = istio_check::Validator::load(&istio_check::default_schema_dir()?)?;
//! let manifest = serde_json::json!({
//!     "apiVersion": "extensions.istio.io/v1alpha1",
//!     "kind": "WasmPlugin",
//!     "metadata": {"name": "sluice"},
//!     "spec": {"url": "oci://registry/sluice:1", "priority": "high"},
//! });
//! if let Err(problems) = validator.validate(&manifest) {
//!     for p in problems {
//!         eprintln!("{p}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Istio's validating webhook (Go code in istiod) checks more than its CRDs
//! say; that part is out of reach here.

mod gourl;
mod kcel;
mod schema;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// The environment variable naming the directory of Istio CRDs.
pub const SCHEMAS_ENV: &str = "SLUICE_ISTIO_SCHEMAS";

/// One reason a manifest is rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Where, as Kubernetes writes it: `spec.match[0].ports[0].number`.
    /// Empty for the whole object.
    pub path: String,
    /// Which check failed.
    pub check: Check,
    /// What failed, in words.
    pub message: String,
}

/// The check a [`Problem`] comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Not an object, or `apiVersion`/`kind` missing or of no loaded CRD.
    Kind,
    /// `metadata`: name, namespace, labels, annotations.
    Metadata,
    /// The OpenAPI schema; `keyword` is the JSON Schema keyword that failed
    /// (`type`, `required`, `pattern`, `additionalProperties`, ...).
    Schema { keyword: String },
    /// `x-kubernetes-list-type` `set` or `map`: duplicate items.
    ListType,
    /// A CEL rule of `x-kubernetes-validations` (false, or failed to run).
    Cel { rule: String },
    /// A document of a YAML text that could not be read.
    Yaml,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Kind => f.write_str("kind"),
            Check::Metadata => f.write_str("metadata"),
            Check::Schema { keyword } => write!(f, "schema: {keyword}"),
            Check::ListType => f.write_str("list type"),
            Check::Cel { rule } => write!(f, "CEL rule `{rule}`"),
            Check::Yaml => f.write_str("YAML"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<object>"
        } else {
            &self.path
        };
        write!(f, "{path}: {} [{}]", self.message, self.check)
    }
}

/// One served version of one CRD.
struct Kind {
    schema: jsonschema::Validator,
    tree: schema::Node,
}

/// The schemas of the loaded CRDs, by (group, version, kind).
pub struct Validator {
    kinds: BTreeMap<(String, String, String), Kind>,
    env: Arc<cel::Env>,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validator")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The Istio reference data: `$SLUICE_ISTIO_SCHEMAS` if set, else
/// `shared/istio` beside the workspace (`<workspace root>/../shared/istio`).
pub fn default_schema_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os(SCHEMAS_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/istio"),
    };
    if !dir.is_dir() {
        bail!(
            "no Istio CRDs at {}: set {SCHEMAS_ENV} to the directory holding the *-crd.yaml files \
             (in this project, shared/istio beside the repository)",
            dir.display()
        );
    }
    Ok(dir)
}

impl Validator {
    /// Loads every `*-crd.yaml` in `dir`. Every served version's schema must
    /// compile, and so must every CEL rule in it: a rule this validator cannot
    /// run is an error here, never skipped.
    pub fn load(dir: &Path) -> anyhow::Result<Validator> {
        let env =
            kcel::kubernetes_env().map_err(|e| anyhow!("building the CEL environment: {e}"))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("-crd.yaml"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no *-crd.yaml in {}", dir.display());
        }
        let mut kinds = BTreeMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            for crd in yaml_documents(&text) {
                let crd = crd.map_err(|e| anyhow!("{}: {e}", file.display()))?;
                load_crd(&crd, &env, &mut kinds)
                    .with_context(|| format!("loading {}", file.display()))?;
            }
        }
        Ok(Validator { kinds, env })
    }

    /// The (group, version, kind) triples this validator knows.
    pub fn kinds(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.kinds
            .keys()
            .map(|(g, v, k)| (g.as_str(), v.as_str(), k.as_str()))
    }

    /// How many CEL rules the loaded schemas hold, over all kinds and
    /// versions: (run on create, transition rules that only apply to updates).
    pub fn cel_rule_count(&self) -> (usize, usize) {
        self.kinds.values().fold((0, 0), |(a, b), kind| {
            let (x, y) = kind.tree.rule_counts();
            (a + x, b + y)
        })
    }

    /// Validates one manifest (a JSON object as `kubectl apply` would send).
    pub fn validate(&self, manifest: &Value) -> Result<(), Vec<Problem>> {
        let problem = |path: &str, check: Check, message: String| Problem {
            path: path.to_owned(),
            check,
            message,
        };
        let Some(object) = manifest.as_object() else {
            return Err(vec![problem(
                "",
                Check::Kind,
                "a manifest must be an object".into(),
            )]);
        };
        let field = |name: &str| {
            object
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let (Some(api_version), Some(kind_name)) = (field("apiVersion"), field("kind")) else {
            return Err(vec![problem(
                "",
                Check::Kind,
                "apiVersion and kind are required".into(),
            )]);
        };
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let key = (group.to_owned(), version.to_owned(), kind_name.to_owned());
        let Some(kind) = self.kinds.get(&key) else {
            let known: Vec<String> = self
                .kinds
                .keys()
                .filter(|(_, _, k)| k == kind_name)
                .map(|(g, v, _)| format!("{g}/{v}"))
                .collect();
            let hint = if known.is_empty() {
                "no CRD of this kind is loaded".to_owned()
            } else {
                format!("this kind is served as {}", known.join(", "))
            };
            return Err(vec![problem(
                "",
                Check::Kind,
                format!("unknown kind {kind_name} in {api_version}: {hint}"),
            )]);
        };

        let mut problems = Vec::new();
        check_metadata(object.get("metadata"), &mut problems);
        for error in kind.schema.iter_errors(manifest) {
            schema_problems(&error, &mut problems);
        }
        kind.tree.check(manifest, "", &self.env, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Validates every non-empty document of a multi-document YAML text, in
    /// the order of [`yaml_documents`]; a document that is not YAML (or has
    /// non-string keys) is rejected with a [`Check::Yaml`] problem.
    pub fn validate_yaml_documents(&self, text: &str) -> Vec<Result<(), Vec<Problem>>> {
        yaml_documents(text)
            .into_iter()
            .map(|doc| match doc {
                Ok(doc) => self.validate(&doc),
                Err(message) => Err(vec![Problem {
                    path: String::new(),
                    check: Check::Yaml,
                    message,
                }]),
            })
            .collect()
    }
}

/// The non-empty documents of a multi-document YAML text, as JSON, each
/// parsed on its own so that one broken document does not hide the others.
///
/// YAML is read by `serde_yaml` (libyaml's rules, YAML 1.2 types), where
/// Kubernetes tools use go-yaml (YAML 1.1 types, and a more lenient scanner):
/// an unquoted `yes` is a string here and a boolean there, and a plain scalar
/// ending in `:` inside a flow sequence (`[001:db8::]`) is an error here.
pub fn yaml_documents(text: &str) -> Vec<Result<Value, String>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |doc: &mut String| {
        if !doc.trim().is_empty() {
            match serde_yaml::from_str::<Value>(doc) {
                Ok(Value::Null) => {}
                Ok(value) => docs.push(Ok(value)),
                Err(e) => docs.push(Err(format!("not YAML: {e}"))),
            }
        }
        doc.clear();
    };
    for line in text.lines() {
        // A marker at column 0 can only be a document boundary: block
        // scalars are indented, and a flow scalar cannot hold one.
        if line == "---" || line.starts_with("--- ") || line == "..." {
            flush(&mut current);
            current.push_str(line.strip_prefix("---").unwrap_or_default());
        } else {
            current.push_str(line);
        }
        current.push('\n');
    }
    flush(&mut current);
    docs
}

fn load_crd(
    crd: &Value,
    env: &Arc<cel::Env>,
    kinds: &mut BTreeMap<(String, String, String), Kind>,
) -> anyhow::Result<()> {
    if crd.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
        bail!("not a CustomResourceDefinition");
    }
    let spec = crd.get("spec").ok_or_else(|| anyhow!("CRD without spec"))?;
    let text = |v: Option<&Value>, what: &str| {
        v.and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("CRD without {what}"))
    };
    let group = text(spec.get("group"), "spec.group")?;
    let kind_name = text(spec.pointer("/names/kind"), "spec.names.kind")?;
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("CRD without spec.versions"))?;
    for version in versions {
        let name = text(version.get("name"), "a version name")?;
        if version.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let at = format!("{kind_name} {group}/{name}");
        let source = version
            .pointer("/schema/openAPIV3Schema")
            .ok_or_else(|| anyhow!("{at}: no schema.openAPIV3Schema"))?;
        let mut translated = schema::to_json_schema(source, true);
        // Every object has these, whatever its schema says; metadata is
        // checked on its own, as the API server checks ObjectMeta.
        if let Some(props) = translated
            .get_mut("properties")
            .and_then(Value::as_object_mut)
        {
            props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
            props.insert("kind".into(), serde_json::json!({"type": "string"}));
            props.insert("metadata".into(), serde_json::json!({"type": "object"}));
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            // Kubernetes matches `pattern` with Go's RE2: the `regex` crate
            // is the same family (no backtracking, no lookaround).
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(&translated)
            .map_err(|e| anyhow!("{at}: schema does not compile: {e}"))?;
        let tree = schema::Node::build(source, env, &at)?;
        kinds.insert(
            (group.clone(), name, kind_name.clone()),
            Kind {
                schema: validator,
                tree,
            },
        );
    }
    Ok(())
}

/// Turns one `jsonschema` error into problems with Kubernetes-style paths.
fn schema_problems(error: &jsonschema::ValidationError<'_>, problems: &mut Vec<Problem>) {
    use jsonschema::error::ValidationErrorKind as K;
    use jsonschema::paths::LocationSegment;

    let mut path = String::new();
    for segment in error.instance_path().iter() {
        match segment {
            LocationSegment::Property(name) => path = schema::join(&path, &name),
            LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    let keyword = error.kind().keyword().to_owned();
    let check = Check::Schema {
        keyword: keyword.clone(),
    };
    match error.kind() {
        K::Required { property } => problems.push(Problem {
            path: schema::join(&path, property.as_str().unwrap_or_default()),
            check,
            message: "Required value".into(),
        }),
        K::AdditionalProperties { unexpected } => {
            for name in unexpected {
                problems.push(Problem {
                    path: schema::join(&path, name),
                    check: check.clone(),
                    message: "unknown field".into(),
                });
            }
        }
        _ => problems.push(Problem {
            path,
            check,
            message: error.to_string(),
        }),
    }
}

const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
];

/// ObjectMeta as the API server checks it on create, in part: a name that is
/// a DNS-1123 subdomain (as for every custom resource), a namespace that is a
/// DNS-1123 label, labels and annotations as string maps with valid keys (and
/// valid label values), and no unknown fields.
fn check_metadata(metadata: Option<&Value>, problems: &mut Vec<Problem>) {
    let mut problem = |path: String, message: String| {
        problems.push(Problem {
            path,
            check: Check::Metadata,
            message,
        })
    };
    let Some(meta) = metadata.and_then(Value::as_object) else {
        problem("metadata.name".into(), "Required value".into());
        return;
    };
    match meta.get("name") {
        None => problem(
            "metadata.name".into(),
            "Required value: name is required".into(),
        ),
        Some(Value::String(name)) => {
            if let Err(why) = dns1123_subdomain(name) {
                problem(
                    "metadata.name".into(),
                    format!("Invalid value: {name:?}: {why}"),
                );
            }
        }
        Some(_) => problem("metadata.name".into(), "must be a string".into()),
    }
    match meta.get("namespace") {
        None => {}
        Some(Value::String(ns)) => {
            if let Err(why) = dns1123_label(ns) {
                problem(
                    "metadata.namespace".into(),
                    format!("Invalid value: {ns:?}: {why}"),
                );
            }
        }
        Some(_) => problem("metadata.namespace".into(), "must be a string".into()),
    }
    for (field, labels) in [("labels", true), ("annotations", false)] {
        let Some(map) = meta.get(field) else { continue };
        let Some(map) = map.as_object() else {
            problem(
                format!("metadata.{field}"),
                "must be a map of strings".into(),
            );
            continue;
        };
        for (key, value) in map {
            let at = format!("metadata.{field}.{key}");
            if let Err(why) = qualified_name(key) {
                problem(at.clone(), format!("Invalid key: {why}"));
            }
            match value.as_str() {
                None => problem(at, "must be a string".into()),
                Some(v) if labels => {
                    if let Err(why) = label_value(v) {
                        problem(at, format!("Invalid value: {v:?}: {why}"));
                    }
                }
                Some(_) => {}
            }
        }
    }
    for key in meta.keys() {
        if !METADATA_FIELDS.contains(&key.as_str()) {
            problem(format!("metadata.{key}"), "unknown field".into());
        }
    }
}

fn alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    let ok = !s.is_empty()
        && s.starts_with(alnum_lower)
        && s.ends_with(alnum_lower)
        && s.chars().all(|c| alnum_lower(c) || c == '-');
    if ok {
        Ok(())
    } else {
        Err(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character"
                .into(),
        )
    }
}

/// Dot-separated DNS-1123 labels, at most 253 characters.
fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if s.split('.').all(|label| dns1123_label(label).is_ok()) {
        Ok(())
    } else {
        Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
                .into(),
        )
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn name_part(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|why| format!("prefix part {why}"))?;
    }
    if name_part(name) {
        Ok(())
    } else {
        Err(
            "name part must consist of alphanumeric characters, '-', '_' or '.', must start and \
             end with an alphanumeric character, and be at most 63 characters"
                .into(),
        )
    }
}

/// Empty, or a name part.
fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || name_part(v) {
        Ok(())
    } else {
        Err(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', must start and end with an alphanumeric character, and be at most 63 \
             characters"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(dns1123_subdomain("bookinfo-ratings.v1").is_ok());
        assert!(dns1123_subdomain("Invalid").is_err());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain("-a").is_err());
        assert!(dns1123_label("a.b").is_err());
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("istio*").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("bar*").is_err());
    }
}
