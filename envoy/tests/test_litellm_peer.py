"""The LiteLLM proxy as the drills' third system: it routes, streams and fails over.

Four llm-sims (zone-a: a1, a2; zone-b: b1, b2) behind LiteLLM configured as
envoy/drills/litellm.yaml says. The real openai SDK checks that answers come
from zone-a (order 1) while it is healthy, and still succeed, from zone-b,
once zone-a answers 503. Skipped without target/litellm-venv
(`cargo xtask litellm-venv`), so `cargo xtask test` does not need LiteLLM.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lab import LlmSim, paths
from lab import litellm as litellm_lab

pytestmark = pytest.mark.skipif(
    not litellm_lab.installed(),
    reason=f"LiteLLM is not installed ({litellm_lab.LITELLM_BIN}): run `cargo xtask litellm-venv`",
)

SIMS = [("zone-a", "a1"), ("zone-a", "a2"), ("zone-b", "b1"), ("zone-b", "b2")]
# Small, fast answers: the proxy's own work is what the numbers are about.
SIM_ARGS = ["--ttft-ms", "10", "--tokens-per-sec", "1000", "--output-tokens", "8", "--quiet"]
MESSAGES = [{"role": "user", "content": "Say something about meshes."}]


@pytest.fixture
def peer(request):
    run_dir = paths.LOGS_DIR / paths.safe_name(request.node.name)
    sims: list[LlmSim] = []
    try:
        for zone, instance in SIMS:
            sims.append(LlmSim(zone=zone, models=[litellm_lab.MODEL], instance=instance,
                               run_dir=run_dir, extra_args=SIM_ARGS))
        endpoints = [(sim.zone, sim.base_url) for sim in sims]
        with litellm_lab.LiteLLM(None, run_dir, endpoints=endpoints) as proxy:
            yield proxy, sims
    finally:
        for sim in sims:
            sim.stop()


def requests_by_zone(sims: list[LlmSim]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sim in sims:
        counts[sim.zone] = counts.get(sim.zone, 0) + sim.stats()["requests"]
    return counts


def chat(client, stream: bool) -> tuple[str, str | None]:
    """(answer text, zone that served it) — the zone from LiteLLM's provider headers."""
    raw = client.chat.completions.with_raw_response.create(
        model=litellm_lab.MODEL, messages=MESSAGES, max_tokens=8, stream=stream)
    assert raw.http_response.status_code == 200
    zone = raw.headers.get("llm_provider-x-llm-sim-zone")
    parsed = raw.parse()
    if stream:
        text = "".join(chunk.choices[0].delta.content or ""
                       for chunk in parsed if chunk.choices)
    else:
        text = parsed.choices[0].message.content or ""
    return text, zone


def test_litellm_routes_to_zone_a_then_fails_over_to_zone_b(peer):
    import openai

    proxy, sims = peer
    client = openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key=proxy.api_key,
                           max_retries=0, timeout=30.0)
    zone_a = [sim for sim in sims if sim.zone == "zone-a"]
    try:
        # Healthy: order 1 (zone-a) serves everything, streamed or not.
        before = requests_by_zone(sims)
        for stream in (False, True, False, True, False, True):
            text, zone = chat(client, stream)
            assert text.strip(), "empty answer"
            if zone is not None:  # LiteLLM forwards the upstream headers
                assert zone == "zone-a"
        after = requests_by_zone(sims)
        assert after["zone-a"] - before["zone-a"] == 6
        assert after["zone-b"] == before["zone-b"], "zone-b served while zone-a was healthy"

        # Zone-a answers 503 to everything: retries, cooldown, then order-based
        # fallback to zone-b must keep every request succeeding.
        for sim in zone_a:
            sim.set_faults(fixed_status=503)
        before = requests_by_zone(sims)
        served_by = []
        for i in range(12):
            text, zone = chat(client, stream=bool(i % 2))
            assert text.strip(), "empty answer"
            served_by.append(zone)
        after = requests_by_zone(sims)
        assert after["zone-b"] - before["zone-b"] == 12, served_by
        assert all(zone in (None, "zone-b") for zone in served_by), served_by
        zone_a_attempts = after["zone-a"] - before["zone-a"]
        print(f"\nLiteLLM failover: 12/12 requests succeeded via zone-b; "
              f"{zone_a_attempts} attempts hit the failing zone-a on the way")

        # Zone-a healthy again: LiteLLM's CPU per request under a modest
        # closed loop (8 clients, 100 non-streamed requests). A number for the
        # report, not an assertion: it depends on the machine.
        for sim in zone_a:
            sim.set_faults()
        requests, clients = 100, 8
        cpu_before = proxy.cpu_seconds()
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda i: chat(client, stream=False)[0], range(requests)))
        wall = time.monotonic() - started
        cpu = proxy.cpu_seconds() - cpu_before
        assert all(text.strip() for text in answers)
        print(f"LiteLLM CPU: {1000 * cpu / requests:.2f} ms per request "
              f"({cpu:.2f} s over {requests} requests, {clients} clients, {wall:.1f} s wall, "
              f"{len(proxy.pids())} process(es))")
    finally:
        client.close()
