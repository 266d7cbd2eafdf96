//! Reading real usage out of real-format responses, whatever the chunking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use sluice_core::llm::{Framing, UsageFallback, UsageParser, UsageReport, UsageSource};

const FALLBACK: UsageFallback = UsageFallback {
    prompt_tokens: 50,
    chars_per_token: 4.0,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn framing_of(name: &str) -> Framing {
    if name.ends_with(".sse") {
        Framing::Sse
    } else {
        Framing::Json
    }
}

/// The report for `body` fed in pieces ending at `cuts` (sorted offsets).
fn read_split(framing: Framing, body: &[u8], cuts: &[usize]) -> UsageReport {
    let mut p = UsageParser::new(framing);
    let mut start = 0;
    for &cut in cuts {
        let cut = cut.min(body.len()).max(start);
        p.feed(&body[start..cut]);
        start = cut;
    }
    p.feed(&body[start..]);
    p.finish(&FALLBACK)
}

fn read(name: &str) -> UsageReport {
    read_split(framing_of(name), &fixture(name), &[])
}

const FIXTURES: [&str; 9] = [
    "openai_chat_stream_usage.sse",
    "openai_chat_stream_no_usage.sse",
    "openai_completions_stream_usage.sse",
    "openai_responses_stream.sse",
    "anthropic_stream.sse",
    "anthropic_stream_cut.sse",
    "openai_chat.json",
    "anthropic_message.json",
    "openai_responses.json",
];

#[test]
fn openai_chat_stream_with_include_usage() {
    let r = read("openai_chat_stream_usage.sse");
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(
        (
            r.usage.input_tokens,
            r.usage.output_tokens,
            r.usage.total_tokens
        ),
        (19, 6, 25)
    );
    assert!(r.done);
    assert_eq!(r.streamed_chars, 16, "\"Hello\" + \", world! é\\n\"");
    assert_eq!((r.framing_errors, r.clamped), (0, false));
}

#[test]
fn openai_chat_stream_without_usage_is_estimated_from_its_text() {
    let r = read("openai_chat_stream_no_usage.sse");
    assert_eq!(r.source, UsageSource::Estimated);
    assert_eq!(r.streamed_chars, 26);
    assert_eq!(r.usage.input_tokens, 50, "the request's prompt estimate");
    assert_eq!(r.usage.output_tokens, 7, "26 chars / 4, rounded up");
    assert_eq!(r.usage.total_tokens, 57);
    assert!(r.done);
}

#[test]
fn openai_completions_stream() {
    let r = read("openai_completions_stream_usage.sse");
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(r.usage.total_tokens, 9);
    assert_eq!(r.streamed_chars, 16);
}

#[test]
fn openai_responses_stream_reads_response_completed() {
    let r = read("openai_responses_stream.sse");
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(
        (
            r.usage.input_tokens,
            r.usage.output_tokens,
            r.usage.total_tokens
        ),
        (36, 3, 39)
    );
    assert_eq!(r.streamed_chars, 8, "deltas only, not the .done echo");
    assert!(!r.done);
}

#[test]
fn anthropic_stream_with_ping_cache_and_cumulative_delta() {
    let r = read("anthropic_stream.sse");
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(r.usage.input_tokens, 25);
    assert_eq!(r.usage.cache_creation_input_tokens, 100);
    assert_eq!(r.usage.cache_read_input_tokens, 2000);
    assert_eq!(
        r.usage.output_tokens, 15,
        "message_delta's cumulative count"
    );
    assert_eq!(r.usage.total_tokens, 25 + 100 + 2000 + 15);
    assert_eq!(r.streamed_chars, 22);
    assert_eq!(r.framing_errors, 0, "ping and message_stop are not errors");
}

#[test]
fn anthropic_stream_cut_mid_event_keeps_the_input_and_estimates_the_output() {
    let r = read("anthropic_stream_cut.sse");
    assert_eq!(r.source, UsageSource::Partial);
    assert_eq!(r.usage.input_tokens, 40);
    assert_eq!(
        r.usage.output_tokens, 10,
        "40 streamed chars beat the reported 1"
    );
    assert_eq!(r.framing_errors, 1, "the torn last event");
}

#[test]
fn json_responses() {
    let r = read("openai_chat.json");
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(r.usage.total_tokens, 18);
    assert_eq!(r.streamed_chars, 15);
    let r = read("anthropic_message.json");
    assert_eq!(r.usage.input_tokens, 2095);
    assert_eq!(r.usage.cache_read_input_tokens, 1800);
    assert_eq!(r.usage.output_tokens, 503);
    assert_eq!(r.usage.total_tokens, 2095 + 1800 + 503);
    let r = read("openai_responses.json");
    assert_eq!(
        (
            r.usage.input_tokens,
            r.usage.output_tokens,
            r.usage.total_tokens
        ),
        (36, 87, 123)
    );
}

#[test]
fn an_sse_body_labelled_json_is_still_read() {
    let body = fixture("openai_chat_stream_usage.sse");
    let r = read_split(Framing::Json, &body, &[]);
    assert_eq!(r.source, UsageSource::Reported);
    assert_eq!(r.usage.total_tokens, 25);
}

#[test]
fn crlf_and_cr_line_ends_read_the_same() {
    for name in FIXTURES.iter().filter(|n| n.ends_with(".sse")) {
        let lf = fixture(name);
        let crlf: Vec<u8> = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        let cr: Vec<u8> = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r")
            .into_bytes();
        let expected = read_split(Framing::Sse, &lf, &[]);
        assert_eq!(
            read_split(Framing::Sse, &crlf, &[]),
            expected,
            "{name} CRLF"
        );
        assert_eq!(read_split(Framing::Sse, &cr, &[]), expected, "{name} CR");
        // A boundary between \r and \n must not make an empty line.
        let mid = crlf.iter().position(|&b| b == b'\r').unwrap() + 1;
        assert_eq!(
            read_split(Framing::Sse, &crlf, &[mid]),
            expected,
            "{name} split CR|LF"
        );
    }
}

#[test]
fn byte_by_byte_reads_the_same() {
    for name in FIXTURES {
        let body = fixture(name);
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(
            read_split(framing_of(name), &body, &cuts),
            read(name),
            "{name}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any chunking of any fixture gives the same report.
    #[test]
    fn any_split_gives_the_same_usage(
        which in 0..FIXTURES.len(),
        mut cuts in prop::collection::vec(0usize..4096, 0..24),
    ) {
        let name = FIXTURES[which];
        let body = fixture(name);
        cuts.sort_unstable();
        prop_assert_eq!(read_split(framing_of(name), &body, &cuts), read(name));
    }

    /// Arbitrary bytes, or a fixture cut short and corrupted, never panic and
    /// never report more than the clamp allows.
    #[test]
    fn broken_framing_never_panics(
        which in 0..FIXTURES.len(),
        keep in 0usize..4096,
        noise in prop::collection::vec(any::<u8>(), 0..256),
        at in 0usize..4096,
        sse in any::<bool>(),
    ) {
        let mut body = fixture(FIXTURES[which]);
        body.truncate(keep);
        let at = at.min(body.len());
        body.splice(at..at, noise.iter().copied());
        let framing = if sse { Framing::Sse } else { Framing::Json };
        let r = read_split(framing, &body, &[at / 2, at]);
        prop_assert!(r.usage.total_tokens <= 4 * sluice_core::llm::MAX_SANE_TOKENS + body.len() as u64 + 50);
    }
}
