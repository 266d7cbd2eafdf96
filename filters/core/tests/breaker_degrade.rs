//! Degradation: fail-fast errors, fallback reroutes, static answers (JSON
//! and SSE, parsed back strictly), and the model rewrite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "breaker_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice_core::breaker::{
    BACKEND_HEADER, ClientRequest, DEGRADED_HEADER, Degradation, LocalReply, REASON_HEADER,
    RejectReason, RewriteError, degrade, fail_fast, rewrite_model,
};
use sluice_core::config::{Api, DegradeAction, DegradeConfig};

/// One server-sent event.
#[derive(Debug, PartialEq)]
struct Event {
    event: Option<String>,
    data: String,
}

/// A strict parser for the SSE subset LLM APIs use (the WHATWG event-stream
/// format without `id`/`retry`): `field: value` lines, events separated by
/// a blank line, `\n` line ends. Anything else — an unknown field, a line
/// without a colon, a repeated `event`, a stream that does not end with a
/// blank line — is an error, so a malformed stream fails the test.
fn parse_sse(stream: &str) -> Result<Vec<Event>, String> {
    if !stream.ends_with("\n\n") {
        return Err("the stream does not end with a blank line".into());
    }
    let mut events = vec![];
    for block in stream[..stream.len() - 2].split("\n\n") {
        let mut event = None;
        let mut data: Vec<&str> = vec![];
        for line in block.split('\n') {
            let (field, value) = line
                .split_once(':')
                .ok_or_else(|| format!("line without a field: {line:?}"))?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" if event.is_none() => event = Some(value.to_string()),
                "data" => data.push(value),
                _ => return Err(format!("unexpected field {field:?} in {block:?}")),
            }
        }
        if data.is_empty() {
            return Err(format!("an event without data: {block:?}"));
        }
        events.push(Event {
            event,
            data: data.join("\n"),
        });
    }
    Ok(events)
}

fn header<'a>(reply: &'a LocalReply, name: &str) -> &'a str {
    reply
        .headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", reply.headers))
}

fn reply_of(d: Degradation) -> LocalReply {
    match d {
        Degradation::Reply(r) => r,
        other => panic!("expected a local reply, got {other:?}"),
    }
}

fn cfg(action: DegradeAction) -> DegradeConfig {
    DegradeConfig {
        action,
        retry_after: secs(5),
    }
}

fn request(api: Api, stream: bool) -> ClientRequest<'static> {
    ClientRequest {
        api,
        stream,
        model: "gpt-4o",
    }
}

#[test]
fn fail_fast_is_a_503_with_retry_after_in_the_openai_shape() {
    let d = degrade(
        &cfg(DegradeAction::FailFast),
        RejectReason::CircuitOpen,
        None,
        &request(Api::Openai, true),
        at(0.0),
    );
    let r = reply_of(d);
    assert_eq!(r.status, 503);
    assert_eq!(header(&r, "retry-after"), "5");
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, DEGRADED_HEADER), "fail-fast");
    assert_eq!(header(&r, REASON_HEADER), "circuit-open");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    let error = body["error"].as_object().unwrap();
    assert!(error["message"].as_str().unwrap().contains("circuit open"));
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "circuit-open");
    assert!(error["param"].is_null());
    assert_eq!(body.as_object().unwrap().len(), 1);
}

#[test]
fn fail_fast_in_the_anthropic_shape_and_retry_after_rounds_up() {
    let r = fail_fast(
        RejectReason::QueueTimeout,
        Duration::from_millis(2_100),
        Api::Anthropic,
    );
    assert_eq!(header(&r, "retry-after"), "3");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("waiting")
    );
    // An open circuit's own estimate beats the configured value.
    let d = degrade(
        &cfg(DegradeAction::FailFast),
        RejectReason::CircuitOpen,
        Some(Duration::from_secs(42)),
        &request(Api::Anthropic, false),
        at(0.0),
    );
    assert_eq!(header(&reply_of(d), "retry-after"), "42");
    let r = fail_fast(RejectReason::Throttled, Duration::ZERO, Api::Openai);
    assert_eq!(header(&r, "retry-after"), "1", "never zero");
}

#[test]
fn fallback_reroutes_and_labels_the_response() {
    let action = DegradeAction::FallbackModel {
        model: "gpt-4o-mini".into(),
        backend: "fallback".into(),
    };
    match degrade(
        &cfg(action.clone()),
        RejectReason::BulkheadFull,
        None,
        &request(Api::Openai, false),
        at(0.0),
    ) {
        Degradation::Reroute(r) => {
            assert_eq!(r.model, "gpt-4o-mini");
            assert_eq!(
                r.request_headers,
                vec![(BACKEND_HEADER, "fallback".to_string())]
            );
            assert!(
                r.response_headers
                    .contains(&(DEGRADED_HEADER, "fallback-model".to_string()))
            );
            assert!(
                r.response_headers
                    .contains(&(REASON_HEADER, "bulkhead-full".to_string()))
            );
        }
        other => panic!("{other:?}"),
    }
    // Already on the fallback model: rerouting would loop, so fail fast.
    let on_fallback = ClientRequest {
        api: Api::Openai,
        stream: false,
        model: "gpt-4o-mini",
    };
    let r = reply_of(degrade(
        &cfg(action),
        RejectReason::CircuitOpen,
        None,
        &on_fallback,
        at(0.0),
    ));
    assert_eq!(r.status, 503);
}

