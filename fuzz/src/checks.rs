//! The properties the fuzz targets check, shared with the corpus replay test.
//!
//! Each `check_*` function takes the raw fuzzer input and panics (through
//! `assert!`) when a property fails; "no panic" is the first property of all
//! of them, as filter code runs in a Wasm VM where a panic breaks traffic.
//! The same file is compiled into the fuzz crate (`fuzz/src/lib.rs`) and
//! into `filters/policy/tests/fuzz_corpus_replay.rs` (through `#[path]`), so
//! a corpus file is judged by exactly the same code on stable `cargo test`
//! as under libFuzzer. It uses only `sluice_core`, `sluice_policy` and
//! `serde_json`, which both crates depend on.
//!
//! Input layouts (the first bytes steer, the rest is the payload):
//!
//! - `policy_toml`, `policy_json`, `identity`: the whole input is the text.
//! - `sse_usage`: `[flags][n][n × u16 LE cut offsets][body]`; flags bit 0 =
//!   SSE framing (else JSON), bit 1 = small size limits (so the overflow
//!   paths are reachable with small inputs).
//! - `request_body`: `[selector][body]`; selector bits 0–1 = API path,
//!   bits 2–3 = cap field to clamp (none, or one of the three).
//! - `rate_limit_headers`: lines `name: value` (the value arbitrary bytes
//!   up to the newline), as an upstream's answer carries them.

use std::sync::OnceLock;

use serde_json::{Map, Value};
use sluice_core::config::TokensConfig;
use sluice_core::llm::{
    ApiShape, BodyProblem, CapField, Framing, MAX_SANE_TOKENS, RequestInfo, Rewrite, RewriteError,
    RouteFields, SseLineReader, UsageFallback, UsageParser, UsageReport, rewrite_body,
    rewrite_model,
};
use sluice_core::tenant::{api_key_tenant, bearer_token};
use sluice_policy::{Diagnostics, Policy, explain, parse_config_bytes, parse_json, parse_toml};

/// The fuzz targets, by name: the directories under `fuzz/corpus/`.
pub const TARGETS: [&str; 6] = [
    "policy_toml",
    "policy_json",
    "sse_usage",
    "request_body",
    "identity",
    "rate_limit_headers",
];

/// Runs the check of `target` on `data`, tolerating the known findings
/// (see [`Findings`]); `false` for an unknown target.
pub fn check(target: &str, data: &[u8]) -> bool {
    check_with(target, data, Findings::Tolerate)
}

/// Runs the check of `target` on `data`: with [`Findings::Assert`], the
/// properties broken by the known findings are asserted too (what
/// `fuzz/findings/` reproduces).
pub fn check_with(target: &str, data: &[u8], findings: Findings) -> bool {
    match target {
        "policy_toml" => policy_toml(data, findings),
        "policy_json" => policy_json(data, findings),
        "sse_usage" => check_sse_usage(data),
        "request_body" => request_body(data, findings),
        "identity" => check_identity(data),
        "rate_limit_headers" => check_rate_limit_headers(data),
        _ => return false,
    }
    true
}

/// What to do about a property that a known, reported and not yet fixed
/// finding breaks (listed in `fuzz/README.md`, reproduced by the files in
/// `fuzz/findings/`). Tolerating it lets the fuzzer keep looking for new
/// problems instead of finding the same one again; each tolerance is as
/// narrow as the finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Findings {
    Tolerate,
    Assert,
}

// ---------------------------------------------------------------- policies

/// Configuration bytes as a filter reads them (`parse_config_bytes`: lossy
/// UTF-8, then JSON when the text starts with `{`, TOML otherwise); a text
/// starting with `{` is read as TOML as well, so every input reaches the
/// TOML reader. Each reader runs once per input: policy parsing is the
/// slowest target.
pub fn check_policy_toml(data: &[u8]) {
    policy_toml(data, Findings::Tolerate);
}

