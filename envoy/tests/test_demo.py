"""The demo runs end to end (shortened) and writes its report and plots; its
policy is the lab's plus the endpoint pool of the outlier chapter, the
retried backend of the retry-budget chapter and the three-zone backend of the
failover chapter."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from demo.chapters import FIRST_TOKEN_TIMEOUT_S, FLAKY, POOL, POOL_MODEL, REGIONAL
from lab import paths, render_envoy


# The failover chapter waits for two fail-backs of at least failback_after
# (10 s) each, whatever the scale: the short run takes about 50 s more than
# before it, so the run gets 230 s and the test 240 s (pytest.ini: 180 s).
@pytest.mark.timeout(240)
def test_demo_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT / "envoy"))
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--scale", "0.1", "--out", str(tmp_path)],
        cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=230,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    assert "Chapter 1: Normal traffic" in done.stdout
    report = (tmp_path / "report.md").read_text()
    assert "| Normal traffic | held |" in report
    assert "| Outlier detection | held |" in report
    assert "| Retry budgets | held |" in report
    assert "| Zone failover | held |" in report
    assert "not yet built" not in report
    for plot in ("requests.png", "outlier-detection.png", "retry-budget.png",
                 "zone-failover.png"):
        png = (tmp_path / plot).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, plot


def test_demo_policy_is_the_lab_policy_plus_the_chapters_backends():
    """The chapters before the pool's claim what the lab policy does: the
    demo's policy must not drift from it."""
    lab = tomllib.loads(paths.LAB_POLICY.read_text())
    demo = tomllib.loads(paths.DEMO_POLICY.read_text())
    kept = len(lab["backend"])
    assert demo["backend"][:kept] == lab["backend"]
    pool, flaky, regional = demo["backend"][kept:]
    assert {k: v for k, v in demo.items() if k not in ("name", "backend")} == \
        {k: v for k, v in lab.items() if k not in ("name", "backend")}
    # What the chapter assumes of the pool.
    assert pool["name"] == POOL.backend and pool["models"] == [POOL_MODEL]
    (zone,) = pool["zone"]
    assert zone["name"] == POOL.zone and len(zone["endpoints"]) == 4
    assert pool["outlier"]["first_token_timeout"] == f"{FIRST_TOKEN_TIMEOUT_S:g}s"
    assert POOL.first_token_timeout == FIRST_TOKEN_TIMEOUT_S
    assert "outlier" not in demo and "retry" not in pool
    # What the retry chapter assumes of its backend: retries within a
    # budget, on one zone of several replicas, and no circuit (an outage
    # must reach the clients, not the fallback model).
    assert flaky["name"] == FLAKY.backend and flaky["models"] == [FLAKY.model]
    (zone,) = flaky["zone"]
    assert zone["name"] == FLAKY.zone and len(zone["endpoints"]) > FLAKY.max_retries
    assert flaky["retry"]["max_retries"] == FLAKY.max_retries
    assert flaky["retry"]["budget"] == f"{FLAKY.budget:.0%}"
    assert flaky["breaker"] == {"enabled": False}
    assert "outlier" not in flaky
    assert "retry" not in demo
    # What the failover chapter assumes of its backend: its zones and
    # regions in order of preference, two endpoints each, one cluster, the
    # preferred zone named, its failback_after; failover on for it alone (a
    # global [failover] would take in the primary, whose two zones have no
    # [outlier]: `sluice validate` refuses that).
    assert regional["name"] == REGIONAL.backend and regional["models"] == [REGIONAL.model]
    zones = regional["zone"]
    assert tuple(z["name"] for z in zones) == REGIONAL.zones
    assert tuple(z["region"] for z in zones) == REGIONAL.regions
    assert all(len(z["endpoints"]) == 2 and "cluster" not in z for z in zones)
    assert "outlier" in regional and "retry" not in regional
    assert regional["failover"]["local_zone"] == REGIONAL.zones[0]
    assert regional["failover"]["failback_after"] == f"{REGIONAL.failback_after:g}s"
    assert "failover" not in demo
    assert not any("failover" in b for b in demo["backend"] if b is not regional)


def _upstream_filters(cluster: dict) -> list[str]:
    options = cluster.get("typed_extension_protocol_options", {}).get(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    return [f["name"] for f in options.get("http_filters", [])]


def test_only_the_pool_and_the_failover_backend_are_steered_by_sluice():
    """``sluice render envoy`` gives the pool's and the failover backend's
    clusters override_host and the per-attempt filter; the retried backend's
    route its retry policy; the clusters and routes of the other chapters
    balance and retry as the lab's (with [retry] in the policy, every cluster
    runs the per-attempt filter, which counts attempts of the retried backend
    only)."""
    bootstrap = yaml.safe_load(render_envoy(paths.DEMO_POLICY))
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    lab_bootstrap = yaml.safe_load(render_envoy(paths.LAB_POLICY))
    lab_clusters = {c["name"]: c for c in lab_bootstrap["static_resources"]["clusters"]}
    for steered in (POOL.backend, REGIONAL.backend):
        cluster = clusters.pop(steered)
        lb = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
        assert lb["name"] == "envoy.load_balancing_policies.override_host", steered
        assert _upstream_filters(cluster)[0] == "sluice.attempt", steered
    flaky = clusters.pop(FLAKY.backend)
    assert "load_balancing_policy" not in flaky
    assert _upstream_filters(flaky)[0] == "sluice.attempt"
    assert clusters.keys() == lab_clusters.keys()
    for name, cluster in clusters.items():
        assert "load_balancing_policy" not in cluster, name
        assert cluster["lb_policy"] == lab_clusters[name]["lb_policy"], name

    def routes(config: dict) -> dict[str, dict]:
        (listener,) = config["static_resources"]["listeners"]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return {r["name"]: r["route"] for vh in hcm["route_config"]["virtual_hosts"]
                for r in vh["routes"]}

    demo_routes, lab_routes = routes(bootstrap), routes(lab_bootstrap)
    retried = [name for name, r in demo_routes.items() if "retry_policy" in r]
    assert retried and all(demo_routes[name]["cluster"] == FLAKY.backend for name in retried)
    assert not any("retry_policy" in r for r in lab_routes.values())
