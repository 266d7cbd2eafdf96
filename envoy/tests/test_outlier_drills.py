"""Outlier drills: four llm-sim endpoints behind Envoy, streamed ``openai``
SDK clients, one endpoint misbehaving — under sluice's ``[outlier]`` and,
on the same traffic in the same run, under Envoy's own outlier detection
(``sluice render envoy --native-outlier``: consecutive 5xx, failure and
success rates, retries on other hosts, the first-token timeout as
``per_try_timeout``).

The numbers are printed and written to ``target/drills/outlier.json``; the
assertions hold sluice to its targets with room for a loaded machine:

- slow endpoint (first token 5× slower): traffic leaves it and p99 time to
  first token comes back (target: within 1.2× the healthy p99 in ≤ 2 s);
- blackholed endpoint (accepts, never answers): no client waits longer than
  ``first_token_timeout`` plus a healthy first token, and none fails;
- 429 endpoint (``retry-after: 5``): no client sees a 429 and the endpoint
  gets no request for the 5 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from lab import drills, paths
from lab.policies import many_endpoints

FIRST_TOKEN_TIMEOUT = 1.0
SECTIONS = f"""
[outlier]
first_token_timeout = "{int(FIRST_TOKEN_TIMEOUT * 1000)}ms"
jitter = "0%"
"""
WARMUP = 3.0
AFTER = 7.0
HEALTHY_TTFT_MS = 50   # llm-sim's default --ttft-ms
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = paths.TARGET_DIR / "drills" / "outlier.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2, sort_keys=True))
    print(f"\noutlier drills → {out}")
    for key, value in sorted(RESULTS.items()):
        print(f"  {key}: {value}")


def drill_lab(lab_factory, tmp_path: Path, variant: str):
    policy = tmp_path / "drill.toml"
    policy.write_text(many_endpoints("outlier-drill", SECTIONS, endpoints=4))
    args = ("--native-outlier",) if variant == "native" else ()
    lab = lab_factory(policy=policy, render_args=args)
    return lab, lab.endpoint_sims("primary", "zone-a")


def served_by(samples, sim, lab) -> list:
    """Samples the simulator ``sim`` answered (by its address or instance)."""
    return [s for s in samples if s.endpoint in (sim.listen, sim.instance)]


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_slow_endpoint(lab_factory, tmp_path, variant):
    lab, sims = drill_lab(lab_factory, tmp_path, variant)
    slow = sims[1]
    fault = WARMUP
    d = drills.run(lab.base_url, seconds=WARMUP + AFTER, events=[
        (fault, lambda: slow.set_faults(added_latency_ms=4 * HEALTHY_TTFT_MS))])
    baseline = drills.p99(drills.ttfts(d.samples, 1.0, fault))
    after = drills.p99(drills.ttfts(d.samples, fault + 2.0, fault + AFTER))
    late = [s for s in d.samples if s.start >= fault + 2.0]
    to_slow = served_by(late, slow, lab)
    failed = [s for s in d.samples if s.status != 200]
    recovered = drills.recovery(d.samples, fault, fault + AFTER, 1.2 * baseline)
    RESULTS[f"slow/{variant}"] = {
        "requests": len(d.samples), "failed": len(failed),
        "p99_ttft_ms_before": round(baseline * 1000), "p99_ttft_ms_after_2s": round(after * 1000),
        "ratio": round(after / baseline, 2), "recovered_within_1.2x_s": recovered,
        "share_to_slow_after_2s": round(len(to_slow) / max(1, len(late)), 3),
    }
    if variant == "sluice":
        assert not failed, failed[:3]
        # Traffic left it: a trickle at most (probes, the first samples).
        assert len(to_slow) <= max(2, len(late) // 50), RESULTS[f"slow/{variant}"]
        # Its p99 is no longer the slow endpoint's first token (250 ms).
        assert after < 0.8 * (5 * HEALTHY_TTFT_MS / 1000) + baseline, RESULTS[f"slow/{variant}"]


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_blackholed_endpoint(lab_factory, tmp_path, variant):
    lab, sims = drill_lab(lab_factory, tmp_path, variant)
    hole = sims[2]
    fault = WARMUP
    d = drills.run(lab.base_url, seconds=WARMUP + AFTER,
                   events=[(fault, lambda: hole.set_faults(blackhole=True))])
    after = [s for s in d.samples if s.start >= fault]
    waits = [s.ttft if s.ttft is not None else s.total for s in after]
    failed = [s for s in after if s.status != 200 or s.error]
    healthy = drills.p99(drills.ttfts(d.samples, 1.0, fault))
    RESULTS[f"blackhole/{variant}"] = {
        "requests": len(d.samples), "failed_after_fault": len(failed),
        "worst_wait_ms": round(max(waits) * 1000),
        "p99_wait_ms": round(drills.p99(waits) * 1000),
        "healthy_p99_ttft_ms": round(healthy * 1000),
        "first_token_timeout_ms": round(FIRST_TOKEN_TIMEOUT * 1000),
        "blackholed_requests": hole.stats().get("blackholed", 0),
    }
    hole.set_faults()   # let held connections go before the lab stops
    if variant == "sluice":
        assert not failed, [(s.status, s.error) for s in failed[:3]]
        # Target: the deadline plus one healthy first token; a loaded
        # machine gets half a second more.
        assert max(waits) <= FIRST_TOKEN_TIMEOUT + healthy + 0.5, RESULTS[f"blackhole/{variant}"]


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_throttled_endpoint(lab_factory, tmp_path, variant):
    lab, sims = drill_lab(lab_factory, tmp_path, variant)
    full = sims[3]
    fault = WARMUP
    d = drills.run(lab.base_url, seconds=WARMUP + AFTER, events=[
        (fault, lambda: full.set_faults(fixed_status=429, retry_after_s=5)),
        (fault + 0.5, lambda: full.stats()["requests"]),
        (fault + 4.5, lambda: full.stats()["requests"]),
    ])
    during = d.marks[f"t={fault + 4.5}"] - d.marks[f"t={fault + 0.5}"]
    seen_429 = [s for s in d.samples if s.status == 429]
    failed = [s for s in d.samples if s.status != 200]
    RESULTS[f"429/{variant}"] = {
        "requests": len(d.samples), "client_429s": len(seen_429), "failed": len(failed),
        "requests_to_it_from_0.5s_to_4.5s": during,
    }
    if variant == "sluice":
        assert not seen_429 and not failed, RESULTS[f"429/{variant}"]
        # Benched for its retry-after: nothing while it lasts (a request
        # already picked when the first 429 came may still land).
        assert during <= 1, RESULTS[f"429/{variant}"]


def test_clients_that_hang_up_do_not_eject_healthy_endpoints(lab_factory, tmp_path):
    """Clients whose timeout is shorter than a generation leave before any
    answer: their attempts end without a status, as a dead endpoint's do.
    The per-attempt instance reads the request's ``DC`` flag (set before
    Envoy resets the attempt) and does not judge them: a client cannot eject
    healthy endpoints by hanging up."""
    lab, sims = drill_lab(lab_factory, tmp_path, "sluice")
    body = {"model": "sim-large", "max_tokens": 32,   # ~0.7 s at llm-sim's 50 tokens/s
            "messages": [{"role": "user", "content": "a long answer please"}]}
    hung_up = 0
    with httpx.Client(base_url=lab.base_url, timeout=httpx.Timeout(0.15),
                      headers={"x-tenant-id": "impatient"}, trust_env=False) as client:
        for _ in range(60):
            try:
                client.post("/v1/chat/completions", json=body)
            except httpx.TimeoutException:
                hung_up += 1
    assert hung_up >= 50, hung_up
    # The hang-ups are over; give the workers' ticks time to flush them.
    time.sleep(0.5)
    with httpx.Client(base_url=lab.base_url, timeout=httpx.Timeout(30.0),
                      headers={"x-tenant-id": "patient"}, trust_env=False) as client:
        for _ in range(8):
            assert client.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
    stats = lab.envoy.stats(filter="sluice_outlier")
    ejections = {k: v for k, v in stats.items() if k.endswith(".ejections")}
    assert len(ejections) == 4, stats
    assert sum(ejections.values()) == 0, ejections
    log = lab.envoy.log_path.read_text(errors="replace")
    assert "ejected for" not in log, "an endpoint was ejected"


def test_clients_that_hang_up_mid_stream_do_not_eject_healthy_endpoints(lab_factory, tmp_path):
    """A stream whose body never ends counts against its endpoint (a cut
    stream), unless the client left: clients that read the first chunk and
    hang up must not eject healthy endpoints either."""
    lab, sims = drill_lab(lab_factory, tmp_path, "sluice")
    body = {"model": "sim-large", "max_tokens": 32, "stream": True,   # ~0.7 s of tokens
            "messages": [{"role": "user", "content": "a long answer please"}]}
    hung_up = 0
    with httpx.Client(base_url=lab.base_url, timeout=httpx.Timeout(30.0),
                      headers={"x-tenant-id": "impatient"}, trust_env=False) as client:
        for _ in range(40):
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        hung_up += 1
                        break
            # Leaving the block unread closes the connection: a hang-up.
    assert hung_up == 40, hung_up
    time.sleep(0.5)
    with httpx.Client(base_url=lab.base_url, timeout=httpx.Timeout(30.0),
                      headers={"x-tenant-id": "patient"}, trust_env=False) as client:
        for _ in range(8):
            assert client.post("/v1/chat/completions", json={**body, "stream": False,
                                                              "max_tokens": 2}).status_code == 200
    stats = lab.envoy.stats(filter="sluice_outlier")
    ejections = {k: v for k, v in stats.items() if k.endswith(".ejections")}
    assert len(ejections) == 4, stats
    assert sum(ejections.values()) == 0, ejections
    log = lab.envoy.log_path.read_text(errors="replace")
    assert "ejected for" not in log, "an endpoint was ejected"
