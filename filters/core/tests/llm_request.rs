//! Reading requests, planning their reservation, and the body edits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::num::NonZeroU32;

use common::{config, quota, rate};
use proptest::prelude::*;
use serde_json::Value;
use sluice_core::config::{Api, OverCap};
use sluice_core::llm::{
    ApiShape, BodyProblem, Cap, CapField, ErrorKind, RequestInfo, Rewrite, error_body, rewrite_body,
};
use sluice_core::tokens::{Limiter, Plan, QuotaId, Reservation};

fn parse(path: &str, body: &str) -> RequestInfo {
    RequestInfo::parse(path, body.as_bytes(), &config(vec![]))
}

#[test]
fn chat_request_with_string_and_part_contents() {
    let info = parse(
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"max_completion_tokens":300,"max_tokens":5,
            "messages":[
              {"role":"system","content":"Be brief."},
              {"role":"user","content":[{"type":"text","text":"What is in"},
                                        {"type":"image_url","image_url":{"url":"https://x/y.png"}},
                                        {"type":"text","text":" this image?"}]},
              {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                 "function":{"name":"look","arguments":"{\"q\":1}"}}]}
            ]}"#,
    );
    assert_eq!(info.api, ApiShape::ChatCompletions);
    assert_eq!(info.model.as_deref(), Some("gpt-4o"));
    assert!(info.stream && !info.include_usage && info.lacks_stream_usage());
    assert_eq!(
        info.cap,
        Cap::Given {
            field: CapField::MaxCompletionTokens,
            tokens: 300
        },
        "max_completion_tokens wins over the deprecated max_tokens"
    );
    // "Be brief." 9 + "What is in" 10 + " this image?" 12 + `{"q":1}` 7.
    assert_eq!(info.prompt_chars, 38);
    assert_eq!(info.prompt_tokens, 10, "38 / 4 rounded up");
    assert_eq!(info.problem, None);
}

#[test]
fn anthropic_request_uses_the_model_ratio() {
    let info = parse(
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":[{"type":"text","text":"You are terse."}],
            "messages":[{"role":"user","content":"Hello, Claude"},
                        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"42"}]}]}]}"#,
    );
    assert_eq!(info.api, ApiShape::Messages);
    assert_eq!(info.prompt_chars, 14 + 13 + 2);
    assert_eq!(info.prompt_tokens, 9, "29 / 3.5 (claude-*) rounded up");
    assert_eq!(
        info.cap,
        Cap::Given {
            field: CapField::MaxTokens,
            tokens: 1024
        }
    );
}

