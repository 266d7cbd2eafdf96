#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/.

Seeds are realistic inputs in each target's layout (see src/checks.rs):
the example policies (and JSON versions of them), the OpenAI and Anthropic
response fixtures of filters/core/tests, request bodies of the four APIs,
authorization headers and paths. `cargo fuzz run` starts from them and
`-merge=1` folds what it keeps into fuzz/corpus/<target>/.

    python3 fuzz/seed.py
"""

import json
import pathlib
import struct
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def policies():
    for p in sorted((ROOT / "policies").rglob("*.toml")):
        rel = p.relative_to(ROOT / "policies")
        text = p.read_bytes()
        write("policy_toml", str(rel).replace("/", "-"), text)
        try:
            doc = tomllib.loads(text.decode())
        except tomllib.TOMLDecodeError:
            continue
        # What Istio hands the filter: pluginConfig as compact JSON.
        name = str(rel).replace("/", "-").removesuffix(".toml") + ".json"
        write("policy_json", name, json.dumps(doc, separators=(",", ":")))
    for p in sorted((ROOT / "policies").rglob("*.json")):
        write("policy_json", p.name, p.read_bytes())


def sse_usage():
    fixtures = ROOT / "filters" / "core" / "tests" / "fixtures"
    for p in sorted(fixtures.iterdir()):
        body = p.read_bytes()
        sse = p.suffix == ".sse"
        flags = 1 if sse else 0
        # Whole, then cut in three places, then with the small limits.
        write("sse_usage", p.stem + ".whole", bytes([flags, 0]) + body)
        cuts = [len(body) // 3, len(body) // 2, len(body) - 1]
        write(
            "sse_usage",
            p.stem + ".cut",
            bytes([flags, len(cuts)]) + b"".join(struct.pack("<H", c) for c in cuts) + body,
        )
        write("sse_usage", p.stem + ".small", bytes([flags | 2, 0]) + body)
        if sse:
            # An SSE body whose content-type said JSON.
            write("sse_usage", p.stem + ".as-json", bytes([0, 0]) + body)
    write("sse_usage", "crlf", bytes([1, 1, 7, 0]) + b"data: {\"usage\":{\"input_tokens\":3}}\r\n\r\ndata: [DONE]\r\n")


PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"]
# (path index, clamp index, body); clamp: 0 none, 1 max_completion_tokens,
# 2 max_tokens, 3 max_output_tokens.
REQUESTS = [
    ("chat", 0, 1, {
        "model": "gpt-4o", "stream": True, "max_completion_tokens": 300, "max_tokens": 5,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                {"type": "text", "text": " this image?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
        ]}),
    ("chat-usage", 0, 0, {
        "model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": False, "x": 1},
        "messages": [{"role": "user", "content": "hi"}]}),
    ("completions", 1, 2, {
        "model": "i", "prompt": [[1, 2, 3], [4]], "max_tokens": 7.0, "stream": True,
        "stream_options": {"include_usage": True}, "suffix": "end"}),
    ("responses", 2, 3, {
        "model": "gpt-4.1", "instructions": "Talk like a pirate.", "max_output_tokens": 50,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Are semicolons optional?"}]}]}),
    ("messages", 3, 2, {
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": "Hello, Claude"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": [{"type": "text", "text": "42"}]}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}]}]}),
]


def request_body():
    for name, path, clamp, body in REQUESTS:
        write("request_body", name, bytes([path | clamp << 2]) + json.dumps(body).encode())
    # Edges: spacing before the brace, an empty object, an escaped key,
    # a bad cap, a non-object, not JSON.
    write("request_body", "spaced", b"\x00  { \"model\" : \"m\" , \"stream\" : true }  ")
    write("request_body", "empty", b"\x05{}")
    write("request_body", "escaped", b"\x00{\"mod\\u0065l\":\"e\",\"stre\\u0061m\":true}")
    write("request_body", "bad-cap", b"\x03{\"model\":\"m\",\"max_tokens\":-3}")
    write("request_body", "array", b"\x00[1,2]")
    write("request_body", "not-json", b"\x00{\"model\":")


def identity():
    for i, text in enumerate([
        "Bearer sk-test",
        "bearer   abc ",
        "Basic dXNlcjpwYXNz",
        "BEARER sk-ant-api03-\u00e9",
        "sk-proj-0123456789abcdef",
        "/v1/chat/completions?x=1",
        "/openai/v1/completions/",
        "/v1/messages#frag",
        "/v1/responses",
        "/v1/embeddings",
    ]):
        write("identity", f"seed-{i:02}", text)


def rate_limit_headers():
    for i, lines in enumerate([
        ["x-ratelimit-limit-requests: 100", "x-ratelimit-remaining-requests: 3",
         "x-ratelimit-reset-requests: 6m0s", "x-ratelimit-limit-tokens: 40000",
         "x-ratelimit-remaining-tokens: 100", "x-ratelimit-reset-tokens: 1.5s"],
        ["anthropic-ratelimit-requests-limit: 50", "anthropic-ratelimit-requests-remaining: 0",
         "anthropic-ratelimit-requests-reset: 2026-11-29T19:03:39Z", "retry-after: 60"],
        ["retry-after: Sun, 29 Nov 2026 19:03:39 GMT", "retry-after-ms: 250"],
        ["x-ratelimit-limit-requests: 0", "x-ratelimit-remaining-requests: 5",
         "x-ratelimit-reset-requests: 1h2m3s4ms"],
        ["anthropic-ratelimit-tokens-limit: 18446744073709551615",
         "anthropic-ratelimit-tokens-remaining: 18446744073709551615",
         "anthropic-ratelimit-tokens-reset: 9999-12-31T23:59:59.999999999+14:00"],
    ]):
        write("rate_limit_headers", f"seed-{i:02}", "\n".join(lines))


if __name__ == "__main__":
    policies()
    sse_usage()
    request_body()
    identity()
    rate_limit_headers()
