"""sluice.wasm as an upstream filter: one instance per upstream attempt.

``sluice render envoy --attempt-filter`` adds the module to every cluster's
``http_filters`` (root id ``sluice.attempt``, the listener's ``vm_id``), where
Envoy runs it once per attempt, retries included. Here: Envoy 1.40 accepts
that configuration, requests flow through both instances, and the attempt
instance counts one attempt per request (``sluice.attempts``).
"""

from __future__ import annotations

import httpx
import yaml

from lab import paths, validate
from lab.render import sluice


def render_with_attempts(policy) -> dict:
    """The policy rendered with the attempt filter (placeholder endpoints)."""
    done = sluice("render", "envoy", str(policy), "--wasm-dir", str(paths.WASM_DIR),
                  "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--attempt-filter")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_envoy_accepts_the_attempt_filter(tmp_path):
    rendered = render_with_attempts(paths.LAB_POLICY)
    clusters = rendered["static_resources"]["clusters"]
    for cluster in clusters:
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        names = [f["name"] for f in options["http_filters"]]
        assert names == ["sluice.attempt", "envoy.filters.http.upstream_codec"]
        config = options["http_filters"][0]["typed_config"]["config"]
        assert config["root_id"] == "sluice.attempt"
        assert config["vm_config"]["vm_id"] == "sluice"
    bootstrap = tmp_path / "attempts.yaml"
    bootstrap.write_text(yaml.safe_dump(rendered, sort_keys=False))
    result = validate(bootstrap)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_every_attempt_reaches_the_attempt_instance(lab_factory):
    with_attempts = render_with_attempts(paths.LAB_POLICY)
    options = {c["name"]: c["typed_extension_protocol_options"]
               for c in with_attempts["static_resources"]["clusters"]}

    def add_attempt_filter(bootstrap: str) -> str:
        # The lab renders with run-time endpoints; take the cluster options
        # exactly as `--attempt-filter` renders them.
        doc = yaml.safe_load(bootstrap)
        for cluster in doc["static_resources"]["clusters"]:
            cluster["typed_extension_protocol_options"] = options[cluster["name"]]
        return yaml.safe_dump(doc, sort_keys=False)

    lab = lab_factory(bootstrap_hook=add_attempt_filter)
    body = {"model": "sim-large", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=lab.base_url, timeout=20.0) as client:
        for _ in range(5):
            r = client.post("/v1/chat/completions", json=body,
                            headers={"x-tenant-id": "attempts-lab"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
    attempts = {k: v for k, v in lab.envoy.stats("sluice.attempt").items()
                if k.endswith("sluice.attempts")}
    assert attempts and sum(attempts.values()) == 5, attempts
    retries = {k: v for k, v in lab.envoy.stats("sluice.attempt_retries").items()}
    assert sum(retries.values()) == 0, retries