fn policy_toml(data: &[u8], findings: Findings) {
    let text = String::from_utf8_lossy(data);
    policy_outcome(&text, parse_config_bytes("plugin", data), findings);
    if text.trim_start().starts_with('{') {
        policy_outcome(&text, parse_toml("fuzz.toml", &text), findings);
    }
}

/// A policy text read as JSON (Istio's `pluginConfig`).
pub fn check_policy_json(data: &[u8]) {
    policy_json(data, Findings::Tolerate);
}

fn policy_json(data: &[u8], findings: Findings) {
    let text = String::from_utf8_lossy(data);
    policy_outcome(&text, parse_json("fuzz.json", &text), findings);
}

/// What every parse result must satisfy: an error has at least one
/// diagnostic, every span lies inside the text, and both renderings work;
/// an accepted policy explains itself as TOML that reads back to the same
/// policy (what `sluice explain` promises).
fn policy_outcome(text: &str, result: Result<Policy, Diagnostics>, findings: Findings) {
    match result {
        Err(d) => {
            assert!(!d.items.is_empty(), "an error without a diagnostic");
            assert_eq!(d.source.text, text, "diagnostics about another text");
            for item in &d.items {
                if let Some(span) = &item.loc.span {
                    assert!(
                        span.start <= span.end && span.end <= text.len(),
                        "span {span:?} outside a {}-byte text",
                        text.len()
                    );
                }
            }
            let _ = d.to_compact_string();
            // The rustc-style rendering (the CLI's) is four fifths of the
            // time of this check when every diagnostic is rendered; each is
            // rendered alone by the same code, so one per input is enough
            // for the fuzzer to reach it, and the first is the one whose
            // span varies most (the parse error or the first decode error).
            let first = Diagnostics {
                source: d.source.clone(),
                items: d.items[..1].to_vec(),
            };
            let _ = first.render(false);
        }
        Ok(policy) => {
            let _ = explain::summary(&policy);
            // Finding 3: `backend = []` passes the "declares no backend"
            // check, which only looks for the key; such a policy names a
            // default backend "" that its own explanation then rejects.
            if policy.backends.is_empty() && findings == Findings::Tolerate {
                return;
            }
            assert!(
                !policy.backends.is_empty(),
                "a policy without backends was accepted"
            );
            let effective = explain::effective_toml(&policy)
                .unwrap_or_else(|e| panic!("an accepted policy does not explain: {e}"));
            let again = parse_toml("effective.toml", &effective).unwrap_or_else(|d| {
                panic!(
                    "the explained policy does not read back:\n{effective}\n{}",
                    d.to_compact_string()
                )
            });
            assert_eq!(again, policy, "explain is lossy:\n{effective}");
        }
    }
}

// ---------------------------------------------------------------- responses

/// Little-endian u16s and the rest of the input.
struct Steer<'a> {
    data: &'a [u8],
}

impl<'a> Steer<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}

const FALLBACK: UsageFallback = UsageFallback {
    prompt_tokens: 50,
    chars_per_token: 4.0,
};

