//! Wire formats: bodies parse, usage equals what was produced, errors have the
//! provider's shape, timing follows the model.

use std::time::Duration;

use serde_json::{Value, json};

use crate::client::{get, post, request};
use crate::{chat, message, start};

/// Prompt tokens of "Hello, simulator!" (17 chars → ceil(17/4)).
const PROMPT_TOKENS: u64 = 5;

#[tokio::test]
async fn chat_non_stream_usage_matches_text() {
    let server = start(&[]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat("m", json!({})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-llm-sim-zone"), Some("zone-a"));
    assert_eq!(resp.header("x-llm-sim-instance"), Some("sim-1"));
    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let words = choice["message"]["content"]
        .as_str()
        .unwrap()
        .split(' ')
        .count() as u64;
    assert_eq!(words, 5);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(body["usage"]["total_tokens"], 5 + PROMPT_TOKENS);

    // max_completion_tokens below the default length cuts it, with "length".
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat("other", json!({"max_completion_tokens": 2})),
    )
    .await;
    let body = resp.json();
    assert_eq!(body["model"], "other");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

/// Content deltas of an OpenAI chat stream, and the usage chunks seen.
fn chat_deltas(events: &[(String, Value)]) -> (Vec<String>, Vec<Value>, bool) {
    let mut deltas = Vec::new();
    let mut usages = Vec::new();
    let mut done = false;
    for (_, data) in events {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        assert!(!done, "data after [DONE]");
        assert_eq!(data["object"], "chat.completion.chunk");
        if let Some(content) = data["choices"][0]["delta"]["content"].as_str()
            && !content.is_empty()
        {
            deltas.push(content.to_owned());
        }
        if !data["usage"].is_null() {
            usages.push(data.clone());
        }
    }
    (deltas, usages, done)
}

#[tokio::test]
async fn chat_stream_with_and_without_include_usage() {
    let server = start(&[]).await;
    let addr = server.listen_addr();

    let resp = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let events = resp.sse();
    let (deltas, usages, done) = chat_deltas(&events);
    assert!(done, "{}", resp.text());
    assert_eq!(deltas.len(), 5);
    assert!(usages.is_empty());
    assert!(
        events.iter().all(|(_, d)| d.get("usage").is_none()),
        "no usage key without the option"
    );
    assert_eq!(events[0].1["choices"][0]["delta"]["role"], "assistant");
    let last_chunk = &events[events.len() - 2].1;
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "stop");

    let body = chat(
        "m",
        json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 3}),
    );
    let resp = post(addr, "/v1/chat/completions", &body).await;
    let events = resp.sse();
    let (deltas, usages, done) = chat_deltas(&events);
    assert!(done);
    assert_eq!(deltas.len(), 3);
    assert_eq!(usages.len(), 1);
    let usage_chunk = &usages[0];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], deltas.len());
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], PROMPT_TOKENS);
    // The usage chunk is the last before [DONE]; all others carry "usage": null.
    assert_eq!(&events[events.len() - 2].1, usage_chunk);
    let nulls = events
        .iter()
        .filter(|(_, d)| d.get("usage") == Some(&Value::Null));
    assert_eq!(nulls.count(), events.len() - 2);
    let finish = &events[events.len() - 3].1;
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    // One id for the whole stream, echoed model.
    let ids: Vec<_> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| d["id"].clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(events[0].1["model"], "m");
}

#[tokio::test]
async fn completions_non_stream_and_stream() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    let body = json!({"model": "m", "prompt": "abcdefgh", "max_tokens": 50});
    let resp = post(addr, "/v1/completions", &body).await;
    let json = resp.json();
    assert_eq!(json["object"], "text_completion");
    assert!(json["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = json["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 5);
    assert_eq!(json["usage"]["completion_tokens"], 5);
    assert_eq!(json["usage"]["prompt_tokens"], 2);
    assert_eq!(json["choices"][0]["finish_reason"], "stop");

    let body = json!({"model": "m", "prompt": [[1, 2, 3]], "stream": true,
        "stream_options": {"include_usage": true}});
    let resp = post(addr, "/v1/completions", &body).await;
    assert!(resp.complete);
    let events = resp.sse();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let texts: Vec<_> = events
        .iter()
        .filter_map(|(_, d)| d["choices"][0]["text"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts.len(), 5);
    let usage = &events[events.len() - 2].1["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["prompt_tokens"], 3, "token ids count one each");
}

#[tokio::test]
async fn messages_non_stream() {
    let server = start(&[]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/messages",
        &message("m", json!({})),
    )
    .await;
    assert_eq!(resp.status, 200);
    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "m");
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["stop_sequence"], Value::Null);
    let text = body["content"][0]["text"].as_str().unwrap();
    assert_eq!(body["content"][0]["type"], "text");
    let usage = &body["usage"];
    assert_eq!(usage["output_tokens"], text.split(' ').count());
    assert_eq!(usage["input_tokens"], PROMPT_TOKENS);
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);

    let resp = post(
        server.listen_addr(),
        "/v1/messages",
        &message("m", json!({"max_tokens": 2, "system": "abcd"})),
    )
    .await;
    let body = resp.json();
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["usage"]["output_tokens"], 2);
    assert_eq!(
        body["usage"]["input_tokens"],
        PROMPT_TOKENS + 1,
        "system counts"
    );
}

