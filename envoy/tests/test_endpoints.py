"""A zone with several endpoints: one llm-sim per endpoint, all behind Envoy.

Outlier detection tells the hosts of one zone apart, so its drills need a
zone of several simulators, each with faults of its own. This checks that
the lab gives them that: one simulator per endpoint the policy lists, each
its own instance and seed, every one reached through Envoy, and the faults
the drills use (blackhole, retry-after hints) set through the lab's wrapper.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from lab.policies import many_endpoints

TIMEOUT = httpx.Timeout(30.0)
CHAT = {"model": "sim-large", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]}


def test_each_endpoint_of_a_zone_gets_its_own_simulator(lab_factory, tmp_path: Path):
    policy = tmp_path / "endpoints.toml"
    policy.write_text(many_endpoints("lab-endpoints", "", endpoints=4))
    lab = lab_factory(policy=policy, seed=10)

    sims = lab.endpoint_sims("primary", "zone-a")
    assert [s.instance for s in sims] == [f"primary-zone-a-{i}" for i in range(4)]
    assert len({s.listen for s in sims}) == 4
    assert [s.seed for s in sims] == [10, 11, 12, 13]
    assert lab.sim("primary", "zone-a") is sims[0]
    assert lab.sims["primary", "zone-a"] is sims[0]
    assert lab.all_sims() == sims

    # Envoy round-robins over every simulator of the zone.
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=lab.base_url, timeout=TIMEOUT, trust_env=False) as client:
        for _ in range(12):
            answer = client.post("/v1/chat/completions", json=CHAT,
                                 headers={"x-tenant-id": "drill"})
            assert answer.status_code == 200, answer.text
            seen[answer.headers["x-llm-sim-instance"]] += 1
    assert set(seen) == {s.instance for s in sims}, seen
    assert [s.stats()["requests"] for s in sims] == [seen[s.instance] for s in sims]


def test_new_faults_pass_through_the_wrapper(lab_factory, tmp_path: Path):
    policy = tmp_path / "endpoints.toml"
    policy.write_text(many_endpoints("lab-endpoint-faults", "", endpoints=2))
    lab = lab_factory(policy=policy)
    hinted, held = lab.endpoint_sims("primary", "zone-a")

    assert hinted.set_faults(fixed_status=429, retry_after_s=5)["retry_after_s"] == 5
    answer = httpx.post(f"{hinted.base_url}/v1/chat/completions", json=CHAT,
                        timeout=TIMEOUT, trust_env=False)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "5"
    assert answer.headers["x-ratelimit-reset-requests"] == "5s"

    assert held.set_faults(blackhole=True)["blackhole"] is True
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{held.base_url}/v1/chat/completions", json=CHAT,
                   timeout=httpx.Timeout(5.0, read=0.5), trust_env=False)
    assert httpx.get(f"{held.base_url}/health", trust_env=False).status_code == 200
    assert held.stats()["blackholed"] == 1
    held.set_faults()
    answer = httpx.post(f"{held.base_url}/v1/chat/completions", json=CHAT,
                        timeout=TIMEOUT, trust_env=False)
    assert answer.status_code == 200