#[test]
fn responses_and_completions_requests() {
    let info = parse(
        "/v1/responses",
        r#"{"model":"gpt-4.1","instructions":"Talk like a pirate.","max_output_tokens":50,
            "input":[{"role":"user","content":[{"type":"input_text","text":"Are semicolons optional?"}]}]}"#,
    );
    assert_eq!(info.prompt_chars, 19 + 24);
    assert_eq!(
        info.cap,
        Cap::Given {
            field: CapField::MaxOutputTokens,
            tokens: 50
        }
    );
    let info = parse("/v1/responses", r#"{"model":"m","input":"abcd"}"#);
    assert_eq!((info.prompt_chars, info.cap), (4, Cap::Absent));
    let info = parse(
        "/v1/completions",
        r#"{"model":"i","prompt":[[1,2,3],[4]],"max_tokens":7.0,"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!((info.prompt_chars, info.prompt_token_ids), (0, 4));
    assert_eq!(info.prompt_tokens, 4, "token ids count one each");
    assert!(!info.lacks_stream_usage());
    assert_eq!(
        info.cap,
        Cap::Given {
            field: CapField::MaxTokens,
            tokens: 7
        },
        "an integral float is a count"
    );
}

#[test]
fn bad_bodies_are_flagged_never_fatal() {
    assert_eq!(
        parse("/v1/chat/completions", "").problem,
        Some(BodyProblem::NotJson)
    );
    assert_eq!(
        parse("/v1/chat/completions", "{\"model\":").problem,
        Some(BodyProblem::NotJson)
    );
    assert_eq!(
        parse("/v1/chat/completions", "[1,2]").problem,
        Some(BodyProblem::NotObject)
    );
    assert_eq!(
        parse("/v1/chat/completions", r#"{"model":1}"#).problem,
        Some(BodyProblem::WrongType { field: "model" })
    );
    assert_eq!(
        parse("/v1/chat/completions", r#"{"stream":"yes"}"#).problem,
        Some(BodyProblem::WrongType { field: "stream" })
    );
    assert_eq!(
        parse(
            "/v1/chat/completions",
            r#"{"stream_options":{"include_usage":1}}"#
        )
        .problem,
        Some(BodyProblem::WrongType {
            field: "stream_options.include_usage"
        })
    );
    let missing = parse("/v1/chat/completions", r#"{"messages":[]}"#);
    assert_eq!((missing.model, missing.problem), (None, None));
    assert_eq!(parse("/v1/chat/completions", r#"{"model":""}"#).model, None);
    for cap in [
        "-1", "0", "1.5", "\"100\"", "true", "1e30", "10000001", "[]",
    ] {
        let info = parse(
            "/v1/messages",
            &format!(r#"{{"model":"m","max_tokens":{cap}}}"#),
        );
        assert_eq!(
            info.cap,
            Cap::Invalid {
                field: CapField::MaxTokens
            },
            "{cap}"
        );
    }
    assert_eq!(
        parse("/v1/messages", r#"{"max_tokens":null}"#).cap,
        Cap::Absent
    );
}

#[test]
fn large_bodies_are_estimated_from_their_length() {
    let info = RequestInfo::from_length("/v1/messages", 4_000_000, &config(vec![]));
    assert_eq!(info.prompt_tokens, 1_000_000);
    assert_eq!((info.cap, info.problem), (Cap::Absent, None));
}

fn limiter(max_completion: Option<u32>, over_cap: OverCap) -> Limiter {
    let mut q = quota(vec![rate(1_000_000, 60)]);
    q.max_completion_tokens = max_completion.and_then(NonZeroU32::new);
    q.over_cap = over_cap;
    Limiter::new(&config(vec![q]))
}

fn plan(l: &Limiter, path: &str, body: &str) -> Plan {
    l.plan(QuotaId(0), &parse(path, body))
}

#[test]
fn plans_reserve_prompt_plus_cap() {
    let l = limiter(None, OverCap::Reject);
    let body =
        r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"12345678"}]}"#;
    assert_eq!(
        plan(&l, "/v1/chat/completions", body),
        Plan::Forward {
            reservation: Reservation {
                prompt_tokens: 2,
                completion_tokens: 100
            },
            rewrite: Rewrite::default()
        }
    );
    // No cap: default_max_tokens; streaming: include_usage is added.
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    assert_eq!(
        plan(&l, "/v1/chat/completions", body),
        Plan::Forward {
            reservation: Reservation {
                prompt_tokens: 0,
                completion_tokens: 1024
            },
            rewrite: Rewrite {
                include_usage: true,
                clamp: None
            }
        }
    );
    // Anthropic streams report usage by themselves.
    let Plan::Forward { rewrite, .. } =
        plan(&l, "/v1/messages", r#"{"stream":true,"max_tokens":5}"#)
    else {
        panic!()
    };
    assert!(rewrite.is_empty());
    // Other paths reserve the prompt only.
    let Plan::Forward { reservation, .. } = plan(&l, "/v1/embeddings", r#"{"input":"abcdefgh"}"#)
    else {
        panic!()
    };
    assert_eq!(reservation.total(), 2);
}

#[test]
fn over_cap_rejects_or_clamps() {
    let body = r#"{"model":"m","max_completion_tokens":9000}"#;
    let Plan::Reject { kind, message } = plan(
        &limiter(Some(4096), OverCap::Reject),
        "/v1/chat/completions",
        body,
    ) else {
        panic!()
    };
    assert_eq!(
        kind,
        ErrorKind::InvalidRequest {
            param: Some("max_completion_tokens")
        }
    );
    assert!(message.contains("4096"), "{message}");
    let clamp = limiter(Some(4096), OverCap::Clamp);
    assert_eq!(
        plan(&clamp, "/v1/chat/completions", body),
        Plan::Forward {
            reservation: Reservation {
                prompt_tokens: 0,
                completion_tokens: 4096
            },
            rewrite: Rewrite {
                include_usage: false,
                clamp: Some((CapField::MaxCompletionTokens, 4096))
            }
        }
    );
    // Under clamp, a request without a cap gets the reserved one written in.
    let Plan::Forward {
        rewrite,
        reservation,
    } = plan(&clamp, "/v1/messages", r#"{"model":"m"}"#)
    else {
        panic!()
    };
    assert_eq!(reservation.completion_tokens, 1024);
    assert_eq!(rewrite.clamp, Some((CapField::MaxTokens, 1024)));
    // ...but not under reject.
    let Plan::Forward { rewrite, .. } = plan(
        &limiter(Some(4096), OverCap::Reject),
        "/v1/messages",
        r#"{"model":"m"}"#,
    ) else {
        panic!()
    };
    assert_eq!(rewrite.clamp, None);
}

#[test]
fn invalid_requests_get_400_in_the_clients_shape() {
    let l = limiter(None, OverCap::Reject);
    let Plan::Reject { kind, message } = plan(&l, "/v1/messages", r#"{"max_tokens":-3}"#) else {
        panic!()
    };
    assert_eq!(kind.status(), 400);
    let body: Value = serde_json::from_str(&error_body(
        ApiShape::Messages.vendor(Api::Openai),
        kind,
        &message,
    ))
    .unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let Plan::Reject { kind, .. } = plan(&l, "/v1/chat/completions", "not json") else {
        panic!()
    };
    assert_eq!(kind, ErrorKind::InvalidRequest { param: None });
}

#[test]
fn rewritten_bodies_parse_back_with_the_edits() {
    let l = limiter(Some(10), OverCap::Clamp);
    let body = r#"{"model":"gpt-4o","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    let Plan::Forward { rewrite, .. } = plan(&l, "/v1/chat/completions", body) else {
        panic!()
    };
    let out = rewrite_body(body.as_bytes(), &rewrite).unwrap();
    let info = RequestInfo::parse("/v1/chat/completions", &out, &config(vec![]));
    assert!(info.include_usage);
    assert_eq!(
        info.cap,
        Cap::Given {
            field: CapField::MaxTokens,
            tokens: 10
        }
    );
    assert_eq!(info.prompt_chars, 2);
}

proptest! {
    /// Arbitrary bytes on any path never panic, and a body that does not
    /// parse always carries a problem.
    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), path in "/v1/(chat/completions|completions|responses|messages|x)") {
        let info = RequestInfo::parse(&path, &body, &config(vec![]));
        if serde_json::from_slice::<Value>(&body).is_err() {
            prop_assert_eq!(info.problem, Some(BodyProblem::NotJson));
        }
        let l = limiter(Some(100), OverCap::Clamp);
        let _ = l.plan(QuotaId(0), &info);
        let _ = rewrite_body(&body, &Rewrite { include_usage: true, clamp: Some((CapField::MaxTokens, 1)) });
    }

    /// The include_usage splice keeps every other member of any object.
    #[test]
    fn include_usage_splice_keeps_the_document(
        members in prop::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..6),
    ) {
        let doc = serde_json::to_string(&members).unwrap();
        let out = rewrite_body(doc.as_bytes(), &Rewrite { include_usage: true, clamp: None }).unwrap();
        let mut back: serde_json::Map<String, Value> = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(back.remove("stream_options"), Some(serde_json::json!({"include_usage": true})));
        prop_assert_eq!(back.len(), members.len());
    }
}

fn completion_tokens(p: Plan) -> u64 {
    match p {
        Plan::Forward { reservation, .. } => reservation.completion_tokens,
        Plan::Reject { kind, message } => panic!("rejected: {kind:?} {message}"),
    }
}

#[test]
fn every_completion_a_request_asks_for_is_reserved() {
    let l = limiter(None, OverCap::Reject);
    // n choices, each up to the cap.
    let chat =
        r#"{"model":"m","n":50,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        completion_tokens(plan(&l, "/v1/chat/completions", chat)),
        25_000
    );
    // A batch of prompts, each with n choices; best_of is generated too.
    let batch = format!(
        r#"{{"model":"m","max_tokens":10,"n":2,"prompt":[{}]}}"#,
        vec!["\"p\""; 50].join(",")
    );
    assert_eq!(
        completion_tokens(plan(&l, "/v1/completions", &batch)),
        1_000
    );
    let best_of = r#"{"model":"m","max_tokens":10,"n":1,"best_of":5,"prompt":"p"}"#;
    assert_eq!(completion_tokens(plan(&l, "/v1/completions", best_of)), 50);
    // Token ids are one prompt, not a batch.
    let ids = r#"{"model":"m","max_tokens":10,"prompt":[1,2,3,4]}"#;
    assert_eq!(completion_tokens(plan(&l, "/v1/completions", ids)), 10);
    let id_batch = r#"{"model":"m","max_tokens":10,"prompt":[[1,2],[3,4],[5]]}"#;
    assert_eq!(completion_tokens(plan(&l, "/v1/completions", id_batch)), 30);
    // Shapes without choices reserve one.
    let messages = r#"{"model":"m","n":9,"max_tokens":10,"messages":[]}"#;
    assert_eq!(completion_tokens(plan(&l, "/v1/messages", messages)), 10);
}

#[test]
fn absurd_completion_counts_are_refused() {
    let l = limiter(None, OverCap::Reject);
    for (path, body, field) in [
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":0,"messages":[]}"#,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":-3,"messages":[]}"#,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":2.5,"messages":[]}"#,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":"5","messages":[]}"#,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","n":1e9,"messages":[]}"#,
            "n",
        ),
        (
            "/v1/completions",
            r#"{"model":"m","best_of":1000,"prompt":"p"}"#,
            "best_of",
        ),
    ] {
        let info = parse(path, body);
        assert_eq!(
            info.problem,
            Some(BodyProblem::BadCount { field }),
            "{body}"
        );
        assert!(
            matches!(l.plan(QuotaId(0), &info), Plan::Reject { .. }),
            "{body}"
        );
    }
    // 129 prompts × 1 choice is over the bound too.
    let batch = format!(
        r#"{{"model":"m","prompt":[{}]}}"#,
        vec!["\"p\""; 129].join(",")
    );
    assert_eq!(
        parse("/v1/completions", &batch).problem,
        Some(BodyProblem::BadCount { field: "prompt" })
    );
}