#[tokio::test]
async fn messages_stream_events_in_order_with_cumulative_usage() {
    let server = start(&["--output-tokens", "7"]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/messages",
        &message("m", json!({"stream": true})),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let events = resp.sse();
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "event name matches data type");
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(deltas.len(), 7);
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 7));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let start = &events[0].1["message"];
    assert_eq!(start["model"], "m");
    assert_eq!(start["usage"]["input_tokens"], PROMPT_TOKENS);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], deltas.len());
}

#[tokio::test]
async fn errors_have_the_provider_shape() {
    let server = start(&[]).await;
    let addr = server.listen_addr();

    let resp = post(addr, "/v1/chat/completions", &chat("unknown", json!({}))).await;
    assert_eq!(resp.status, 404);
    let body = resp.json();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown")
    );
    assert!(body["error"]["type"].is_string());

    let resp = post(addr, "/v1/messages", &message("unknown", json!({}))).await;
    assert_eq!(resp.status, 404);
    let body = resp.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");

    for (path, anthropic) in [
        ("/v1/chat/completions", false),
        ("/v1/completions", false),
        ("/v1/messages", true),
    ] {
        for bad in ["{not json", "", "[1,2]", r#"{"model": 3}"#, "\u{0}\u{1}"] {
            let resp = request(addr, "POST", path, Some(bad)).await.unwrap();
            assert_eq!(resp.status, 400, "{path} {bad:?}: {}", resp.text());
            let body = resp.json();
            if anthropic {
                assert_eq!(body["error"]["type"], "invalid_request_error");
            } else {
                assert_eq!(body["error"]["type"], "invalid_request_error");
                assert!(body["error"]["message"].is_string());
            }
        }
    }
    let no_max = json!({"model": "m", "messages": []});
    assert_eq!(post(addr, "/v1/messages", &no_max).await.status, 400);

    assert_eq!(get(addr, "/nope").await.status, 404);
    assert_eq!(get(addr, "/v1/chat/completions").await.status, 405);
    // The server survived all of it.
    assert_eq!(get(addr, "/health").await.status, 200);
}

#[tokio::test]
async fn health_and_models() {
    let server = start(&[]).await;
    let resp = get(server.listen_addr(), "/health").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-llm-sim-zone"), Some("zone-a"));
    let models = get(server.listen_addr(), "/v1/models").await.json();
    assert_eq!(models["object"], "list");
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("m"), json!("other")]);
}

#[tokio::test]
async fn ttft_grows_with_prompt_and_tokens_are_paced() {
    // 40 ms base + 0.5 ms per prompt token; 100 tokens/s.
    let server = start(&[
        "--ttft-ms",
        "40",
        "--ttft-per-prompt-token-us",
        "500",
        "--tokens-per-sec",
        "100",
        "--output-tokens",
        "11",
    ])
    .await;
    let addr = server.listen_addr();
    let short = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"max_tokens": 1})),
    )
    .await;
    let long_text = "x".repeat(800); // 200 prompt tokens → +100 ms
    let long_body = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": long_text}]});
    let long = post(addr, "/v1/chat/completions", &long_body).await;
    assert_eq!(long.json()["usage"]["prompt_tokens"], 200);
    assert!(
        short.elapsed >= Duration::from_millis(40),
        "{:?}",
        short.elapsed
    );
    assert!(
        long.elapsed >= Duration::from_millis(140),
        "{:?}",
        long.elapsed
    );
    assert!(long.elapsed > short.elapsed + Duration::from_millis(80));

    // 11 tokens at 100/s: 10 gaps of 10 ms after the first token.
    let paced = post(
        addr,
        "/v1/chat/completions",
        &chat("m", json!({"stream": true})),
    )
    .await;
    assert!(
        paced.elapsed >= Duration::from_millis(40 + 100),
        "{:?}",
        paced.elapsed
    );
    assert!(
        paced.elapsed < Duration::from_secs(3),
        "{:?}",
        paced.elapsed
    );
}
