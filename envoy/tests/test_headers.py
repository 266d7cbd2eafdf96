"""Identity headers a client can make hostile, on the wire, through Envoy.

proxy-wasm's SDK unwraps ``String::from_utf8`` on every header it reads: a
header value that is not UTF-8 would panic the VM, and with it every request
on that worker. The HTTP/1.1 codec lets such bytes through (obs-text), so
these tests send them raw: under header identity (``x-tenant-id``) and under
API-key identity (``authorization: Bearer``), a request with such a value
gets a well-formed HTTP answer, the next ordinary request is served, and
Envoy's log shows no panic and no VM failure. A request that names two
different API keys is refused with a 400 in OpenAI's error shape: the
upstream would bill one of them and sluice cannot know which.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.rawhttp import http1, request_bytes

API_KEY_POLICY = """
name = "lab-api-keys"

[tenant]
from = "api-key"

[[backend]]
name = "primary"
models = ["sim-large"]
timeout = "60s"

  [[backend.zone]]
  name = "zone-a"
  region = "lab"
  endpoints = ["127.0.0.1:18001"]

[tokens]
default_max_tokens = 64

  [[tokens.quota]]
  tokens = "1M/min"
"""

BODY = json.dumps({"model": "sim-large", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()

# What Envoy logs when a Wasm VM fails: the panic hook's critical line, a
# trap ("RuntimeError: unreachable"), or a failed callback.
VM_FAILURES = ("panic", "RuntimeError", "Wasm VM failed", "wasm log: failed")


@pytest.fixture
def api_key_lab(lab_factory, tmp_path: Path):
    policy = tmp_path / "api-keys.toml"
    policy.write_text(API_KEY_POLICY)
    return lab_factory(policy=policy)


def chat(lab, headers: list[tuple[bytes | str, bytes | str]]):
    """A chat completion as raw HTTP/1.1 bytes with exactly ``headers``."""
    request = request_bytes("POST", "/v1/chat/completions", [
        ("host", "llm.lab"), ("content-type", "application/json"), *headers], BODY)
    return http1(lab.envoy.address, request)


def assert_still_serving(lab, identity: tuple[str, str]) -> None:
    response = chat(lab, [identity])
    assert response.status == 200, response.body
    assert response.json()["usage"]["completion_tokens"] == 5


def admitted(lab) -> int:
    """Requests the token capability admitted, over every tenant and model."""
    stats = lab.envoy.stats("sluice_tokens.tenant.")
    return sum(v for k, v in stats.items() if k.endswith(".admitted"))


def assert_no_vm_failure(lab) -> None:
    log = lab.envoy.log_path.read_text(errors="replace")
    found = [line for line in log.splitlines() if any(f in line for f in VM_FAILURES)]
    assert not found, "\n".join(found[:10])


def assert_clean_answer(response) -> None:
    """Served, or refused with an answer in OpenAI's shape; never a reset."""
    if response.status == 200:
        assert response.json()["usage"]["completion_tokens"] == 5
    else:
        assert 400 <= response.status < 500, (response.status, response.body)
        assert "error" in response.json()


TENANT_VALUES = [b"\xff\xfeacme", b"acme\x80", b"\xc3\x28", b"x" * 8000]


def test_tenant_header_that_is_not_utf8_is_served_cleanly(lab):
    for value in TENANT_VALUES:
        response = chat(lab, [("x-tenant-id", value)])
        assert_clean_answer(response)
        print(f"x-tenant-id {value[:12]!r}: {response.status}")
        assert_still_serving(lab, ("x-tenant-id", "acme"))
    # Each request was metered under some tenant, none passed unmetered.
    assert admitted(lab) == 2 * len(TENANT_VALUES)
    assert_no_vm_failure(lab)


API_KEY_HEADERS = [
    [("authorization", b"Bearer \xff\xfe")],
    [("x-api-key", b"\xff\xfe\xfd")],
    [("authorization", b"Bearer \xff\xfe"), ("x-api-key", b"\xff\xfe")],
    [("authorization", b"\xff\xfe sk-lab")],
]


def test_api_key_that_is_not_utf8_is_served_cleanly(api_key_lab):
    for headers in API_KEY_HEADERS:
        response = chat(api_key_lab, headers)
        assert_clean_answer(response)
        print(f"{headers!r}: {response.status}")
        assert_still_serving(api_key_lab, ("authorization", "Bearer sk-lab-ordinary"))
    assert admitted(api_key_lab) == 2 * len(API_KEY_HEADERS)
    assert_no_vm_failure(api_key_lab)


def test_two_different_api_keys_are_refused_in_openai_shape(api_key_lab):
    sim = api_key_lab.sim("primary", "zone-a")
    response = chat(api_key_lab, [("authorization", "Bearer sk-key-a"), ("x-api-key", "sk-key-b")])
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert "two different API keys" in error["message"], error
    assert sim.stats()["requests"] == 0, "the refused request reached the upstream"
    # The same key twice is one identity, and is served.
    same = chat(api_key_lab, [("authorization", "Bearer sk-key-a"), ("x-api-key", "sk-key-a")])
    assert same.status == 200, same.body
    assert_no_vm_failure(api_key_lab)
