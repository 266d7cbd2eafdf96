//! `n` choices and batched legacy prompts: one completion per choice, usage
//! summed over them, streamed and not.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::client::post;
use crate::{chat, start, stats};

/// Words of each streamed choice, by index, and the usage chunk if any.
fn streamed_choices(events: &[(String, Value)]) -> (BTreeMap<u64, String>, Option<Value>) {
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    let mut usage = None;
    for (_, data) in events {
        if let Some(u) = data.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for choice in data["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().unwrap();
            let piece = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .unwrap_or("");
            texts.entry(index).or_default().push_str(piece);
        }
    }
    (texts, usage)
}

#[tokio::test]
async fn chat_n_gives_n_choices_and_sums_their_usage() {
    let server = start(&[]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat("m", json!({"n": 3, "max_tokens": 4})),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i as u64);
        let text = choice["message"]["content"].as_str().unwrap();
        assert_eq!(text.split_whitespace().count(), 4, "{text}");
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_ne!(
        choices[0]["message"]["content"],
        choices[1]["message"]["content"]
    );
    assert_eq!(body["usage"]["completion_tokens"], 12);
    assert_eq!(
        body["usage"]["total_tokens"],
        body["usage"]["prompt_tokens"].as_u64().unwrap() + 12
    );
    assert_eq!(stats(&server).await["tokens_produced"], 12);
}

#[tokio::test]
async fn chat_stream_interleaves_n_choices_and_reports_their_usage() {
    let server = start(&[]).await;
    let resp = post(
        server.listen_addr(),
        "/v1/chat/completions",
        &chat(
            "m",
            json!({"n": 2, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let events = resp.sse();
    assert_eq!(events.last().unwrap().1, Value::String("[DONE]".into()));
    let (texts, usage) = streamed_choices(&events);
    assert_eq!(texts.keys().copied().collect::<Vec<_>>(), [0, 1]);
    for text in texts.values() {
        assert_eq!(text.split_whitespace().count(), 5, "{text}");
    }
    assert_eq!(usage.unwrap()["completion_tokens"], 10);
    let finishes = events
        .iter()
        .filter(|(_, d)| d["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 2);
    assert_eq!(stats(&server).await["tokens_produced"], 10);
}

#[tokio::test]
async fn batched_prompts_give_a_choice_per_prompt_and_n() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    for (prompt, n, choices) in [
        (json!(["one prompt", "another", "a third"]), 2, 6),
        (json!([[1, 2], [3]]), 1, 2),
        (json!([1, 2, 3]), 1, 1),
        (json!("just one"), 3, 3),
    ] {
        let body = json!({"model": "m", "prompt": prompt, "n": n, "max_tokens": 3});
        let resp = post(addr, "/v1/completions", &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let json = resp.json();
        let got = json["choices"].as_array().unwrap();
        assert_eq!(got.len(), choices, "{prompt}");
        let indices: Vec<u64> = got.iter().map(|c| c["index"].as_u64().unwrap()).collect();
        assert_eq!(indices, (0..choices as u64).collect::<Vec<_>>());
        assert_eq!(json["usage"]["completion_tokens"], 3 * choices as u64);
    }
    // Streamed: every choice's tokens, and their usage.
    let body = json!({"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 3,
                      "stream": true, "stream_options": {"include_usage": true}});
    let resp = post(addr, "/v1/completions", &body).await;
    let (texts, usage) = streamed_choices(&resp.sse());
    assert_eq!(texts.len(), 4);
    assert!(texts.values().all(|t| t.split_whitespace().count() == 3));
    assert_eq!(usage.unwrap()["completion_tokens"], 12);
}

#[tokio::test]
async fn absurd_counts_are_400() {
    let server = start(&[]).await;
    let addr = server.listen_addr();
    for extra in [
        json!({"n": 0}),
        json!({"n": 129}),
        json!({"n": -1}),
        json!({"n": 1.5}),
    ] {
        let resp = post(addr, "/v1/chat/completions", &chat("m", extra.clone())).await;
        assert_eq!(resp.status, 400, "{extra}: {}", resp.text());
    }
    let empty = json!({"model": "m", "prompt": []});
    assert_eq!(post(addr, "/v1/completions", &empty).await.status, 400);
    let huge = json!({"model": "m", "prompt": vec!["x"; 64], "n": 128});
    assert_eq!(post(addr, "/v1/completions", &huge).await.status, 400);
    assert_eq!(stats(&server).await["tokens_produced"], 0);
}
