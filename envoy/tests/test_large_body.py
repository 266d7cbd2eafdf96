"""Bodies near and over ``[tokens] max_body``, with and without content-length.

With a ``content-length`` sluice judges a large body from its headers. A
chunked body (no length) is judged as it arrives: the filter holds it and
answers its own 413, in the client's API shape, once it crosses
``max_body``. Envoy's own buffer limit (``per_connection_buffer_limit_bytes``,
1 MiB by default) must not cut in first with its plain-text 413, which no
SDK parses, nor refuse a body the policy allows: the render sets it above
the policy's ``max_body``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.rawhttp import H2Request, h2c, http1, request_bytes

MIB = 1024 * 1024

POLICY = """
name = "lab-large-bodies"

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
default_max_tokens = 16
max_body = "{max_body}"

  [[tokens.quota]]
  tokens = "100M/min"
"""


def body_of(size: int) -> bytes:
    """A valid chat completion body of about ``size`` bytes."""
    head = json.dumps({"model": "sim-large", "max_tokens": 4,
                       "messages": [{"role": "user", "content": ""}]}).encode()
    filler = b"a" * max(0, size - len(head))
    return head.replace(b'"content": ""', b'"content": "' + filler + b'"')


def post(lab, body: bytes, chunked: bool):
    request = request_bytes("POST", "/v1/chat/completions", [
        ("host", "llm.lab"), ("content-type", "application/json"), ("x-tenant-id", "big")],
        body, chunked=chunked)
    return http1(lab.envoy.address, request, timeout=30.0)


def start(lab_factory, tmp_path: Path, max_body: str):
    policy = tmp_path / "large.toml"
    policy.write_text(POLICY.format(max_body=max_body))
    # llm-sim takes bodies up to 64 MiB here, so only sluice and Envoy
    # limit; no simulated prefill (a MiB of prompt would take seconds).
    args = ["--max-body-bytes", str(64 * MIB), "--ttft-ms", "0",
            "--ttft-per-prompt-token-us", "0", "--tokens-per-sec", "0"]
    return lab_factory(policy=policy, sim_args={("primary", "zone-a"): args})


def assert_sluice_413(response) -> None:
    assert response.status == 413, (response.status, response.headers, response.body[:200])
    assert response.headers.get("content-type", "").startswith("application/json"), \
        ("Envoy's plain-text 413, not sluice's", response.headers, response.body[:200])
    error = response.json()["error"]
    assert error["code"] == "request_too_large", error


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_body_over_the_default_max_body_gets_sluices_413(lab_factory, tmp_path, chunked):
    lab = start(lab_factory, tmp_path, "1MiB")
    sim = lab.sim("primary", "zone-a")
    assert_sluice_413(post(lab, body_of(MIB + 256 * 1024), chunked))
    assert sim.stats()["requests"] == 0
    # A body under the limit is served, and Envoy keeps serving.
    ok = post(lab, body_of(MIB - 64 * 1024), chunked)
    assert ok.status == 200, (ok.status, ok.body[:200])


def test_max_body_above_envoys_default_buffer_is_honoured(lab_factory, tmp_path):
    lab = start(lab_factory, tmp_path, "3MiB")
    # 2 MiB is over Envoy's default 1 MiB buffer but within the policy.
    ok = post(lab, body_of(2 * MIB), chunked=True)
    assert ok.status == 200, (ok.status, ok.headers, ok.body[:200])
    assert ok.json()["usage"]["prompt_tokens"] > 2 * MIB // 8
    assert_sluice_413(post(lab, body_of(3 * MIB + 128 * 1024), chunked=True))


def test_h2c_body_over_max_body_without_length_gets_sluices_413(lab_factory, tmp_path):
    """HTTP/2 has no chunked encoding: a body without content-length is the
    ordinary case there, and it may end with trailers."""
    lab = start(lab_factory, tmp_path, "1MiB")
    headers = [("content-type", "application/json"), ("x-tenant-id", "big")]
    big = body_of(MIB + 256 * 1024)
    over, over_with_trailers, ok = h2c(lab.envoy.address, [
        H2Request("/v1/chat/completions", headers, big),
        H2Request("/v1/chat/completions", headers, big, trailers=[("x-done", "1")]),
        H2Request("/v1/chat/completions", headers, body_of(64 * 1024), trailers=[("x-done", "1")]),
    ], timeout=30.0)
    for refused in (over, over_with_trailers):
        assert_sluice_413(refused)
    assert ok.status == 200, (ok.status, ok.body[:200])
    assert lab.sim("primary", "zone-a").stats()["requests"] == 1
