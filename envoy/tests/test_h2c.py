"""Cleartext HTTP/2 requests that end with trailers, through the real Envoy.

The rendered listener's ``codec_type: AUTO`` accepts h2c with prior
knowledge. A request may end with a trailing HEADERS frame instead of a
DATA frame with END_STREAM: the body callbacks then never see an end of
stream, and the request is complete only at the trailers. A filter that
waits for the body's end to judge a request let such requests through
unmetered (5 of 5 admitted over a 3/min quota); these tests hold the
``[tokens]`` capability to its quota and to its 400 for bad bodies on that
path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.policies import one_backend
from lab.rawhttp import H2Request, h2c

TENANT = "h2c-tenant"
REQUESTS_PER_MIN = 3
MAX_TOKENS = 40

POLICY = one_backend("lab-h2c", f"""
[tokens]
default_max_tokens = 64

  [[tokens.quota]]
  match = {{ tenants = ["{TENANT}"] }}
  requests = "{REQUESTS_PER_MIN}/min"

  [[tokens.quota]]
  tokens = "1M/min"
""")

TRAILERS = [("x-checksum", "0"), ("x-request-done", "1")]


@pytest.fixture
def h2c_lab(lab_factory, tmp_path: Path):
    policy = tmp_path / "h2c.toml"
    policy.write_text(POLICY)
    return lab_factory(policy=policy)


def chat(body: bytes, tenant: str = TENANT, trailers=TRAILERS) -> H2Request:
    return H2Request(
        path="/v1/chat/completions",
        headers=[("content-type", "application/json"), ("x-tenant-id", tenant)],
        body=body, trailers=trailers)


def chat_body(content: str = "Hello over h2c.") -> bytes:
    return json.dumps({"model": "sim-large", "max_tokens": MAX_TOKENS,
                       "messages": [{"role": "user", "content": content}]}).encode()


def tenant_stat(lab, name: str) -> int:
    """``wasmcustom.sluice_tokens.tenant.<TENANT>.model.*.<name>``, summed."""
    stats = lab.envoy.stats(f"sluice_tokens.tenant.{TENANT}.")
    return sum(v for k, v in stats.items() if k.endswith(f".{name}"))


def test_requests_ending_with_trailers_are_metered(h2c_lab):
    sim = h2c_lab.sim("primary", "zone-a")
    responses = h2c(h2c_lab.envoy.address, [chat(chat_body()) for _ in range(REQUESTS_PER_MIN + 2)])
    statuses = [r.status for r in responses]
    assert statuses == [200] * REQUESTS_PER_MIN + [429, 429], statuses
    for r in responses[:REQUESTS_PER_MIN]:
        assert r.json()["usage"]["completion_tokens"] >= 1
    refused = responses[-1].json()
    assert refused["error"]["type"] == "requests", refused  # a request-rate limit
    assert refused["error"]["code"] == "rate_limit_exceeded", refused
    assert int(responses[-1].headers["retry-after"]) >= 1
    # The counters moved as for any request, and the refused ones never
    # reached the upstream.
    assert tenant_stat(h2c_lab, "admitted") == REQUESTS_PER_MIN
    assert tenant_stat(h2c_lab, "rejected") == 2
    assert sim.stats()["requests"] == REQUESTS_PER_MIN
    # The body was read at the trailers: its max_tokens was reserved.
    assert tenant_stat(h2c_lab, "tokens_reserved") >= REQUESTS_PER_MIN * MAX_TOKENS
    # Another tenant on the same connection type is not limited by it.
    other = h2c(h2c_lab.envoy.address, [chat(chat_body(), tenant="someone-else")])
    assert other[0].status == 200, other[0].body


def test_invalid_body_ending_with_trailers_is_400_and_stays_here(h2c_lab):
    sim = h2c_lab.sim("primary", "zone-a")
    bad, good = h2c(h2c_lab.envoy.address, [
        chat(b'{"model": "sim-large", "messages": [ not json', tenant="someone-else"),
        chat(chat_body(), tenant="someone-else"),
    ])
    assert bad.status == 400, bad.body
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert sim.stats()["requests"] == 1, "only the valid request reached llm-sim"
    assert h2c_lab.envoy.stats("sluice_tokens.invalid_requests") \
        .get("wasmcustom.sluice_tokens.invalid_requests") == 1
    # The connection and the filter keep serving: the next stream succeeded.
    assert good.status == 200, good.body
