//! The policy text handed to `sluice.wasm`, edited like the rendered Envoy.
//!
//! The filter validates the text it is given, so it must be told what the
//! render changed: the endpoints given with `--endpoints` (an outlier detector
//! judges the endpoints Envoy really has, not the file's placeholders), and,
//! with `--native-outlier`, `--native-retry` or `--native-failover`, that
//! `[outlier]`, `[retry]` or `[failover]` is Envoy's job and not its own.
//! TOML is edited in place with `toml_edit`, so the admin's comments and
//! layout survive into the bootstrap; JSON (what Istio hands a filter) is
//! re-serialized. Either way the caller re-validates the result and checks
//! that it compiles to the policy the render used.

use anyhow::{Context, bail};
use serde_json::Value as Json;
use sluice_policy::Format;
use toml_edit::{Array, DocumentMut, Item, TableLike, Value};

/// New endpoints for one zone of one backend (`--endpoints B/Z=ADDRS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneEndpoints {
    pub backend: String,
    pub zone: String,
    pub endpoints: Vec<String>,
}

/// What to change in the policy text.
#[derive(Clone, Copy, Debug, Default)]
pub struct Edits<'a> {
    /// Zones whose `endpoints` are replaced, in order (a later entry for the
    /// same zone wins).
    pub endpoints: &'a [ZoneEndpoints],
    /// Remove the `[outlier]` table and every backend's `[backend.outlier]`.
    pub drop_outlier: bool,
    /// Remove the `[retry]` table and every backend's `[backend.retry]`.
    pub drop_retry: bool,
    /// Remove the `[failover]` table.
    pub drop_failover: bool,
}

impl Edits<'_> {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && !self.drop_outlier && !self.drop_retry && !self.drop_failover
    }

    /// The sections to remove, everywhere they appear.
    fn dropped(&self) -> Vec<&'static str> {
        let mut sections = Vec::new();
        if self.drop_outlier {
            sections.push("outlier");
        }
        if self.drop_retry {
            sections.push("retry");
        }
        if self.drop_failover {
            sections.push("failover");
        }
        sections
    }
}

/// `text` (a policy in `format`) with `edits` applied.
///
/// Fails when a named backend or zone is not in the text (the caller checks
/// names against the compiled policy first, so this means a document shape
/// the editor does not know) or when the text does not parse.
pub fn edit(text: &str, format: Format, edits: Edits<'_>) -> anyhow::Result<String> {
    if edits.is_empty() {
        return Ok(text.to_string());
    }
    match format {
        Format::Toml => edit_toml(text, edits),
        Format::Json => edit_json(text, edits),
    }
}

fn edit_toml(text: &str, edits: Edits<'_>) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text.parse().context("cannot parse the policy as TOML")?;
    for e in edits.endpoints {
        let zone = named_tables(doc.get_mut("backend"))
            .into_iter()
            .find(|b| has_name(&**b, &e.backend))
            .and_then(|b| {
                named_tables(b.get_mut("zone"))
                    .into_iter()
                    .find(|z| has_name(&**z, &e.zone))
            });
        let Some(zone) = zone else {
            bail!(
                "cannot find zone `{}` of backend `{}` in the policy text",
                e.zone,
                e.backend
            );
        };
        set_endpoints(zone, &e.endpoints);
    }
    for section in edits.dropped() {
        doc.remove(section);
        for backend in named_tables(doc.get_mut("backend")) {
            backend.remove(section);
        }
    }
    Ok(doc.to_string())
}

