"""Every llm-sim endpoint through a real Envoy, driven by the real SDKs.

The lab is policies/lab.toml rendered by ``sluice render envoy`` (with the
filters it enforces today). Content and usage must arrive intact: llm-sim generates
one word per token, so the words a client reads must equal the usage it is
told, and the simulators' own counters must match what the clients saw.
"""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "Tell me about proxy filters in one short sentence."
MAX_TOKENS = 9
TIMEOUT = httpx.Timeout(30.0)


def primary_zones(lab) -> set[str]:
    return {zone for (backend, zone) in lab.sims if backend == "primary"}


def sim_totals(lab) -> tuple[int, int]:
    """(requests, tokens produced) summed over every simulator."""
    requests = tokens = 0
    for sim in lab.sims.values():
        stats = sim.stats()
        requests += stats["requests"]
        tokens += stats["tokens_produced"]
    return requests, tokens


def direct_prompt_tokens(lab, path: str, body: dict) -> int:
    """The prompt tokens a simulator counts for ``body``, asked directly."""
    sim = next(iter(lab.sims.values()))
    body = dict(body, stream=False, max_tokens=1, model=sim.models[0])
    response = httpx.post(f"{sim.base_url}{path}", json=body, timeout=TIMEOUT, trust_env=False)
    response.raise_for_status()
    usage = response.json()["usage"]
    return usage.get("prompt_tokens", usage.get("input_tokens"))


def test_health_and_models(lab):
    with httpx.Client(base_url=lab.base_url, timeout=TIMEOUT, trust_env=False) as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        assert health.json() == {"status": "ok"}
        models = client.get("/v1/models", headers={"x-tenant-id": "acme"})
        assert models.status_code == 200, models.text
        ids = {m["id"] for m in models.json()["data"]}
        served = {m for sim in lab.sims.values() for m in sim.models}
        assert ids and ids <= served
        assert models.headers["x-llm-sim-zone"] in {z for (_, z) in lab.sims}


def test_openai_chat_non_stream(lab, openai_client):
    messages = [{"role": "user", "content": PROMPT}]
    before = sim_totals(lab)
    raw = openai_client.chat.completions.with_raw_response.create(
        model="sim-large", messages=messages, max_tokens=MAX_TOKENS)
    assert raw.headers["x-llm-sim-zone"] in primary_zones(lab)
    completion = raw.parse()
    text = completion.choices[0].message.content
    usage = completion.usage
    assert completion.model == "sim-large"
    assert len(text.split()) == usage.completion_tokens == MAX_TOKENS
    assert completion.choices[0].finish_reason == "length"
    assert usage.prompt_tokens == direct_prompt_tokens(lab, "/v1/chat/completions",
                                                       {"messages": messages})
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    after = sim_totals(lab)
    # One request through Envoy plus the direct one for the prompt count.
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == MAX_TOKENS + 1


def test_openai_chat_stream(lab, openai_client):
    messages = [{"role": "user", "content": PROMPT}]
    before = sim_totals(lab)
    raw = openai_client.chat.completions.with_raw_response.create(
        model="sim-large", messages=messages, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-llm-sim-zone"] in primary_zones(lab)
    pieces, usage, finish = [], None, None
    with raw.parse() as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert usage is not None, "the include_usage chunk did not arrive"
    assert len(pieces) == len(text.split()) == usage.completion_tokens == MAX_TOKENS
    assert finish == "length"
    assert usage.prompt_tokens > 0
    assert sim_totals(lab)[1] - before[1] == MAX_TOKENS


def test_openai_legacy_completions(lab, openai_client):
    done = openai_client.completions.create(model="sim-large", prompt=PROMPT,
                                            max_tokens=MAX_TOKENS)
    assert len(done.choices[0].text.split()) == done.usage.completion_tokens == MAX_TOKENS
    pieces, usage = [], None
    stream = openai_client.completions.create(model="sim-large", prompt=PROMPT,
                                              max_tokens=MAX_TOKENS, stream=True,
                                              stream_options={"include_usage": True})
    with stream:
        for chunk in stream:
            pieces.extend(c.text for c in chunk.choices if c.text)
            usage = chunk.usage or usage
    assert len("".join(pieces).split()) == MAX_TOKENS
    assert usage is not None and usage.completion_tokens == MAX_TOKENS


def test_anthropic_messages(lab, anthropic_client):
    messages = [{"role": "user", "content": PROMPT}]
    raw = anthropic_client.messages.with_raw_response.create(
        model="sim-large", max_tokens=MAX_TOKENS, messages=messages)
    assert raw.headers["x-llm-sim-zone"] in primary_zones(lab)
    message = raw.parse()
    text = "".join(block.text for block in message.content if block.type == "text")
    assert len(text.split()) == message.usage.output_tokens == MAX_TOKENS
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens == direct_prompt_tokens(lab, "/v1/messages",
                                                              {"messages": messages})


def test_anthropic_messages_stream(lab, anthropic_client):
    before = sim_totals(lab)
    with anthropic_client.messages.stream(
            model="sim-large", max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = "".join(pieces)
    assert len(pieces) == len(text.split()) == MAX_TOKENS
    assert final.usage.output_tokens == MAX_TOKENS
    assert final.usage.input_tokens > 0
    assert final.stop_reason == "max_tokens"
    assert "".join(b.text for b in final.content if b.type == "text") == text
    assert sim_totals(lab)[1] - before[1] == MAX_TOKENS


@pytest.mark.parametrize("path,body,last_event", [
    ("/v1/chat/completions",
     {"model": "sim-large", "stream": True, "max_tokens": 4,
      "messages": [{"role": "user", "content": "hi"}]}, "data: [DONE]"),
    ("/v1/messages",
     {"model": "sim-large", "stream": True, "max_tokens": 4,
      "messages": [{"role": "user", "content": "hi"}]}, "event: message_stop"),
])
def test_sse_frames_pass_unchanged(lab, path, body, last_event):
    """The raw SSE through Envoy: every frame whole, in order, ending cleanly."""
    with httpx.Client(base_url=lab.base_url, timeout=TIMEOUT, trust_env=False) as client:
        with client.stream("POST", path, json=body, headers={"x-tenant-id": "acme"}) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())
    frames = [f for f in text.split("\n\n") if f.strip()]
    assert frames[-1].strip().splitlines()[0] == last_event
    for frame in frames:
        for line in frame.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[len("data: "):])  # each data line is whole JSON


def test_simulator_faults_reach_the_client_and_clear(lab, openai_client):
    """The lab's control of the upstreams works end to end (what later
    chapters and scenarios build on): every primary zone answers 503, the
    client sees it through Envoy; cleared, traffic flows again."""
    import openai

    for zone in primary_zones(lab):
        lab.sim("primary", zone).set_faults(fixed_status=503)
    with pytest.raises(openai.APIStatusError) as failure:
        openai_client.chat.completions.create(
            model="sim-large", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert failure.value.status_code == 503
    for zone in primary_zones(lab):
        lab.sim("primary", zone).set_faults()
    done = openai_client.chat.completions.create(
        model="sim-large", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert done.usage.completion_tokens == 2
    upstream_5xx = lab.envoy.stats("cluster.primary.upstream_rq_5xx")
    assert upstream_5xx.get("cluster.primary.upstream_rq_5xx", 0) >= 1