/// A response body read by [`UsageParser`] (JSON or SSE framing) in chunks
/// cut at fuzzer-chosen offsets, and by [`SseLineReader`]: no panic, and the
/// result does not depend on where the chunks were cut.
pub fn check_sse_usage(data: &[u8]) {
    let mut steer = Steer { data };
    let flags = steer.byte();
    let n = usize::from(steer.byte() % 16);
    let raw_cuts: Vec<u16> = (0..n).map(|_| steer.u16()).collect();
    let body = steer.data;
    let mut cuts: Vec<usize> = raw_cuts
        .iter()
        .map(|&c| usize::from(c) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();

    let framing = if flags & 1 == 1 {
        Framing::Sse
    } else {
        Framing::Json
    };
    let (max_line, max_json) = if flags & 2 == 2 {
        (64, 512)
    } else {
        (
            sluice_core::llm::DEFAULT_MAX_LINE,
            sluice_core::llm::DEFAULT_MAX_JSON_BODY,
        )
    };

    let split = usage_report(framing, max_line, max_json, body, &cuts);
    let whole = usage_report(framing, max_line, max_json, body, &[]);
    assert_eq!(
        split, whole,
        "usage depends on the chunking (cuts {cuts:?})"
    );
    let u = split.usage;
    let parts = u
        .input_tokens
        .saturating_add(u.output_tokens)
        .saturating_add(u.cache_creation_input_tokens)
        .saturating_add(u.cache_read_input_tokens);
    assert!(u.total_tokens >= parts, "total below its parts: {u:?}");
    if split.source == sluice_core::llm::UsageSource::Reported {
        for v in [
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens,
        ] {
            assert!(v <= MAX_SANE_TOKENS, "reported usage not clamped: {u:?}");
        }
    }

    let (lines, overflows) = sse_lines(max_line, body, &cuts);
    assert_eq!(
        (&lines, overflows),
        (
            &sse_lines(max_line, body, &[]).0,
            sse_lines(max_line, body, &[]).1
        ),
        "SSE lines depend on the chunking (cuts {cuts:?})"
    );
    for line in &lines {
        assert!(line.len() <= max_line, "a line longer than max_line");
        assert!(
            !line.iter().any(|&b| b == b'\n' || b == b'\r'),
            "a line end inside a line"
        );
    }
    if overflows == 0 {
        let text: Vec<u8> = body
            .iter()
            .copied()
            .filter(|&b| b != b'\n' && b != b'\r')
            .collect();
        assert_eq!(lines.concat(), text, "bytes lost or invented between lines");
    }
}

fn usage_report(
    framing: Framing,
    max_line: usize,
    max_json: usize,
    body: &[u8],
    cuts: &[usize],
) -> UsageReport {
    let mut parser = UsageParser::with_limits(framing, max_line, max_json);
    for piece in pieces(body, cuts) {
        parser.feed(piece);
    }
    parser.finish(&FALLBACK)
}

fn sse_lines(max_line: usize, body: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, u32) {
    let mut reader = SseLineReader::new(max_line);
    let mut lines = Vec::new();
    for piece in pieces(body, cuts) {
        reader.feed(piece, |l| lines.push(l.to_vec()));
    }
    reader.finish(|l| lines.push(l.to_vec()));
    (lines, reader.overflows())
}

/// `body` cut at the sorted offsets `cuts` (empty pieces included: the
/// host may hand over an empty chunk).
fn pieces<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        out.push(&body[start..cut]);
        start = cut;
    }
    out.push(&body[start..]);
    out
}

// ---------------------------------------------------------------- requests

const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
];

const CLAMPS: [Option<CapField>; 4] = [
    None,
    Some(CapField::MaxCompletionTokens),
    Some(CapField::MaxTokens),
    Some(CapField::MaxOutputTokens),
];

const CLAMP_TOKENS: u64 = 4096;

/// A model name that needs escaping in JSON.
const FALLBACK_MODEL: &str = "fallback \"m\" \u{e9}\\";

/// The token settings of a default policy with a `[tokens]` section.
fn tokens_config() -> &'static TokensConfig {
    static CONFIG: OnceLock<TokensConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = r#"
[[backend]]
name = "llm"
models = ["*"]

  [[backend.zone]]
  name = "local"
  endpoints = ["127.0.0.1:8000"]

[tokens]

  [[tokens.quota]]
  tokens = "100k/min"
"#;
        match parse_toml("fuzz-tokens.toml", text) {
            Ok(Policy {
                tokens: Some(tokens),
                ..
            }) => tokens,
            Ok(_) => panic!("the fuzz policy has no [tokens]"),
            Err(d) => panic!("the fuzz policy is invalid: {d}"),
        }
    })
}