/// Every table of a list of tables, in whichever spelling the policy uses:
/// `[[backend]]`, `backend = [{ … }]`, or a single table (`[backend]`,
/// `backend = { … }`: the language reads one item as a list of one).
fn named_tables(item: Option<&mut Item>) -> Vec<&mut dyn TableLike> {
    match item {
        Some(Item::ArrayOfTables(tables)) => {
            tables.iter_mut().map(|t| t as &mut dyn TableLike).collect()
        }
        Some(Item::Table(table)) => vec![table as &mut dyn TableLike],
        Some(Item::Value(Value::Array(values))) => values
            .iter_mut()
            .filter_map(|v| v.as_inline_table_mut())
            .map(|t| t as &mut dyn TableLike)
            .collect(),
        Some(Item::Value(Value::InlineTable(table))) => vec![table as &mut dyn TableLike],
        _ => Vec::new(),
    }
}

fn has_name(table: &dyn TableLike, name: &str) -> bool {
    table.get("name").and_then(Item::as_str) == Some(name)
}

/// Replaces (or adds) `endpoints`, keeping the old value's surrounding
/// whitespace and trailing comment.
fn set_endpoints(zone: &mut dyn TableLike, endpoints: &[String]) {
    let mut list: Array = endpoints.iter().map(String::as_str).collect();
    list.set_trailing_comma(false);
    let mut value = Value::Array(list);
    match zone.get_mut("endpoints") {
        Some(Item::Value(old)) => {
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        _ => {
            zone.insert("endpoints", Item::Value(value));
        }
    }
}

fn edit_json(text: &str, edits: Edits<'_>) -> anyhow::Result<String> {
    let mut doc: Json = serde_json::from_str(text).context("cannot parse the policy as JSON")?;
    for e in edits.endpoints {
        let zone = json_objects(doc.get_mut("backend"))
            .into_iter()
            .find(|b| b.get("name").and_then(Json::as_str) == Some(&e.backend))
            .and_then(|b| {
                json_objects(b.get_mut("zone"))
                    .into_iter()
                    .find(|z| z.get("name").and_then(Json::as_str) == Some(&e.zone))
            });
        let Some(zone) = zone.and_then(Json::as_object_mut) else {
            bail!(
                "cannot find zone `{}` of backend `{}` in the policy text",
                e.zone,
                e.backend
            );
        };
        zone.insert("endpoints".to_string(), Json::from(e.endpoints.clone()));
    }
    for section in edits.dropped() {
        if let Some(root) = doc.as_object_mut() {
            root.remove(section);
        }
        for backend in json_objects(doc.get_mut("backend")) {
            if let Some(b) = backend.as_object_mut() {
                b.remove(section);
            }
        }
    }
    let mut out = serde_json::to_string_pretty(&doc).context("cannot print the policy")?;
    out.push('\n');
    Ok(out)
}

/// The objects of a JSON list of objects, or the one object written alone.
fn json_objects(value: Option<&mut Json>) -> Vec<&mut Json> {
    match value {
        Some(Json::Array(items)) => items.iter_mut().filter(|v| v.is_object()).collect(),
        Some(v @ Json::Object(_)) => vec![v],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(backend: &str, zone: &str, eps: &[&str]) -> ZoneEndpoints {
        ZoneEndpoints {
            backend: backend.into(),
            zone: zone.into(),
            endpoints: eps.iter().map(|s| s.to_string()).collect(),
        }
    }

    const POLICY: &str = r#"# The admin's comment stays.
name = "p"

[[backend]]
name = "primary"
models = ["m"]

  [[backend.zone]]
  name = "zone-a"
  endpoints = ["10.0.0.1:8000"]  # placeholder

  [[backend.zone]]
  name = "zone-b"

  # Slow to first token is normal here.
  [backend.outlier]
  first_token_timeout = "15s"

[[backend]]
name = "small"
models = ["s"]
zone = [{ name = "zone-a", endpoints = ["10.0.0.9:8000"] }]

# Eject bad endpoints.
[outlier]
consecutive_errors = 3
"#;

    #[test]
    fn endpoints_are_replaced_in_place_and_comments_kept() {
        let eps = [
            zone("primary", "zone-a", &["127.0.0.1:1", "127.0.0.1:2"]),
            zone("primary", "zone-b", &["127.0.0.1:3"]),
            zone("small", "zone-a", &["127.0.0.1:4"]),
        ];
        let out = edit(
            POLICY,
            Format::Toml,
            Edits {
                endpoints: &eps,
                drop_outlier: false,
                drop_retry: false,
                drop_failover: false,
            },
        )
        .unwrap();
        assert!(out.starts_with("# The admin's comment stays.\n"), "{out}");
        assert!(
            out.contains(r#"endpoints = ["127.0.0.1:1", "127.0.0.1:2"]  # placeholder"#),
            "{out}"
        );
        assert!(out.contains(r#"endpoints = ["127.0.0.1:3"]"#), "{out}");
        assert!(
            out.contains(r#"zone = [{ name = "zone-a", endpoints = ["127.0.0.1:4"] }]"#),
            "{out}"
        );
        let policy = sluice_policy::parse_toml("out.toml", &out).unwrap();
        let endpoints: Vec<Vec<String>> = policy
            .backends
            .iter()
            .flat_map(|b| b.zones.iter().map(|z| z.endpoints.clone()))
            .collect();
        assert_eq!(
            endpoints,
            [
                vec!["127.0.0.1:1", "127.0.0.1:2"],
                vec!["127.0.0.1:3"],
                vec!["127.0.0.1:4"]
            ]
        );
        assert!(policy.outlier.is_some());
    }

    #[test]
    fn dropping_outlier_removes_the_section_and_every_override() {
        let out = edit(
            POLICY,
            Format::Toml,
            Edits {
                endpoints: &[],
                drop_outlier: true,
                drop_retry: false,
                drop_failover: false,
            },
        )
        .unwrap();
        assert!(!out.contains("outlier"), "{out}");
        assert!(!out.contains("first_token_timeout"), "{out}");
        let policy = sluice_policy::parse_toml("out.toml", &out).unwrap();
        assert!(policy.outlier.is_none());
        assert!(policy.backends.iter().all(|b| b.outlier.is_none()));
        // The rest is untouched.
        assert!(out.starts_with("# The admin's comment stays.\n"), "{out}");
        assert!(out.contains(r#"endpoints = ["10.0.0.1:8000"]  # placeholder"#));
    }

    #[test]
    fn dropping_failover_removes_the_section_and_nothing_else() {
        let text = "[[backend]]\nname = \"b\"\nmodels = [\"m\"]\n  [[backend.zone]]\n  name = \"z\"\n\n[outlier]\n\n# the zones\n[failover]\nlocal_zone = \"z\"\n";
        let edited = edit(
            text,
            Format::Toml,
            Edits {
                endpoints: &[],
                drop_outlier: true,
                drop_retry: false,
                drop_failover: true,
            },
        )
        .unwrap();
        let policy = sluice_policy::parse_toml("e.toml", &edited).unwrap();
        assert!(policy.failover.is_none() && policy.outlier.is_none());
        assert!(!edited.contains("local_zone"), "{edited}");
        let json = r#"{"backend":[{"name":"b","models":["m"],"zone":[{"name":"z"}]}],"outlier":{},"failover":{"local_zone":"z"}}"#;
        let edited = edit(
            json,
            Format::Json,
            Edits {
                endpoints: &[],
                drop_outlier: true,
                drop_retry: false,
                drop_failover: true,
            },
        )
        .unwrap();
        assert!(!edited.contains("failover"), "{edited}");
        let policy = sluice_policy::parse_json("e.json", &edited).unwrap();
        assert!(policy.failover.is_none());
    }

    #[test]
    fn dropping_retry_removes_the_section_and_every_override_and_nothing_else() {
        let text = format!(
            "{POLICY}\n# Budget retries.\n[retry]\nmax_retries = 2\n\n[[backend]]\nname = \"third\"\nmodels = [\"t\"]\nzone = {{ name = \"zone-a\" }}\n  [backend.retry]\n  max_retries = 3\n"
        );
        let before = sluice_policy::parse_toml("in.toml", &text).unwrap();
        assert!(before.retry.is_some() && before.backends[2].retry.is_some());
        for drop_outlier in [false, true] {
            let out = edit(
                &text,
                Format::Toml,
                Edits {
                    endpoints: &[],
                    drop_outlier,
                    drop_retry: true,
                    drop_failover: false,
                },
            )
            .unwrap();
            assert!(!out.contains("retry"), "{out}");
            let policy = sluice_policy::parse_toml("out.toml", &out).unwrap();
            assert!(policy.retry.is_none());
            assert!(policy.backends.iter().all(|b| b.retry.is_none()));
            assert_eq!(policy.outlier.is_none(), drop_outlier);
            assert!(out.starts_with("# The admin's comment stays.\n"), "{out}");
        }
        let json = r#"{"backend": [{"name": "b", "models": ["*"], "zone": [{"name": "z"}],
            "retry": {"max_retries": 3}}], "retry": {"budget": "10%"}, "outlier": {}}"#;
        let out = edit(
            json,
            Format::Json,
            Edits {
                endpoints: &[],
                drop_outlier: false,
                drop_retry: true,
                drop_failover: false,
            },
        )
        .unwrap();
        let policy =
            sluice_policy::parse(sluice_policy::Source::new("out.json", out, Format::Json))
                .unwrap();
        assert!(policy.retry.is_none() && policy.backends[0].retry.is_none());
        assert!(policy.outlier.is_some());
    }

    #[test]
    fn a_single_table_backend_is_edited_too() {
        let text = "[backend]\nname = \"b\"\nmodels = \"*\"\nzone = { name = \"z\" }\n";
        let out = edit(
            text,
            Format::Toml,
            Edits {
                endpoints: &[zone("b", "z", &["127.0.0.1:9"])],
                drop_outlier: false,
                drop_retry: false,
                drop_failover: false,
            },
        )
        .unwrap();
        let policy = sluice_policy::parse_toml("out.toml", &out).unwrap();
        assert_eq!(policy.backends[0].zones[0].endpoints, ["127.0.0.1:9"]);
    }

    #[test]
    fn json_policies_are_edited_as_json() {
        let text = r#"{"backend": [{"name": "b", "models": ["*"],
            "zone": [{"name": "z", "endpoints": ["10.0.0.1:1"]}],
            "outlier": {"first_token_timeout": "15s"}}],
            "outlier": {"consecutive_errors": 3}}"#;
        let eps = [zone("b", "z", &["127.0.0.1:5", "127.0.0.1:6"])];
        let edited = |drop_outlier| {
            let out = edit(
                text,
                Format::Json,
                Edits {
                    endpoints: &eps,
                    drop_outlier,
                    drop_retry: false,
                    drop_failover: false,
                },
            )
            .unwrap();
            sluice_policy::parse(sluice_policy::Source::new("out.json", out, Format::Json)).unwrap()
        };
        let kept = edited(false);
        assert_eq!(
            kept.backends[0].zones[0].endpoints,
            ["127.0.0.1:5", "127.0.0.1:6"]
        );
        assert!(kept.outlier.is_some() && kept.backends[0].outlier.is_some());
        let dropped = edited(true);
        assert_eq!(dropped.backends[0].zones[0].endpoints.len(), 2);
        assert!(dropped.outlier.is_none() && dropped.backends[0].outlier.is_none());
    }

    #[test]
    fn an_unknown_zone_is_an_error() {
        let err = edit(
            POLICY,
            Format::Toml,
            Edits {
                endpoints: &[zone("primary", "zone-z", &["127.0.0.1:1"])],
                drop_outlier: false,
                drop_retry: false,
                drop_failover: false,
            },
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("zone `zone-z` of backend `primary`")
        );
    }

    #[test]
    fn no_edit_returns_the_text_byte_for_byte() {
        assert_eq!(
            edit(POLICY, Format::Toml, Edits::default()).unwrap(),
            POLICY
        );
    }
}
