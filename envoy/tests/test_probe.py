"""The conformance probe in front of sluice's chain, in the real Envoy.

The probe (filters/probe) answers every request with a JSON document of what
the host showed it, keeping the upstream body inside. These tests check that
the probe loads and runs in Envoy's V8 in the rendered chain, that the
upstream answer it saw is intact (stream and not, both APIs), and save
Envoy's documents to ``target/probe-observations/envoy/<case>.json`` so they
can be diffed with the wasmtime test host's (host-tests).
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from lab import paths

OUT_DIR = paths.TARGET_DIR / "probe-observations" / "envoy"

CASES = {
    "openai-chat": ("/v1/chat/completions", False),
    "openai-chat-stream": ("/v1/chat/completions", True),
    "anthropic-messages": ("/v1/messages", False),
    "anthropic-messages-stream": ("/v1/messages", True),
}
MAX_TOKENS = 6


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("case", list(CASES))
def test_probe_sees_the_upstream_answer_intact(probe_lab, case):
    path, stream = CASES[case]
    body = {"model": "sim-large", "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": "probe the host"}]}
    if stream and path == "/v1/chat/completions":
        body["stream_options"] = {"include_usage": True}
    headers = {"x-tenant-id": "acme", "x-probe-id": f"{case}-{uuid.uuid4().hex[:8]}"}
    with httpx.Client(base_url=probe_lab.base_url, timeout=30, trust_env=False) as client:
        response = client.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text[:500]
    document = response.json()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{case}.json").write_text(json.dumps(document, indent=1, sort_keys=True))

    assert document.get("probe") == "sluice-probe"
    observations = document["observations"]
    callbacks = observations["callbacks"]
    assert callbacks[0].startswith("on_http_request_headers")
    assert any(c.startswith("on_http_response_body") and "eos=true" in c for c in callbacks)
    upstream = observations["response.upstream_body"]
    if not stream:
        answer = json.loads(upstream)
        if path == "/v1/messages":
            text, produced = answer["content"][0]["text"], answer["usage"]["output_tokens"]
        else:
            text = answer["choices"][0]["message"]["content"]
            produced = answer["usage"]["completion_tokens"]
        assert len(text.split()) == produced == MAX_TOKENS
    elif path == "/v1/messages":
        events = [json.loads(d) for d in sse_data(upstream)]
        assert events[-1]["type"] == "message_stop"
        deltas = [e for e in events if e["type"] == "content_block_delta"]
        assert len(deltas) == MAX_TOKENS
    else:
        data = sse_data(upstream)
        assert data[-1] == "[DONE]"
        usage = json.loads(data[-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
    probe_lab.envoy.wait_for_log("probe-observations: ")
