"""``n`` and batched prompts: reserved per completion, settled on real usage.

A chat completion with ``n = 5`` and ``max_tokens = 50`` may produce 250
completion tokens, and a legacy completion with three prompts three
completions: sluice must reserve for all of them before the upstream is
called (a reservation of one would let a client multiply its quota), then
settle against what llm-sim (which honours ``n`` and batches) reports.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lab.policies import one_backend

TENANT = "choices"
MODEL = "sim-large"
PREFIX = f"sluice_tokens.tenant.{TENANT}.model.{MODEL}."

POLICY = one_backend("lab-choices", f"""
[tokens]
default_max_tokens = 64

  [[tokens.quota]]
  match = {{ tenants = ["{TENANT}"], models = ["{MODEL}"] }}
  tokens = "1M/min"

  [[tokens.quota]]
  tokens = "1M/min"
""", model=MODEL)

MESSAGES = [{"role": "user", "content": "Give me five short answers, please."}]


@pytest.fixture
def choices_lab(lab_factory, tmp_path: Path):
    policy = tmp_path / "choices.toml"
    policy.write_text(POLICY)
    # Answers longer than max_tokens: every choice is cut at max_tokens.
    args = ["--output-tokens", "200", "--tokens-per-sec", "0", "--ttft-ms", "5"]
    return lab_factory(policy=policy, sim_args={("primary", "zone-a"): args})


def stat(lab, name: str) -> int:
    return lab.envoy.stats(PREFIX).get(f"wasmcustom.{PREFIX}{name}", 0)


def settled(lab) -> int:
    """Tokens finally charged: reserved, less refunds, plus excess charges."""
    return stat(lab, "tokens_reserved") - stat(lab, "tokens_refunded") + stat(lab, "tokens_charged")


def upstream_used(lab) -> int:
    s = lab.sim("primary", "zone-a").stats()
    return s["prompt_tokens"] + s["tokens_produced"]


def post(lab, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{lab.base_url}{path}", json=body, timeout=20.0, trust_env=False,
                      headers={"x-tenant-id": TENANT})


def test_n_choices_reserve_each_completion_and_settle_on_usage(choices_lab):
    one = post(choices_lab, "/v1/chat/completions",
               {"model": MODEL, "max_tokens": 50, "messages": MESSAGES})
    assert one.status_code == 200, one.text
    reserved_one = stat(choices_lab, "tokens_reserved")
    prompt_estimate = reserved_one - 50
    assert prompt_estimate > 0

    five = post(choices_lab, "/v1/chat/completions",
                {"model": MODEL, "max_tokens": 50, "n": 5, "messages": MESSAGES})
    assert five.status_code == 200, five.text
    body = five.json()
    assert len(body["choices"]) == 5
    assert body["usage"]["completion_tokens"] == 250
    # The same prompt, five completions of at most 50: 250 reserved for them.
    assert stat(choices_lab, "tokens_reserved") - reserved_one == prompt_estimate + 250
    assert settled(choices_lab) == upstream_used(choices_lab)

    # Streamed (sluice adds include_usage): settled on the usage chunk.
    with httpx.stream("POST", f"{choices_lab.base_url}/v1/chat/completions", timeout=20.0,
                      trust_env=False, headers={"x-tenant-id": TENANT},
                      json={"model": MODEL, "max_tokens": 50, "n": 5, "stream": True,
                            "messages": MESSAGES}) as streamed:
        assert streamed.status_code == 200
        text = "".join(streamed.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    assert stat(choices_lab, "tokens_reserved") - reserved_one == 2 * (prompt_estimate + 250)
    assert settled(choices_lab) == upstream_used(choices_lab)
    assert choices_lab.envoy.stats("sluice_tokens.estimated_usage") \
        .get("wasmcustom.sluice_tokens.estimated_usage", 0) == 0


def test_batched_prompts_reserve_one_completion_each(choices_lab):
    prompts = ["First question here.", "Second question here.", "Third question here."]
    r = post(choices_lab, "/v1/completions", {"model": MODEL, "max_tokens": 20, "prompt": prompts})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    assert r.json()["usage"]["completion_tokens"] == 60
    assert stat(choices_lab, "tokens_reserved") >= 60
    assert settled(choices_lab) == upstream_used(choices_lab)
