//! Manifests of our own, each breaking (or keeping) one rule.

use std::sync::OnceLock;

use istio_check::{Check, Problem, Validator, default_schema_dir};
use serde_json::{Value, json};

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| Validator::load(&default_schema_dir().unwrap()).unwrap())
}

fn wasm_plugin(spec: Value) -> Value {
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "sluice", "namespace": "istio-system"},
        "spec": spec,
    })
}

fn service_entry(spec: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "llm"},
        "spec": spec,
    })
}

fn destination_rule(traffic_policy: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "llm"},
        "spec": {"host": "llm.example.com", "trafficPolicy": traffic_policy},
    })
}

/// The only problem, asserting there is exactly one.
fn only(manifest: &Value) -> Problem {
    let mut problems = validator()
        .validate(manifest)
        .expect_err("should be rejected");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    problems.remove(0)
}

fn is_cel(p: &Problem) -> bool {
    matches!(p.check, Check::Cel { .. })
}

#[test]
fn a_sluice_wasm_plugin_is_accepted() {
    let plugin = wasm_plugin(json!({
        "url": "oci://registry.example/sluice:0.1.0",
        "sha256": "1ef0c9a92b0420cf25f7fe5d481b231464bc88f486ca3b9c83ed5cc21d2f6210",
        "phase": "STATS",
        "priority": 10,
        "pluginName": "sluice",
        "pluginConfig": {"any": {"nested": ["thing", 1, true]}},
        "failStrategy": "FAIL_OPEN",
        "match": [{"mode": "SERVER", "ports": [{"number": 8080}]}],
        "selector": {"matchLabels": {"app": "gateway"}},
    }));
    assert_eq!(validator().validate(&plugin), Ok(()));
}

#[test]
fn priority_must_be_an_integer_or_null() {
    let p = only(&wasm_plugin(json!({"url": "http://x", "priority": "high"})));
    assert_eq!(p.path, "spec.priority");
    assert_eq!(
        p.check,
        Check::Schema {
            keyword: "type".into()
        }
    );
    // `nullable: true` in the CRD.
    let null = wasm_plugin(json!({"url": "http://x", "priority": null}));
    assert_eq!(validator().validate(&null), Ok(()));
    // int32 is a width hint Kubernetes does not enforce.
    let wide = wasm_plugin(json!({"url": "http://x", "priority": 1_i64 << 40}));
    assert_eq!(validator().validate(&wide), Ok(()));
}

#[test]
fn unknown_fields_are_rejected_except_where_preserved() {
    let p = only(&wasm_plugin(json!({"url": "http://x", "priorty": 1})));
    assert_eq!(p.path, "spec.priorty");
    assert_eq!(
        p.check,
        Check::Schema {
            keyword: "additionalProperties".into()
        }
    );
    let preserved = wasm_plugin(json!({"url": "http://x", "pluginConfig": {"whatever": 1}}));
    assert_eq!(validator().validate(&preserved), Ok(()));
}

#[test]
fn enum_values_are_checked() {
    let p = only(&wasm_plugin(json!({"url": "http://x", "phase": "LATE"})));
    assert_eq!(p.path, "spec.phase");
    assert_eq!(
        p.check,
        Check::Schema {
            keyword: "enum".into()
        }
    );
}

#[test]
fn url_schemes_follow_the_cel_rule() {
    for ok in [
        "oci://r/x:1",
        "https://h/x.wasm",
        "file:///x.wasm",
        "registry/x",
    ] {
        assert_eq!(
            validator().validate(&wasm_plugin(json!({"url": ok}))),
            Ok(()),
            "{ok}"
        );
    }
    let p = only(&wasm_plugin(json!({"url": "ftp://h/x.wasm"})));
    assert!(is_cel(&p), "{p}");
    assert_eq!(p.path, "spec.url");
}

#[test]
fn a_service_entry_breaking_a_cel_rule() {
    let p = only(&service_entry(json!({
        "hosts": ["llm.example.com"],
        "resolution": "NONE",
        "endpoints": [{"address": "10.0.0.1"}],
    })));
    assert!(is_cel(&p), "{p}");
    assert_eq!(p.path, "spec");
    assert_eq!(p.message, "NONE mode cannot set endpoints");

    let uds = only(&service_entry(json!({
        "hosts": ["llm.example.com"],
        "resolution": "STATIC",
        "endpoints": [{"address": "unix://relative/socket"}],
    })));
    assert_eq!(
        uds.message,
        "UDS must be an absolute path or abstract socket"
    );
    assert_eq!(uds.path, "spec.endpoints[0].address");
}

