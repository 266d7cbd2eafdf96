"""A bad policy pushed to a running Envoy is rejected; the last good one keeps serving.

The listener (with sluice's filters and their policy) is loaded through
Envoy's filesystem xDS: Envoy re-reads the LDS file when it is replaced, as
a control plane would push an update. The filter validates the policy in
``on_configure`` with the same code as ``sluice validate``; when that fails,
Envoy rejects the whole update and keeps the listener it had.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import yaml

from lab import Envoy, LlmSim, render_envoy

POLICY = """
name = "reload-{version}"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
models = ["sim-large"]

  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:1"]

[tokens]
default_max_tokens = 64
{extra}
  [[tokens.quota]]
  tokens = "{limit}/min"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener_of(policy_text: str, tmp: Path, sim: LlmSim, port: int) -> tuple[dict, dict]:
    """(bootstrap without listeners, the listener) rendered from a policy."""
    policy = tmp / "policy.toml"
    policy.write_text(policy_text)
    doc = yaml.safe_load(render_envoy(policy, endpoints={("primary", "zone-a"): [sim.listen]},
                                      listen=f"127.0.0.1:{port}"))
    listener = doc["static_resources"].pop("listeners")[0]
    return doc, listener


def write_lds(path: Path, listener: dict) -> None:
    """Replaces the LDS file atomically (write aside, then rename), as Envoy expects."""
    resource = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}
    aside = path.with_suffix(".tmp")
    aside.write_text(yaml.safe_dump({"resources": [resource]}, sort_keys=False))
    os.replace(aside, path)


def with_policy(listener: dict, policy_text: str) -> dict:
    """The listener with every sluice filter configured with ``policy_text``."""
    changed = yaml.safe_load(yaml.safe_dump(listener))
    hcm = changed["filter_chains"][0]["filters"][0]["typed_config"]
    sluice_filters = [f for f in hcm["http_filters"] if f["name"] == "sluice"]
    assert sluice_filters, "the rendered listener has no sluice filter"
    for f in sluice_filters:
        f["typed_config"]["config"]["configuration"]["value"] = policy_text
    return changed


def lds_stat(envoy: Envoy, name: str) -> int:
    return envoy.stats("listener_manager.lds").get(f"listener_manager.lds.{name}", 0)


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def ask(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=10.0, trust_env=False,
                      headers={"x-tenant-id": "acme"},
                      json={"model": "sim-large", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hello"}]})


def test_bad_policy_is_rejected_and_the_previous_one_keeps_serving(tmp_path: Path):
    run_dir = tmp_path / "run"
    xds = tmp_path / "xds"
    xds.mkdir()
    lds = xds / "lds.yaml"
    port = free_port()
    with LlmSim(zone="zone-a", models=["sim-large"], instance="reload", run_dir=run_dir) as sim:
        bootstrap, listener = listener_of(POLICY.format(version=1, limit=5000, extra=""),
                                          tmp_path, sim, port)
        write_lds(lds, listener)
        bootstrap["dynamic_resources"] = {"lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": str(lds), "watched_directory": {"path": str(xds)}},
        }}
        with Envoy(yaml.safe_dump(bootstrap, sort_keys=False), run_dir) as envoy:
            base_url = f"http://127.0.0.1:{port}"
            assert wait_for(lambda: lds_stat(envoy, "update_success") >= 1)
            first = ask(base_url)
            assert first.status_code == 200, first.text
            assert first.headers["x-ratelimit-limit-tokens"] == "5000"

            # A policy with a mistake, pushed past `sluice validate` (which
            # would refuse to render it): the filter refuses it, Envoy
            # rejects the update.
            rejected_before = lds_stat(envoy, "update_rejected")
            bad_policy = POLICY.format(version=2, limit=9000, extra='chars_per_token = "four"\n')
            write_lds(lds, with_policy(listener, bad_policy))
            assert wait_for(lambda: lds_stat(envoy, "update_rejected") > rejected_before), \
                "Envoy did not reject the listener with the invalid policy"
            envoy.wait_for_log("invalid policy")
            # Traffic still flows under the previous policy.
            for _ in range(3):
                again = ask(base_url)
                assert again.status_code == 200, again.text
                assert again.headers["x-ratelimit-limit-tokens"] == "5000"

            # A corrected policy is taken.
            successes = lds_stat(envoy, "update_success")
            _, good = listener_of(POLICY.format(version=3, limit=7000, extra=""), tmp_path, sim, port)
            write_lds(lds, good)
            assert wait_for(lambda: lds_stat(envoy, "update_success") > successes)
            assert wait_for(lambda: ask(base_url).headers.get("x-ratelimit-limit-tokens") == "7000")
