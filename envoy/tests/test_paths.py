"""Encoded and odd paths: metered or refused, never forwarded unmetered.

sluice.wasm tells an inference request from its path; an upstream may serve
other spellings of the same path. The rendered connection manager
normalizes paths before any filter runs (``normalize_path``,
``merge_slashes``) and refuses encoded slashes
(``path_with_escaped_slashes_action: REJECT_REQUEST``), so the filter, the
route table and the upstream all see ``/v1/chat/completions``. Sent as raw
HTTP/1.1: httpx and the SDKs would clean these paths up themselves.

Upper case (``/V1/CHAT/COMPLETIONS``) is left alone by Envoy (paths are case
sensitive, RFC 3986 §6.2.2.1); llm-sim, like OpenAI's API and vLLM, answers
404 to it. sluice meters it all the same (it matches API paths ignoring
case), so an upstream that ignores case cannot serve a generation
unmetered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.policies import one_backend
from lab.rawhttp import http1, request_bytes

TENANT = "odd-paths"
QUOTA = 6

POLICY = one_backend("lab-paths", f"""
[tokens]
default_max_tokens = 64

  [[tokens.quota]]
  match = {{ tenants = ["{TENANT}"] }}
  requests = "{QUOTA}/min"

  [[tokens.quota]]
  tokens = "1M/min"
""")

BODY = json.dumps({"model": "sim-large", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()

# Each is /v1/chat/completions to an upstream that normalizes, decodes or
# merges before routing.
ODD_PATHS = [
    "/v1/chat/%63ompletions",
    "//v1/chat/completions",
    "/v1/x/../chat/completions",
    "/v1/./chat//completions",
    "/%76%31/chat/completions",
]


@pytest.fixture
def paths_lab(lab_factory, tmp_path: Path):
    policy = tmp_path / "paths.toml"
    policy.write_text(POLICY)
    return lab_factory(policy=policy)


def post(lab, path: str, tenant: str = TENANT):
    request = request_bytes("POST", path, [
        ("host", "llm.lab"), ("content-type", "application/json"), ("x-tenant-id", tenant)], BODY)
    return http1(lab.envoy.address, request)


def admitted(lab, tenant: str = TENANT) -> int:
    stats = lab.envoy.stats(f"sluice_tokens.tenant.{tenant}.")
    return sum(v for k, v in stats.items() if k.endswith(".admitted"))


def generations(lab) -> int:
    """Completions llm-sim produced tokens for (status 200 answers)."""
    return lab.sim("primary", "zone-a").stats()["by_status"].get("200", 0)


def test_odd_spellings_of_the_chat_path_are_metered(paths_lab):
    for path in ODD_PATHS:
        before = (admitted(paths_lab), generations(paths_lab))
        response = post(paths_lab, path)
        after = (admitted(paths_lab), generations(paths_lab))
        assert response.status == 200, (path, response.status, response.body)
        assert after == (before[0] + 1, before[1] + 1), \
            f"{path}: served by the upstream without being metered"
    # One more, canonical, uses up the quota; the next is refused whatever
    # its spelling, without reaching the upstream.
    assert post(paths_lab, "/v1/chat/completions").status == 200
    assert admitted(paths_lab) == QUOTA
    served = generations(paths_lab)
    for path in ODD_PATHS[:3]:
        refused = post(paths_lab, path)
        assert refused.status == 429, (path, refused.status, refused.body)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert generations(paths_lab) == served


def test_encoded_slashes_are_refused_before_the_upstream(paths_lab):
    sim = paths_lab.sim("primary", "zone-a")
    for path in ("/v1/chat%2Fcompletions", "/v1%2fchat%2fcompletions", "/v1/chat%5Ccompletions"):
        response = post(paths_lab, path)
        assert response.status == 400, (path, response.status, response.body)
    assert sim.stats()["requests"] == 0
    assert admitted(paths_lab) == 0


def test_upper_case_path_is_not_served_unmetered(paths_lab):
    before = admitted(paths_lab)
    response = post(paths_lab, "/V1/CHAT/COMPLETIONS")
    # Envoy forwards it as is (paths are case sensitive); sluice meters it
    # as chat whatever the upstream then does with it.
    metered = admitted(paths_lab) - before
    assert metered == 1, (response.status, response.body, metered)
    # What the upstream said, for the record: OpenAI's shape, unknown URL.
    if response.status == 404:
        assert response.json()["error"]["code"] == "unknown_url"