#[test]
fn port_names_and_numbers() {
    // Endpoint ports are a map from port name to number; the names are
    // checked by a rule over the map's keys.
    let p = only(&service_entry(json!({
        "hosts": ["llm.example.com"],
        "resolution": "STATIC",
        "endpoints": [{"address": "10.0.0.1", "ports": {"-bad-": 8080}}],
    })));
    assert!(is_cel(&p), "{p}");
    assert_eq!(p.message, "port name must be valid");
    let p = only(&service_entry(json!({
        "hosts": ["llm.example.com"],
        "ports": [{"name": "http", "number": 0}],
    })));
    assert_eq!(p.message, "port must be between 1-65535");
    let ok = service_entry(json!({
        "hosts": ["llm.example.com"],
        "ports": [{"name": "http", "number": 80, "protocol": "HTTP"}],
        "resolution": "STATIC",
        "endpoints": [{"address": "10.0.0.1", "ports": {"http": 8080}}],
    }));
    assert_eq!(validator().validate(&ok), Ok(()));
}

#[test]
fn durations_below_one_millisecond_are_rejected() {
    let tcp = |timeout: &str| {
        destination_rule(json!({"connectionPool": {"tcp": {"connectTimeout": timeout}}}))
    };
    assert_eq!(validator().validate(&tcp("250ms")), Ok(()));
    assert_eq!(validator().validate(&tcp("1h2m3.5s")), Ok(()));
    let p = only(&tcp("500us"));
    assert!(is_cel(&p), "{p}");
    assert_eq!(
        p.path,
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout"
    );
    assert_eq!(p.message, "must be a valid duration greater than 1ms");
    // Not a duration at all: the rule fails to evaluate, which rejects too.
    let p = only(&tcp("soon"));
    assert!(is_cel(&p), "{p}");
}

#[test]
fn metadata_and_kind() {
    let mut bad_name = wasm_plugin(json!({"url": "http://x"}));
    bad_name["metadata"]["name"] = json!("Sluice_Plugin");
    let p = only(&bad_name);
    assert_eq!(
        (p.path.as_str(), &p.check),
        ("metadata.name", &Check::Metadata)
    );

    let mut no_name = wasm_plugin(json!({"url": "http://x"}));
    no_name["metadata"] = json!({"labels": {"app": "x"}});
    assert_eq!(only(&no_name).path, "metadata.name");

    let mut unknown = wasm_plugin(json!({"url": "http://x"}));
    unknown["kind"] = json!("VirtualService");
    assert_eq!(only(&unknown).check, Check::Kind);

    let mut unserved = wasm_plugin(json!({"url": "http://x"}));
    unserved["apiVersion"] = json!("extensions.istio.io/v1");
    assert_eq!(only(&unserved).check, Check::Kind);

    assert_eq!(only(&json!(["not", "an", "object"])).check, Check::Kind);
}

#[test]
fn multi_document_yaml() {
    let text = "\
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: good}
spec: {url: oci://r/x:1}
---
# a comment-only document is skipped
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: bad}
spec: {url: oci://r/x:1, phase: NEVER}
--- 
key: [unclosed
";
    let results = validator().validate_yaml_documents(text);
    assert_eq!(results.len(), 3);
    assert_eq!(results[0], Ok(()));
    assert_eq!(results[1].as_ref().unwrap_err()[0].path, "spec.phase");
    assert_eq!(results[2].as_ref().unwrap_err()[0].check, Check::Yaml);
}

/// A rule the validator cannot run must fail `load`, never be skipped.
#[test]
fn a_rule_that_does_not_compile_fails_load() {
    let crd = |rule: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: things.example.com}}
spec:
  group: example.com
  names: {{kind: Thing, plural: things}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: string
            x-kubernetes-validations:
            - rule: '{rule}'
"
        )
    };
    let dir = std::env::temp_dir().join(format!("istio-check-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("thing-crd.yaml");
    for (rule, loads) in [
        ("self.startsWith(\"a\")", true),
        ("self.startsWith(", false),
        ("self.isFancy()", false),
        ("ip(self).family() == 4", false),
        ("other == self", false),
    ] {
        std::fs::write(&file, crd(rule)).unwrap();
        let loaded = Validator::load(&dir);
        assert_eq!(loaded.is_ok(), loads, "{rule}: {:?}", loaded.err());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
