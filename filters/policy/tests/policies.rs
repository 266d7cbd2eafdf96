//! Every policy in `policies/` is checked here: the examples must be valid
//! and explain themselves losslessly; each file in `policies/invalid/` must
//! produce exactly the errors in its `.expected` file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers

use std::path::{Path, PathBuf};

use sluice_policy::{Diagnostics, Format, Source, explain, parse, parse_json, parse_toml};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> Source {
    let format = if path.extension().is_some_and(|e| e == "json") {
        Format::Json
    } else {
        Format::Toml
    };
    Source::new(
        path.display().to_string(),
        std::fs::read_to_string(path).unwrap(),
        format,
    )
}

#[test]
fn example_policies_are_valid() {
    let examples = files(&policies_dir(), &["toml", "json"]);
    assert!(
        examples.len() >= 3,
        "expected the minimal, gateway and lab policies"
    );
    for path in examples {
        if let Err(d) = parse(read(&path)) {
            panic!("{} is invalid:\n{}", path.display(), d.render(false));
        }
    }
}

/// `sluice explain` prints the effective policy; read back, it must be the
/// same policy, so every effective value is in it.
#[test]
fn effective_policy_reads_back_as_the_same_policy() {
    for path in files(&policies_dir(), &["toml"]) {
        let policy = parse(read(&path)).unwrap();
        let effective = explain::effective_toml(&policy).unwrap();
        let again = parse_toml("effective.toml", &effective).unwrap_or_else(|d| {
            panic!(
                "effective policy of {} is invalid:\n{}\n{effective}",
                path.display(),
                d.render(false)
            )
        });
        assert_eq!(
            policy,
            again,
            "{}: effective policy differs:\n{effective}",
            path.display()
        );
    }
}

fn actual_errors(d: &Diagnostics) -> Vec<String> {
    d.items
        .iter()
        .map(|item| match d.line_col(item) {
            Some(lc) => format!("{}:{}: {}", lc.line, lc.column, item.message),
            None => format!("{}: {}", item.loc.pointer, item.message),
        })
        .collect()
}

#[test]
fn invalid_policies_give_their_expected_errors() {
    let dir = policies_dir().join("invalid");
    let cases = files(&dir, &["toml", "json"]);
    assert!(cases.len() >= 8);
    for path in cases {
        let expected_path = path.with_extension("expected");
        let expected: Vec<String> = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no {}", path.display(), expected_path.display()))
            .lines()
            .map(str::to_string)
            .collect();
        let diagnostics = match parse(read(&path)) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(d) => d,
        };
        assert_eq!(actual_errors(&diagnostics), expected, "{}", path.display());
    }
}

#[test]
fn the_same_policy_reads_from_json_as_from_toml() {
    // What Istio delivers: pluginConfig as JSON, numbers as doubles.
    let json = r#"{
        "tenant": {"from": "header", "header": "x-tenant-id"},
        "backend": [{"name": "llm", "models": ["*"], "zone": [{"name": "local", "endpoints": ["127.0.0.1:8000"]}]}],
        "retry": {"budget": "20%", "max_retries": 2.0},
        "tokens": {"default_max_tokens": 512.0, "quota": [{"tokens": ["60k/min"], "requests": "100/min"}]}
    }"#;
    let toml = r#"
        [tenant]
        from = "header"
        header = "x-tenant-id"
        [[backend]]
        name = "llm"
        models = ["*"]
        [[backend.zone]]
        name = "local"
        endpoints = ["127.0.0.1:8000"]
        [retry]
        budget = "20%"
        max_retries = 2
        [tokens]
        default_max_tokens = 512
        [[tokens.quota]]
        tokens = ["60k/min"]
        requests = "100/min"
    "#;
    assert_eq!(
        parse_json("plugin", json).unwrap(),
        parse_toml("policy.toml", toml).unwrap()
    );
}

#[test]
fn a_backend_override_changes_only_that_backend() {
    let policy = parse(read(&policies_dir().join("gateway.toml"))).unwrap();
    let primary = policy.backend("primary").unwrap();
    let fallback = policy.backend("fallback").unwrap();
    assert_eq!(
        primary
            .outlier
            .as_ref()
            .unwrap()
            .first_token_timeout
            .as_secs(),
        15
    );
    assert_eq!(
        fallback
            .outlier
            .as_ref()
            .unwrap()
            .first_token_timeout
            .as_secs(),
        10
    );
    // The fallback switches the breaker off for itself only.
    assert!(fallback.breaker.is_none());
    assert_eq!(primary.breaker, policy.breaker);
}

