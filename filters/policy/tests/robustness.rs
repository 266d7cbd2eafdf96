//! Bad input never panics the policy reader, and every error it reports
//! points inside the text it was given.

use proptest::prelude::*;
use sluice_policy::{parse_config_bytes, parse_json, parse_toml};

const GATEWAY: &str = include_str!("../../../policies/gateway.toml");

fn check_spans(
    text: &str,
    result: Result<sluice_policy::Policy, sluice_policy::Diagnostics>,
) -> Result<(), TestCaseError> {
    if let Err(d) = result {
        prop_assert!(!d.items.is_empty(), "an error without a diagnostic");
        for item in &d.items {
            if let Some(span) = &item.loc.span {
                prop_assert!(
                    span.start <= text.len(),
                    "span {span:?} outside a {}-byte text",
                    text.len()
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Deleting any line of a valid policy gives a valid policy or located errors.
    #[test]
    fn deleting_a_line_never_panics(line in 0usize..200) {
        let lines: Vec<&str> = GATEWAY.lines().collect();
        let text: String = lines.iter().enumerate().filter(|(i, _)| *i != line % lines.len()).map(|(_, l)| format!("{l}\n")).collect();
        check_spans(&text, parse_toml("p.toml", &text))?;
    }

    /// Overwriting any byte with a character that matters to TOML.
    #[test]
    fn corrupting_a_byte_never_panics(at in 0usize..4000, c in prop::sample::select(vec!['"', '[', ']', '=', '\n', '#', '{', ',', '0', 'x', 'é'])) {
        let mut text = GATEWAY.to_string();
        let mut at = at % text.len();
        while !text.is_char_boundary(at) { at -= 1; }
        let end = text[at..].chars().next().map_or(at, |ch| at + ch.len_utf8());
        text.replace_range(at..end, &c.to_string());
        check_spans(&text, parse_toml("p.toml", &text))?;
    }

    /// Arbitrary bytes as a filter configuration.
    #[test]
    fn arbitrary_config_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_config_bytes("plugin", &bytes);
    }

    /// Arbitrary JSON values where a policy is expected.
    #[test]
    fn arbitrary_json_never_panics(v in arb_json()) {
        let text = v.to_string();
        check_spans(&text, parse_json("plugin", &text))?;
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::json!(f)),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        "[a-z0-9%/]{0,8}".prop_map(serde_json::Value::String),
    ];
    let keys = prop::sample::select(vec![
        "backend",
        "zone",
        "name",
        "models",
        "endpoints",
        "tokens",
        "quota",
        "retry",
        "budget",
        "breaker",
        "mode",
        "bulkhead",
        "window",
    ]);
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..5).prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}
