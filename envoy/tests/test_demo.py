"""The demo runs end to end (shortened) and writes its report and plots; its
policy is the lab's plus the endpoint pool of the outlier chapter."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from demo.chapters import FIRST_TOKEN_TIMEOUT_S, POOL, POOL_MODEL
from lab import paths, render_envoy


def test_demo_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT / "envoy"))
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--scale", "0.1", "--out", str(tmp_path)],
        cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=170,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    assert "Chapter 1: Normal traffic" in done.stdout
    report = (tmp_path / "report.md").read_text()
    assert "| Normal traffic | held |" in report
    assert "| Outlier detection | held |" in report
    assert "not yet built" in report
    for plot in ("requests.png", "outlier-detection.png"):
        png = (tmp_path / plot).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, plot


def test_demo_policy_is_the_lab_policy_plus_the_pool():
    """The chapters before the pool's claim what the lab policy does: the
    demo's policy must not drift from it."""
    lab = tomllib.loads(paths.LAB_POLICY.read_text())
    demo = tomllib.loads(paths.DEMO_POLICY.read_text())
    kept = len(lab["backend"])
    assert demo["backend"][:kept] == lab["backend"]
    (pool,) = demo["backend"][kept:]
    assert {k: v for k, v in demo.items() if k not in ("name", "backend")} == \
        {k: v for k, v in lab.items() if k not in ("name", "backend")}
    # What the chapter assumes of the pool.
    assert pool["name"] == POOL.backend and pool["models"] == [POOL_MODEL]
    (zone,) = pool["zone"]
    assert zone["name"] == POOL.zone and len(zone["endpoints"]) == 4
    assert pool["outlier"]["first_token_timeout"] == f"{FIRST_TOKEN_TIMEOUT_S:g}s"
    assert POOL.first_token_timeout == FIRST_TOKEN_TIMEOUT_S
    assert "outlier" not in demo


def test_only_the_pool_is_steered_by_sluice():
    """``sluice render envoy`` gives the pool's cluster override_host and the
    per-attempt filter; the clusters of the other chapters stay as the lab's."""
    clusters = {c["name"]: c for c in
                yaml.safe_load(render_envoy(paths.DEMO_POLICY))["static_resources"]["clusters"]}
    lab_clusters = {c["name"]: c for c in
                    yaml.safe_load(render_envoy(paths.LAB_POLICY))["static_resources"]["clusters"]}
    pool = clusters.pop(POOL.backend)
    lb = pool["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert lb["name"] == "envoy.load_balancing_policies.override_host"
    upstream = pool["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert upstream[0]["name"] == "sluice.attempt"
    assert clusters.keys() == lab_clusters.keys()
    for name, cluster in clusters.items():
        assert "load_balancing_policy" not in cluster, name
        assert cluster["lb_policy"] == lab_clusters[name]["lb_policy"], name