#[test]
fn errors_in_an_overridden_section_are_reported_once() {
    let text = r#"
[[backend]]
name = "a"
models = ["*"]
  [[backend.zone]]
  name = "z"
  [backend.retry]
  max_retries = 3
[retry]
ttl = "0s"
"#;
    let d = parse_toml("p.toml", text).unwrap_err();
    assert_eq!(
        actual_errors(&d),
        ["10:7: `ttl` must be longer than 0s, found 0s"]
    );
}

/// A policy with one `[tokens]` section written by `tokens`.
fn with_tokens(tokens: &str) -> String {
    format!(
        "[[backend]]\nname = \"llm\"\nmodels = [\"*\"]\n[[backend.zone]]\nname = \"local\"\n[tokens]\n{tokens}"
    )
}

#[test]
fn on_state_error_defaults_to_deny() {
    use sluice_core::config::StateErrorPolicy;
    use sluice_policy::Policy;
    let on_state_error = |p: &Policy| p.tokens.as_ref().unwrap().on_state_error;
    let quota = "[[tokens.quota]]\ntokens = \"60k/min\"\n";
    let default = parse_toml("p.toml", &with_tokens(quota)).unwrap();
    assert_eq!(on_state_error(&default), StateErrorPolicy::Deny);
    let allow = with_tokens(&format!("on_state_error = \"allow\"\n{quota}"));
    let allow = parse_toml("p.toml", &allow).unwrap();
    assert_eq!(on_state_error(&allow), StateErrorPolicy::Allow);
    let json = r#"{"backend": [{"name": "llm", "models": "*", "zone": [{"name": "local"}]}],
        "tokens": {"on_state_error": "deny", "quota": [{"tokens": "60k/min"}]}}"#;
    assert_eq!(
        on_state_error(&parse_json("plugin", json).unwrap()),
        StateErrorPolicy::Deny
    );
}

#[test]
fn a_misspelled_on_state_error_suggests_the_spelling() {
    let text =
        with_tokens("on_state_error = \"fail-open\"\n[[tokens.quota]]\ntokens = \"60k/min\"\n");
    let d = parse_toml("p.toml", &text).unwrap_err();
    assert_eq!(actual_errors(&d), ["7:18: unknown value `fail-open`"]);
    assert_eq!(
        d.items[0].hint.as_deref(),
        Some("expected `deny` or `allow`")
    );
    let text = with_tokens("on_state_error = \"alow\"\n[[tokens.quota]]\ntokens = \"60k/min\"\n");
    let d = parse_toml("p.toml", &text).unwrap_err();
    assert_eq!(d.items[0].hint.as_deref(), Some("did you mean `allow`?"));
}

/// State is keyed by a rule's identity: a reload that reorders the rules
/// must find every rule's state again.
#[test]
fn quota_identities_survive_reordering() {
    let named =
        "[[tokens.quota]]\nname = \"acme\"\nmatch = { tenants = \"acme\" }\ntokens = \"60k/min\"\n";
    let unnamed = "[[tokens.quota]]\nmatch = { models = \"gpt-4o\" }\ntokens = \"30k/min\"\nrequests = \"60/min\"\n";
    let catch_all = "[[tokens.quota]]\ntokens = \"10k/min\"\n";
    let identities = |rules: &[&str]| -> Vec<(String, u64)> {
        let policy = parse_toml("p.toml", &with_tokens(&rules.concat())).unwrap();
        let mut ids: Vec<(String, u64)> = policy
            .tokens
            .unwrap()
            .quotas
            .iter()
            .map(|q| (format!("{:?}", q.matcher), q.identity()))
            .collect();
        ids.sort();
        ids
    };
    let before = identities(&[named, unnamed, catch_all]);
    assert_eq!(before, identities(&[unnamed, catch_all, named]));
    assert_eq!(before, identities(&[catch_all, named, unnamed]));
    // Three rules, three states.
    let mut distinct: Vec<u64> = before.iter().map(|(_, id)| *id).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn a_name_keeps_a_rule_identity_across_limit_changes() {
    let identity = |rule: &str| {
        let policy = parse_toml("p.toml", &with_tokens(rule)).unwrap();
        policy.tokens.unwrap().quotas[0].identity()
    };
    let named = |limit: &str| {
        identity(&format!(
            "[[tokens.quota]]\nname = \"acme\"\nmatch = {{ tenants = \"acme\" }}\ntokens = \"{limit}\"\n"
        ))
    };
    let unnamed = |limit: &str| {
        identity(&format!(
            "[[tokens.quota]]\nmatch = {{ tenants = \"acme\" }}\ntokens = \"{limit}\"\n"
        ))
    };
    assert_eq!(named("60k/min"), named("120k/min"));
    assert_ne!(unnamed("60k/min"), unnamed("120k/min"));
    assert_eq!(unnamed("60k/min"), unnamed("60k/min"));
    assert_ne!(named("60k/min"), unnamed("60k/min"));
}