/// A request body through everything that reads or edits it: no panic; the
/// breaker's `RouteFields` agrees with `RequestInfo`; a JSON object comes
/// out of `rewrite_body` and `rewrite_model` as a JSON object with the edit
/// made and every other member unchanged.
pub fn check_request_body(data: &[u8]) {
    request_body(data, Findings::Tolerate);
}

fn request_body(data: &[u8], findings: Findings) {
    let mut steer = Steer { data };
    let selector = steer.byte();
    let body = steer.data;
    let path = PATHS[usize::from(selector & 3)];
    let clamp = CLAMPS[usize::from((selector >> 2) & 3)];
    let cfg = tokens_config();

    let info = RequestInfo::parse(path, body, cfg);
    assert_eq!(info.api, ApiShape::from_path(path));
    let read = RequestInfo::read(path, body);
    assert_eq!(
        (&read.model, read.stream, read.cap, read.problem),
        (&info.model, info.stream, info.cap, info.problem),
        "parse and read disagree"
    );

    // RouteFields skips what it does not need, so it reads some bodies that
    // a Value tree refuses (nesting past the recursion limit): agreement is
    // required wherever RequestInfo read the JSON.
    let fields = RouteFields::read(body);
    if info.problem != Some(BodyProblem::NotJson) {
        assert_eq!(
            (&fields.model, fields.stream),
            (&info.model, info.stream),
            "RouteFields and RequestInfo disagree"
        );
    }

    let edits = Rewrite {
        include_usage: true,
        clamp: clamp.map(|f| (f, CLAMP_TOKENS)),
    };
    let rewritten = rewrite_body(body, &edits);
    let model = rewrite_model(body, FALLBACK_MODEL);
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(original)) => {
            let out = rewritten.unwrap_or_else(|| panic!("a JSON object was not rewritten"));
            let out = json_object(&out, "rewrite_body");
            let options = out.get("stream_options").and_then(Value::as_object);
            // Finding 1: the splice path looks for the key's raw bytes, so a
            // `stream_options` key spelled with an escape is not seen; the
            // spliced one comes first and the client's, later, wins.
            let escaped_key = clamp.is_none()
                && original.contains_key("stream_options")
                && !contains(body, br#""stream_options""#);
            if !(escaped_key && findings == Findings::Tolerate) {
                assert_eq!(
                    options.and_then(|o| o.get("include_usage")),
                    Some(&Value::Bool(true)),
                    "include_usage not set"
                );
            }
            let mut changed = vec!["stream_options"];
            if let Some(field) = clamp {
                assert_eq!(out.get(field.name()), Some(&Value::from(CLAMP_TOKENS)));
                changed.push(field.name());
            }
            same_members(&original, &out, &changed, "rewrite_body");
            if let (Some(Value::Object(before)), Some(after)) =
                (original.get("stream_options"), options)
            {
                same_members(before, after, &["include_usage"], "stream_options");
            }

            let out = model.unwrap_or_else(|e| panic!("rewrite_model refused an object: {e}"));
            let out = json_object(&out, "rewrite_model");
            assert_eq!(out.get("model"), Some(&Value::from(FALLBACK_MODEL)));
            same_members(&original, &out, &["model"], "rewrite_model");
        }
        Ok(_) => {
            assert_eq!(rewritten, None, "a JSON non-object was rewritten");
            assert!(matches!(model, Err(RewriteError::NotAnObject)));
        }
        // Not JSON: `rewrite_model` refuses it. `rewrite_body` may still
        // splice `stream_options` into text that starts with `{` (it does not
        // parse the body on that path), so nothing is asserted about it: the
        // tokens filter rewrites only bodies that `RequestInfo` read.
        Err(_) => assert!(matches!(model, Err(RewriteError::NotJson(_)))),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn json_object(bytes: &[u8], what: &str) -> Map<String, Value> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(o)) => o,
        Ok(other) => panic!("{what} returned a JSON non-object: {other}"),
        Err(e) => panic!(
            "{what} returned invalid JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

/// Every member of `before` and `after` but those in `except` is the same,
/// floats to within a few units in the last place (see [`same_value`]).
fn same_members(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    except: &[&str],
    what: &str,
) {
    let keep = |m: &Map<String, Value>| -> Vec<(String, Value)> {
        let mut v: Vec<(String, Value)> = m
            .iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (before, after) = (keep(before), keep(after));
    let same = before.len() == after.len()
        && before
            .iter()
            .zip(&after)
            .all(|(b, a)| b.0 == a.0 && same_value(&b.1, &a.1));
    assert!(same, "{what} changed other members:\n{before:?}\n{after:?}");
}

/// Equal JSON values, floats compared with a relative tolerance of a few
/// ULP. The check reads both documents with serde_json, whose default float
/// parser is not correctly rounded: it reads `7.444e108` as
/// `7.443999999999999e108`, so the re-read output of a correct rewrite can
/// differ from the re-read input in the last bit. (The same imprecision in
/// sluice's own parse is finding 2 in fuzz/README.md, which this check
/// cannot see, as both sides use serde_json.)
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

// ---------------------------------------------------------------- identity

/// Header values and paths: the bearer token is a trimmed, non-empty piece
/// of the header; a tenant id is `key-` and 16 lowercase hex digits; a query
/// string never changes the API shape of a path.
pub fn check_identity(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    if let Some(token) = bearer_token(text) {
        assert!(!token.is_empty());
        assert_eq!(token, token.trim(), "an untrimmed token");
        assert!(text.contains(token));
        let scheme = text.trim_start().get(..6).unwrap_or("");
        assert!(
            scheme.eq_ignore_ascii_case("bearer"),
            "not a bearer header: {text:?}"
        );
    }

    for key in [text, bearer_token(text).unwrap_or("")] {
        let id = api_key_tenant(key);
        assert_eq!(id.len(), 20, "tenant id {id:?}");
        assert!(id.starts_with("key-"));
        assert!(
            id[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "tenant id {id:?}"
        );
    }

    let shape = ApiShape::from_path(text);
    if !text.contains(['?', '#']) {
        assert_eq!(
            shape,
            ApiShape::from_path(&format!("{text}?x=/v1/messages"))
        );
        assert_eq!(shape, ApiShape::from_path(&format!("{text}#/v1/responses")));
    }
    let vendor = shape.vendor(sluice_core::config::Api::Anthropic);
    if shape != ApiShape::Other {
        assert_eq!(vendor, shape.vendor(sluice_core::config::Api::Openai));
    }
}

// ---------------------------------------------------------- rate limits

/// An upstream's rate-limit headers, whatever their bytes: the reset time
/// ([`sluice_core::outlier::reset::cooldown`]) and the quota left
/// ([`sluice_core::failover::headroom`]) never panic, a share left is in
/// [0, 1], a reading ends after it was taken and at most a minute later,
/// and a request count in flight never makes the use exceed 100%.
pub fn check_rate_limit_headers(data: &[u8]) {
    use sluice_core::time::Timestamp;
    // 2026-11-29T19:02:39Z: inside the range every date grammar reaches.
    const NOW: Timestamp = Timestamp(1_795_978_959_000_000_000);
    let headers: Vec<(String, &[u8])> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            Some((name, value))
        })
        .collect();
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let _ = sluice_core::outlier::reset::cooldown(get, NOW);
    if let Some(h) = sluice_core::failover::headroom(get, NOW) {
        assert!((0.0..=1.0).contains(&h.left), "left {}", h.left);
        assert_eq!(h.at, NOW);
        assert!(h.until >= NOW && h.until <= NOW + sluice_core::failover::quota::READING_TTL);
        for in_flight in [0, 1, u32::MAX] {
            let used = h.used(NOW, in_flight);
            assert!(
                used.is_none_or(|u| (0.0..=1.0).contains(&u)),
                "used {used:?}"
            );
        }
        if let Some((remaining, limit)) = h.requests {
            assert!(limit > 0 && remaining <= limit);
        }
    }
}