fn static_reply(api: Api, stream: bool) -> LocalReply {
    let action = DegradeAction::Static {
        text: "Service is busy: \"please\" retry\nlater.".into(),
    };
    reply_of(degrade(
        &cfg(action),
        RejectReason::Throttled,
        None,
        &request(api, stream),
        at(12.0),
    ))
}

const TEXT: &str = "Service is busy: \"please\" retry\nlater.";

#[test]
fn static_openai_json() {
    let r = static_reply(Api::Openai, false);
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, DEGRADED_HEADER), "static");
    assert_eq!(header(&r, "content-type"), "application/json");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["created"], 1_800_000_012u64);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 0);
}

#[test]
fn static_openai_stream_is_valid_sse_ending_with_done() {
    let r = static_reply(Api::Openai, true);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let events = parse_sse(&r.body).unwrap();
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(
        last,
        &Event {
            event: None,
            data: "[DONE]".into()
        }
    );
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|e| {
            assert_eq!(e.event, None);
            serde_json::from_str(&e.data).unwrap()
        })
        .collect();
    assert!(chunks.len() >= 2);
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["model"], "gpt-4o");
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(text, TEXT);
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert!(finishes[..finishes.len() - 1].iter().all(|f| f.is_null()));
    assert_eq!(finishes.last().unwrap().as_str(), Some("stop"));
}

#[test]
fn static_anthropic_json() {
    let r = static_reply(Api::Anthropic, false);
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["content"][0]["text"], TEXT);
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["output_tokens"], 0);
}

#[test]
fn static_anthropic_stream_follows_the_event_sequence() {
    let r = static_reply(Api::Anthropic, true);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let events = parse_sse(&r.body).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    for (name, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *name, "the data's type names its event");
    }
    assert_eq!(data[0]["message"]["role"], "assistant");
    assert_eq!(data[0]["message"]["model"], "gpt-4o");
    assert_eq!(data[0]["message"]["content"], Value::Array(vec![]));
    assert_eq!(data[1]["content_block"]["type"], "text");
    assert_eq!(data[2]["delta"]["type"], "text_delta");
    assert_eq!(data[2]["delta"]["text"], TEXT);
    assert_eq!(data[4]["delta"]["stop_reason"], "end_turn");
}

#[test]
fn the_sse_parser_is_strict() {
    assert!(parse_sse("data: {}\n\n").is_ok());
    assert!(parse_sse("data: {}\n").is_err());
    assert!(parse_sse("nonsense\n\n").is_err());
    assert!(parse_sse("event: a\n\n").is_err());
    assert!(parse_sse("id: 1\ndata: x\n\n").is_err());
}

#[test]
fn rewrite_model_changes_only_the_top_level_model() {
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"use \"model\": \"x\""}],"stream":true,"n":1,"temperature":0.7}"#;
    let out: Value = serde_json::from_slice(&rewrite_model(body, "gpt-4o-mini").unwrap()).unwrap();
    let mut expected: Value = serde_json::from_slice(body).unwrap();
    expected["model"] = "gpt-4o-mini".into();
    assert_eq!(out, expected);

    // Absent: added. Duplicated: exactly one remains.
    let out: Value =
        serde_json::from_slice(&rewrite_model(b"{\"messages\":[]}", "m").unwrap()).unwrap();
    assert_eq!(out["model"], "m");
    let out = rewrite_model(br#"{"model":"a","model":"b"}"#, "m").unwrap();
    assert_eq!(out, br#"{"model":"m"}"#);

    assert!(matches!(
        rewrite_model(b"[1,2]", "m"),
        Err(RewriteError::NotAnObject)
    ));
    assert!(matches!(
        rewrite_model(b"{\"model\":", "m"),
        Err(RewriteError::NotJson(_))
    ));
    assert!(matches!(
        rewrite_model(b"", "m"),
        Err(RewriteError::NotJson(_))
    ));
    // A model name that needs escaping stays one JSON string.
    let out: Value = serde_json::from_slice(&rewrite_model(b"{}", "a\"b\\c").unwrap()).unwrap();
    assert_eq!(out["model"], "a\"b\\c");
}

#[test]
fn every_reason_has_a_distinct_spelling() {
    let mut names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), RejectReason::ALL.len());
}
