"""The wasmtime test host against the real Envoy, through the conformance probe.

The probe (filters/probe) records every fact a sluice filter depends on. The
host-tests harness produces its document for a fixed scenario
(``probe-observations``, see host-tests/src/probe.rs: one warm-up request,
then the observed one; the upstream answers ``{"id":"x","choices":[]}`` with
200 after 20 ms). This test plays the same scenario in Envoy 1.40 (the
rendered lab policy, every endpoint pointed at a fixed-answer upstream, the
probe alone in the chain as in the harness: sluice's filters would add
response headers the harness's scenario has not) and diffs the two documents
with the harness's own ``--compare``.

Differences already seen are listed with their reason (or "untriaged") in
``probe_known_differences.txt``; any other difference fails the test, so the
harness cannot drift further from Envoy unnoticed. The
Envoy document and the full diff are kept in ``target/probe-observations/``.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lab import Envoy, paths, render_envoy
from lab.render import policy_zones

from conftest import probe_built, with_probe

OUT_DIR = paths.TARGET_DIR / "probe-observations"
KNOWN = Path(__file__).with_name("probe_known_differences.txt")
UPSTREAM_BODY = b'{"id":"x","choices":[]}'
REQUEST_BODY = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
PATH = "/v1/chat/completions?probe=1"


class FixedUpstream(http.server.BaseHTTPRequestHandler):
    """Answers every request like the harness's `EndpointBehavior::fixed`."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(0.02)
        # Without http.server's own `server` and `date` headers.
        self.send_response_only(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(UPSTREAM_BODY)))
        self.end_headers()
        self.wfile.write(UPSTREAM_BODY)

    def log_message(self, *args):
        pass


def harness_tool() -> Path:
    return paths.TARGET_DIR / "debug" / "probe-observations"


def probe_only(bootstrap: str) -> str:
    """The rendered bootstrap with its wasm filters and the compressor
    removed (the router stays): the probe must see the upstream's bytes."""
    doc = yaml.safe_load(bootstrap)

    def walk(node):
        if isinstance(node, dict):
            filters = node.get("http_filters")
            if isinstance(filters, list):
                node["http_filters"] = [
                    f for f in filters
                    if "wasm" not in str(f.get("typed_config", {}).get("@type", ""))
                    and f.get("name") != "envoy.filters.http.compressor"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def known_differences() -> dict[str, str]:
    out = {}
    for line in KNOWN.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, reason = line.partition(" ")
            out[key] = reason.strip()
    return out


def parse_diff(text: str) -> set[str]:
    keys = set()
    for line in text.splitlines():
        for prefix in ("only in harness: ", "only in envoy:   ", "differs: "):
            if line.startswith(prefix):
                keys.add(line[len(prefix):].strip())
    return keys


def test_envoy_and_the_test_host_show_the_probe_the_same_things(tmp_path):
    if not probe_built():
        pytest.skip(f"the conformance probe is not built yet ({paths.PROBE_WASM})")
    if not harness_tool().is_file():
        pytest.fail(f"{harness_tool()} is missing (cargo build -p sluice-host-tests "
                    "--bin probe-observations; cargo xtask test builds it)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FixedUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        upstream = f"127.0.0.1:{server.server_address[1]}"
        endpoints = {(z.backend, z.zone): [upstream] for z in policy_zones(paths.LAB_POLICY)}
        bootstrap = with_probe(probe_only(render_envoy(paths.LAB_POLICY, endpoints=endpoints)))
        # The harness's request exactly: its headers (and authority), none of httpx's.
        headers = {"host": "sluice.test", "content-type": "application/json",
                   "user-agent": "sluice-probe-client/1"}
        with Envoy(bootstrap, tmp_path / "envoy", concurrency=1) as envoy, \
                httpx.Client(base_url=envoy.base_url, timeout=10, trust_env=False) as client:
            for default in ("accept", "accept-encoding", "connection"):
                client.headers.pop(default, None)
            warm = client.post(PATH, content=REQUEST_BODY,
                               headers={**headers, "x-probe-id": "warmup-0"})
            assert warm.status_code == 200, warm.text[:300]
            time.sleep(1.0)
            observed = client.post(PATH, content=REQUEST_BODY,
                                   headers={**headers, "x-probe-id": "observed"})
            assert observed.status_code == 200, observed.text[:300]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    envoy_doc = OUT_DIR / "envoy-harness-scenario.json"
    envoy_doc.write_text(observed.text)
    diff = subprocess.run([str(harness_tool()), "--compare", str(envoy_doc)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    (OUT_DIR / "harness-vs-envoy.diff.txt").write_text(diff.stdout + diff.stderr)
    assert diff.returncode in (0, 1), f"probe-observations failed:\n{diff.stderr}"
    found = parse_diff(diff.stdout)
    known = known_differences()

    def explained(key: str) -> bool:
        return any(key.startswith(k[:-1]) if k.endswith("*") else key == k for k in known)

    unexplained = sorted(k for k in found if not explained(k))
    assert not unexplained, (
        "the test host and Envoy differ where no known difference says why "
        f"(full diff: {OUT_DIR / 'harness-vs-envoy.diff.txt'}):\n"
        + "\n".join(line for line in diff.stdout.splitlines()
                    if any(k in line for k in unexplained))[:4000])
