"""Compressed answers: the client gets gzip, sluice still reads the usage.

sluice settles a reservation on the usage in the answer, which it cannot
read in a gzip body. The rendered chain puts Envoy's compressor before
sluice.wasm: on the way in it takes ``accept-encoding`` off the request (and
sluice takes it off what it meters), so llm-sim answers plain; on the way
out sluice reads the plain answer, then the compressor gzips it for a
client that asked. llm-sim honours ``accept-encoding: gzip`` (its
``gzipped`` counter shows whether it compressed) and, with
``--gzip-always``, compresses even when not asked: a misbehaving upstream
whose usage sluice cannot read, for which the documented answer is to keep
the whole reservation.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pytest

from lab.policies import one_backend
from lab import paths

TENANT = "gzip-client"
MODEL = "sim-large"
PREFIX = f"sluice_tokens.tenant.{TENANT}.model.{MODEL}."
MAX_TOKENS = 24
OUTPUT = 10  # what llm-sim generates: less than reserved, so settling shows

POLICY = one_backend("lab-gzip", f"""
[tokens]
default_max_tokens = 64

  [[tokens.quota]]
  match = {{ tenants = ["{TENANT}"], models = ["{MODEL}"] }}
  tokens = "1M/min"

  [[tokens.quota]]
  tokens = "1M/min"
""", model=MODEL)

SIM_ARGS = ["--output-tokens", str(OUTPUT), "--tokens-per-sec", "400", "--ttft-ms", "5"]


def filter_knows_compressed_answers() -> bool:
    """Whether the sluice.wasm under test handles answers it cannot read
    (main's 440c87c, which also defines ``compressed_responses``)."""
    try:
        return b"compressed_responses" in (paths.WASM_DIR / "sluice.wasm").read_bytes()
    except OSError:
        return True  # no module: let the test fail for what it is


def start(lab_factory, tmp_path: Path, *extra: str):
    policy = tmp_path / "gzip.toml"
    policy.write_text(POLICY)
    return lab_factory(policy=policy, sim_args={("primary", "zone-a"): [*SIM_ARGS, *extra]})


def stat(lab, name: str) -> int:
    return lab.envoy.stats(PREFIX).get(f"wasmcustom.{PREFIX}{name}", 0)


def settled(lab) -> int:
    """Tokens finally charged: reserved, less refunds, plus excess charges."""
    return stat(lab, "tokens_reserved") - stat(lab, "tokens_refunded") + stat(lab, "tokens_charged")


def upstream(lab) -> dict:
    return lab.sim("primary", "zone-a").stats()


def ask(lab, stream: bool, accept: str | None = "gzip") -> tuple[httpx.Headers, bytes]:
    """One chat completion; the response headers and its body as sent (not decoded)."""
    headers = {"x-tenant-id": TENANT, "accept-encoding": accept or "identity"}
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": "Compress this answer, please."}]}
    with httpx.Client(base_url=lab.base_url, timeout=20.0, trust_env=False) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            return r.headers, b"".join(r.iter_raw())


def usage_of(text: str, stream: bool) -> dict:
    if not stream:
        return json.loads(text)["usage"]
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    usages = [json.loads(e).get("usage") for e in events[:-1]]
    return [u for u in usages if u][-1]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_client_asking_gzip_gets_it_and_usage_is_settled(lab_factory, tmp_path, stream):
    lab = start(lab_factory, tmp_path)
    headers, raw = ask(lab, stream)
    assert headers.get("content-encoding") == "gzip", dict(headers)
    text = gzip.decompress(raw).decode()
    if stream:
        words = "".join(
            (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            for line in text.splitlines()
            if line.startswith("data: {"))
        assert len(words.split()) == OUTPUT
    else:
        usage = usage_of(text, stream)
        assert usage["completion_tokens"] == OUTPUT
    sim = upstream(lab)
    # llm-sim answered plain (nobody asked it for gzip), so sluice read the
    # usage: the tokens charged are the upstream's, not an estimate or ~0.
    assert sim["gzipped"] == 0, sim
    assert settled(lab) == sim["prompt_tokens"] + sim["tokens_produced"]
    assert sim["tokens_produced"] == OUTPUT
    assert stat(lab, "tokens_refunded") > 0, "settled below the reservation"
    assert lab.envoy.stats("sluice_tokens.estimated_usage") \
        .get("wasmcustom.sluice_tokens.estimated_usage", 0) == 0


@pytest.mark.xfail(
    condition=not filter_knows_compressed_answers(), strict=True,
    reason="sluice.wasm before 440c87c settles a gzip answer it cannot read (sent unasked "
           "by the upstream) on an estimate from unreadable text: the prompt alone (8 of a "
           "32-token reservation, 18 used), so such an upstream's completions go unbilled")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_upstream_that_always_compresses_is_charged_the_whole_reservation(
        lab_factory, tmp_path, stream):
    lab = start(lab_factory, tmp_path, "--gzip-always")
    headers, raw = ask(lab, stream)
    # The upstream's gzip passes through untouched (the compressor does not
    # compress twice), and the client can read it.
    assert headers.get("content-encoding") == "gzip", dict(headers)
    text = gzip.decompress(raw).decode()
    used = upstream(lab)["prompt_tokens"] + upstream(lab)["tokens_produced"]
    assert upstream(lab)["gzipped"] == 1
    charged = settled(lab)
    reserved = stat(lab, "tokens_reserved")
    print(f"gzip-always ({'stream' if stream else 'json'}): reserved {reserved}, "
          f"charged {charged}, upstream used {used}")
    assert usage_of(text, stream)["completion_tokens"] == OUTPUT
    assert used < reserved
    # Usage unreadable: the reservation stands, whole (not ~0, not a guess).
    assert charged == reserved, (charged, reserved, used)
