//! The two fields of a request body that pick its circuit: `model` and
//! `stream`, read without building the whole document.
//!
//! [`super::RequestInfo::read`] builds a `serde_json::Value` tree of the
//! whole body (every message string copied into the heap) because the token
//! limiter needs the prompt's size. The breaker needs only these two
//! fields, on every request: this visitor walks the document once, keeps
//! them, and skips everything else with `IgnoredAny` (still checked as
//! JSON, so a malformed body reads as "no model", as before).
//!
//! The results are the same as `RequestInfo::read`'s `model` and `stream`:
//! an empty or wrongly typed `model` is no model, a wrongly typed `stream` is
//! `false`, a repeated key counts its last occurrence (as `Value`'s map
//! does), and a body that is not a JSON object reads as neither. Nesting
//! deeper than serde_json's recursion limit (128) inside other fields is
//! skipped rather than refused (see the test).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// `model` and `stream` of a request body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteFields {
    /// The `model` string, if present, a string and not empty.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
}

impl RouteFields {
    /// Reads `body`; never fails (not JSON, or not an object: the default).
    pub fn read(body: &[u8]) -> Self {
        let mut de = serde_json::Deserializer::from_slice(body);
        de.deserialize_map(FieldsVisitor)
            .and_then(|f| de.end().map(|()| f))
            .unwrap_or_default()
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = RouteFields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RouteFields, A::Error> {
        let mut fields = RouteFields::default();
        // Keys borrow from the body when they have no escapes; an escaped
        // key (`"mod\u0065l"`) is unescaped into a String, as `Value` does.
        while let Some(key) = map.next_key::<KeyName>()? {
            match key {
                KeyName::Model => {
                    fields.model = map
                        .next_value::<Lenient<String>>()?
                        .0
                        .filter(|m| !m.is_empty())
                }
                KeyName::Stream => {
                    fields.stream = map.next_value::<Lenient<bool>>()?.0 == Some(true)
                }
                KeyName::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A key of the top-level object, compared without allocating.
enum KeyName {
    Model,
    Stream,
    Other,
}

impl<'de> de::Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyName, E> {
                Ok(match key {
                    "model" => KeyName::Model,
                    "stream" => KeyName::Stream,
                    _ => KeyName::Other,
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A value of type `T`, or `None` when it has another JSON type (which is
/// skipped, not an error).
struct Lenient<T>(Option<T>);

impl<'de> de::Deserialize<'de> for Lenient<String> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor::<String>(std::marker::PhantomData))
    }
}

impl<'de> de::Deserialize<'de> for Lenient<bool> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor::<bool>(std::marker::PhantomData))
    }
}

struct LenientVisitor<T>(std::marker::PhantomData<T>);

/// Skips any JSON value, answering `None`; `visit_str`/`visit_bool` are
/// overridden per target type below.
macro_rules! skip_others {
    () => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Lenient(None))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Lenient(None))
        }
    };
}

impl<'de> Visitor<'de> for LenientVisitor<String> {
    type Value = Lenient<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient(Some(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Lenient(Some(v)))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }
    skip_others!();
}

impl<'de> Visitor<'de> for LenientVisitor<bool> {
    type Value = Lenient<bool>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient(Some(v)))
    }
    skip_others!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::RequestInfo;

    const PATH: &str = "/v1/chat/completions";

    fn same_as_request_info(body: &str) {
        let fields = RouteFields::read(body.as_bytes());
        let info = RequestInfo::read(PATH, body.as_bytes());
        assert_eq!(fields.model, info.model, "model of {body}");
        assert_eq!(fields.stream, info.stream, "stream of {body}");
    }

    #[test]
    fn reads_what_request_info_reads() {
        for body in [
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"messages":[{"content":{"model":"inner"}}],"model":"outer"}"#,
            r#"{"model":"","stream":false}"#,
            r#"{"model":null,"stream":null}"#,
            r#"{"model":42,"stream":"yes"}"#,
            r#"{"model":["a"],"stream":{"x":1}}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"a","model":7}"#,
            r#"{"mod\u0065l":"escaped","stre\u0061m":true}"#,
            r#"{"model":"caf\u00e9 \"q\""}"#,
            r#"{"model":"a"} trailing"#,
            r#"{"model":"a","messages":[1,2,"#,
            r#"["model","a"]"#,
            r#""model""#,
            "",
            "not json",
            r#"{"stream":true,"n":1.5e3,"t":-3,"z":[true,false,null]}"#,
        ] {
            same_as_request_info(body);
        }
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        // The one difference from `RequestInfo::read`: serde_json skips an
        // ignored value iteratively, without the 128-level recursion limit
        // that makes `Value` give up, so the model of a deeply nested body
        // is still read (and the stack is never at risk).
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            RouteFields::read(deep.as_bytes()).model.as_deref(),
            Some("m")
        );
        let unclosed = format!("{{\"model\":\"m\",\"x\":{}", "[".repeat(100_000));
        assert_eq!(
            RouteFields::read(unclosed.as_bytes()),
            RouteFields::default()
        );
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_request_info_on_any_text(body in "\\PC{0,60}") {
            same_as_request_info(&body);
        }

        #[test]
        fn agrees_with_request_info_on_objects(
            model in proptest::option::of("[a-z0-9\\-]{0,8}"),
            stream in proptest::option::of(proptest::bool::ANY),
            filler in "[a-z ]{0,30}",
        ) {
            let mut doc = serde_json::Map::new();
            doc.insert("messages".into(), serde_json::json!([{"role": "user", "content": filler}]));
            if let Some(m) = model { doc.insert("model".into(), m.into()); }
            if let Some(s) = stream { doc.insert("stream".into(), s.into()); }
            same_as_request_info(&serde_json::Value::Object(doc).to_string());
        }
    }
}
