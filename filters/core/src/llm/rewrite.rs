//! Editing a request body before it is forwarded.

use serde_json::{Map, Value};

use super::CapField;

/// Edits to make to a request body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Set `stream_options.include_usage = true`, so that an OpenAI stream
    /// ends with a usage chunk (an extra chunk with empty `choices` the
    /// client did not ask for: current SDKs accept it).
    pub include_usage: bool,
    /// Lower the completion cap: the field the request used, and the new
    /// value in tokens (`over_cap = "clamp"`).
    pub clamp: Option<(CapField, u64)>,
}

impl Rewrite {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        !self.include_usage && self.clamp.is_none()
    }
}

/// The body with `edits` applied, or `None` when there is nothing to change
/// or the body is not a JSON object (it is then forwarded as is).
///
/// The common case, adding `include_usage` to a body without
/// `stream_options`, splices the field in after the opening brace and leaves
/// every other byte alone; other edits re-serialize the document (keys may
/// come out in another order, which JSON APIs ignore).
pub fn rewrite_body(body: &[u8], edits: &Rewrite) -> Option<Vec<u8>> {
    if edits.is_empty() {
        return None;
    }
    // The splice is safe only when the body has no `stream_options` of its
    // own: a key spelled with escapes (`"stream_opti\u006fns"`) is the same
    // key to a JSON reader and would win over a spliced one, so a body with
    // any `\u` escape takes the parsing path (found by fuzzing).
    if edits.clamp.is_none() && !contains(body, b"\"stream_options\"") && !contains(body, b"\\u") {
        return splice_include_usage(body);
    }
    edit_object(body, |obj| apply(obj, edits)).ok()
}

fn apply(obj: &mut Map<String, Value>, edits: &Rewrite) {
    if edits.include_usage {
        match obj.get_mut("stream_options") {
            Some(Value::Object(options)) => {
                options.insert("include_usage".to_string(), Value::Bool(true));
            }
            _ => {
                let mut options = Map::new();
                options.insert("include_usage".to_string(), Value::Bool(true));
                obj.insert("stream_options".to_string(), Value::Object(options));
            }
        }
    }
    if let Some((field, tokens)) = edits.clamp {
        obj.insert(field.name().to_string(), Value::from(tokens));
    }
}

/// Why a body could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("the request body is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("the request body is not a JSON object")]
    NotAnObject,
}

/// The request body with its top-level `"model"` set to `model` (added if
/// absent): what a fallback to another model sends upstream. The body is
/// read with a real JSON parser, so a `"model"` inside a message's text is
/// never touched, and a body with duplicate `"model"` keys comes out with
/// exactly one. Key order and number spelling may change (serde_json
/// reorders keys and prints numbers canonically); the meaning does not.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, RewriteError> {
    edit_object(body, |obj| {
        obj.insert("model".to_string(), Value::String(model.to_string()));
    })
}

/// Parses `body` as a JSON object, lets `edit` change it, and serializes it
/// again: the one place request bodies are re-written as documents.
fn edit_object(
    body: &[u8],
    edit: impl FnOnce(&mut Map<String, Value>),
) -> Result<Vec<u8>, RewriteError> {
    let mut doc: Value = serde_json::from_slice(body)?;
    edit(doc.as_object_mut().ok_or(RewriteError::NotAnObject)?);
    Ok(serde_json::to_vec(&doc)?)
}

const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true}"#;

/// Inserts `"stream_options":{...}` as the object's first member.
fn splice_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let mut out = Vec::with_capacity(body.len() + INCLUDE_USAGE.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(INCLUDE_USAGE);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    const USAGE: Rewrite = Rewrite {
        include_usage: true,
        clamp: None,
    };

    #[test]
    fn splices_include_usage_keeping_the_rest_byte_for_byte() {
        let body = br#"  {"model":"m","stream":true,"messages":[]}"#;
        let out = rewrite_body(body, &USAGE).unwrap();
        assert_eq!(
            out,
            br#"  {"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        assert_eq!(
            rewrite_body(b"{ }", &USAGE).unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#
        );
    }

    #[test]
    fn merges_into_existing_stream_options() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let out = json(&rewrite_body(body, &USAGE).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["stream_options"]["x"], 1);
        let body = br#"{"stream_options":null}"#;
        let out = json(&rewrite_body(body, &USAGE).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], true);
    }

    #[test]
    fn clamps_the_cap_field_the_request_used() {
        let edits = Rewrite {
            include_usage: false,
            clamp: Some((CapField::MaxCompletionTokens, 4096)),
        };
        let out = json(&rewrite_body(br#"{"max_completion_tokens":100000}"#, &edits).unwrap());
        assert_eq!(out["max_completion_tokens"], 4096);
    }

    #[test]
    fn an_escaped_stream_options_key_is_the_same_key() {
        let body = br#"{"stream_opti\u006fns":{"include_usage":false},"stream":true}"#;
        let out = json(&rewrite_body(body, &USAGE).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(
            out.as_object().unwrap().len(),
            2,
            "one stream_options: {out}"
        );
    }

    #[test]
    fn a_rewritten_model_keeps_every_number_exactly() {
        let out = json(&rewrite_model(br#"{"model":"a","x":7.444e108,"t":0.7}"#, "b").unwrap());
        // The correctly rounded values (rustc's), not the default parser's.
        assert_eq!(out["x"].as_f64(), Some(7.444e108));
        assert_eq!(out["t"].as_f64(), Some(0.7));
    }

    #[test]
    fn leaves_non_objects_and_empty_edits_alone() {
        assert_eq!(rewrite_body(b"[1]", &USAGE), None);
        assert_eq!(rewrite_body(b"", &USAGE), None);
        assert_eq!(rewrite_body(br#"{"a":1}"#, &Rewrite::default()), None);
        let edits = Rewrite {
            include_usage: false,
            clamp: Some((CapField::MaxTokens, 1)),
        };
        assert_eq!(rewrite_body(b"not json", &edits), None);
    }
}
