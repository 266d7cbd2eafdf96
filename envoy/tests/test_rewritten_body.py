"""Bodies sluice rewrites reach the upstream with a correct content-length.

sluice.wasm rewrites a request body twice over: it adds
``stream_options.include_usage`` to an OpenAI stream that lacks it (or the
upstream never reports the stream's usage), and the breaker's
``fallback-model`` degradation replaces ``model``. Envoy does not recompute
``content-length`` when a filter drops it: the request then goes upstream
chunked, which servers and gateways that require a length refuse (411).
Every llm-sim here runs with ``--require-content-length``.
"""

from __future__ import annotations

import openai
import pytest

STRICT = ["--require-content-length"]
ALL_ZONES = [("primary", "zone-a"), ("primary", "zone-b"), ("fallback", "zone-a")]


@pytest.fixture
def strict_lab(lab_factory):
    return lab_factory(sim_args={key: STRICT for key in ALL_ZONES})


def client(lab, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lab.base_url}/v1", api_key="sk-lab", max_retries=0,
                         timeout=20.0, default_headers={"x-tenant-id": tenant})


def tokens_stat(lab, suffix: str) -> int:
    stats = lab.envoy.stats("sluice_tokens")
    return sum(v for k, v in stats.items() if k.endswith(suffix))


def refused_for_length(lab) -> int:
    return sum(sim.stats()["by_status"].get("411", 0) for sim in lab.sims.values())


def test_stream_without_stream_options_gets_usage_added_and_a_length(strict_lab):
    with client(strict_lab, "globex") as c:
        stream = c.chat.completions.create(
            model="sim-large", max_tokens=12, stream=True,
            messages=[{"role": "user", "content": "Stream me a few words."}])
        with stream:
            words = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert len(words.split()) == 12
    assert refused_for_length(strict_lab) == 0
    # The upstream was asked for the stream's usage (include_usage added),
    # and the reservation was settled against it, not against an estimate.
    primary = [strict_lab.sim("primary", z).stats() for z in ("zone-a", "zone-b")]
    used = sum(s["prompt_tokens"] + s["tokens_produced"] for s in primary)
    settled = (tokens_stat(strict_lab, ".tokens_reserved")
               - tokens_stat(strict_lab, ".tokens_refunded")
               + tokens_stat(strict_lab, ".tokens_charged"))
    assert settled == used, (settled, used)
    assert tokens_stat(strict_lab, "sluice_tokens.estimated_usage") == 0


def test_fallback_model_reroute_carries_a_length(strict_lab):
    for zone in ("zone-a", "zone-b"):
        strict_lab.sim("primary", zone).set_faults(fixed_status=500)
    outcomes = []
    with client(strict_lab, "breaker-lab") as c:
        for _ in range(8):  # bounded: three failures open the circuit
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model="sim-large", max_tokens=6,
                    messages=[{"role": "user", "content": "Anyone there?"}])
            except openai.APIStatusError as err:
                outcomes.append(err.status_code)
                continue
            outcomes.append((raw.parse().model, raw.headers.get("x-sluice-degraded")))
            break
    assert outcomes[-1] == ("sim-small", "fallback-model"), outcomes
    assert set(outcomes[:-1]) == {500}, outcomes
    assert refused_for_length(strict_lab) == 0
    assert strict_lab.sim("fallback", "zone-a").stats()["by_status"].get("200") == 1
