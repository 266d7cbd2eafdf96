"""The token filter in a real Envoy, driven by the real ``openai`` SDK.

A policy with a small token quota for tenant ``acme`` and a large one for
everyone else. The filter must turn ``acme`` away with a 429 the SDK
understands (and whose ``retry-after`` it honours) without calling the
upstream, leave ``globex`` alone under concurrent streaming load, send
rate-limit headers that really move, and keep the tokens admitted under the
documented bound while many streams race across Envoy's workers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

ACME_LIMIT = 3000  # tokens per minute for acme
MAX_TOKENS = 100
PROMPT = "Count the sheep in the field, slowly and carefully."  # 52 chars: 13 tokens

POLICY = f"""
name = "lab-tokens"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
models = ["sim-large"]
timeout = "60s"

  [[backend.zone]]
  name = "zone-a"
  region = "lab"
  endpoints = ["127.0.0.1:18001"]

[tokens]
default_max_tokens = {MAX_TOKENS}

  [[tokens.quota]]
  match = {{ tenants = ["acme"] }}
  tokens = "{ACME_LIMIT}/min"
  max_completion_tokens = {MAX_TOKENS}

  [[tokens.quota]]
  tokens = "1M/min"
"""


@pytest.fixture
def tokens_lab(lab_factory, tmp_path: Path):
    policy = tmp_path / "tokens.toml"
    policy.write_text(POLICY)
    # Streams of MAX_TOKENS words at 400 tokens/s: long enough to overlap.
    args = ["--output-tokens", str(MAX_TOKENS), "--tokens-per-sec", "400", "--ttft-ms", "20"]
    return lab_factory(policy=policy, sim_args={("primary", "zone-a"): args})


def client(lab, tenant: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lab.base_url}/v1", api_key="sk-lab", max_retries=retries,
                         timeout=30.0, default_headers={"x-tenant-id": tenant})


def ask(c: openai.OpenAI):
    return c.chat.completions.with_raw_response.create(
        model="sim-large", max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}])


def stream_usage(c: openai.OpenAI) -> int:
    """Streams one completion; the total tokens its usage chunk reports."""
    stream = c.chat.completions.create(
        model="sim-large", max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PROMPT}])
    total = 0
    with stream:
        for chunk in stream:
            if chunk.usage is not None:
                total = chunk.usage.total_tokens
    return total


def filter_stat(lab, name: str) -> int:
    stats = lab.envoy.stats("sluice_tokens")
    return sum(v for k, v in stats.items() if k.endswith(name))


def upstream_requests(lab) -> int:
    return lab.sim("primary", "zone-a").stats()["requests"]


def test_sdk_gets_429_with_headers_and_succeeds_after_retry_after(tokens_lab):
    acme = client(tokens_lab, "acme")
    remaining = []
    rejected = None
    for _ in range(60):  # bounded: the quota holds about 26 of these
        try:
            raw = ask(acme)
        except openai.RateLimitError as e:
            rejected = e
            break
        remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
        assert raw.headers["x-ratelimit-limit-tokens"] == str(ACME_LIMIT)
    assert rejected is not None, "the quota never ran out"
    # Headers arrive at the client and really decrease.
    assert len(remaining) >= 5
    assert remaining == sorted(remaining, reverse=True) and remaining[0] > remaining[-1]
    # The 429 is OpenAI's, with the headers an SDK and a person need.
    headers = rejected.response.headers
    assert rejected.status_code == 429
    assert rejected.body["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-limit-tokens"] == str(ACME_LIMIT)
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= 60
    # It was answered without calling the upstream.
    before = upstream_requests(tokens_lab)
    with pytest.raises(openai.RateLimitError):
        ask(acme)
    assert upstream_requests(tokens_lab) == before
    # The SDK, allowed to retry, waits what retry-after says and succeeds.
    patient = client(tokens_lab, "acme", retries=3)
    started = time.monotonic()
    raw = ask(patient)
    assert raw.http_response.status_code == 200
    assert time.monotonic() - started >= retry_after - 1.5
    assert filter_stat(tokens_lab, "tenant.acme.model.other.rejected") >= 2


def test_tenants_stay_isolated_under_concurrent_streaming(tokens_lab):
    results: dict[str, list] = {"acme": [], "globex": []}
    lock = threading.Lock()
    deadline = time.monotonic() + 20

    def worker(tenant: str, count: int) -> None:
        c = client(tokens_lab, tenant)
        for _ in range(count):
            if time.monotonic() > deadline:
                return
            try:
                outcome = stream_usage(c)
            except openai.RateLimitError:
                outcome = 429
            with lock:
                results[tenant].append(outcome)

    threads = [threading.Thread(target=worker, args=("acme", 12)) for _ in range(4)]
    threads += [threading.Thread(target=worker, args=("globex", 6)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    acme_rejected = results["acme"].count(429)
    assert acme_rejected > 0, "acme's small quota should have run out"
    assert 429 not in results["globex"], "globex was limited by acme's traffic"
    assert len(results["globex"]) == 18
    assert all(total > 0 for total in results["globex"])


def test_concurrent_streams_stay_under_the_overshoot_bound(tokens_lab):
    """Many streams race across Envoy's two workers; what is admitted in the
    window stays within one bucket plus the window's refill plus what the
    upstream used beyond its reservations (which the filter counts)."""
    used: list[int] = []
    lock = threading.Lock()
    started = time.monotonic()

    def worker() -> None:
        c = client(tokens_lab, "acme")
        for _ in range(6):
            try:
                total = stream_usage(c)
            except openai.RateLimitError:
                continue
            with lock:
                used.append(total)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads)
    admitted = sum(used)
    excess = filter_stat(tokens_lab, "tenant.acme.model.other.tokens_charged")
    bound = ACME_LIMIT + ACME_LIMIT * elapsed / 60 + excess
    assert len(used) > 0
    assert admitted <= bound, f"{admitted} tokens admitted in {elapsed:.1f}s, bound {bound:.0f}"
    # And the limit was actually binding: some streams were turned away.
    assert filter_stat(tokens_lab, "tenant.acme.model.other.rejected") > 0


def test_malformed_body_gets_400_not_a_crash(tokens_lab):
    with httpx.Client(base_url=tokens_lab.base_url, timeout=10.0, trust_env=False) as c:
        for body in (b"{not json", b'{"model":"sim-large","max_tokens":-1,"messages":[]}'):
            r = c.post("/v1/chat/completions", content=body,
                       headers={"content-type": "application/json", "x-tenant-id": "acme"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
        # The filter is still serving.
        r = c.post("/v1/chat/completions", headers={"x-tenant-id": "globex"},
                   json={"model": "sim-large", "max_tokens": 5,
                         "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
