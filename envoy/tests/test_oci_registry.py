"""sluice's OCI images through a real registry, and Envoy loading sluice.wasm from it.

A CNCF distribution registry (Debian's ``docker-registry``) runs on
127.0.0.1; ``sluice package`` writes both image variants as OCI layouts and
``skopeo`` pushes them and pulls them back: nothing may change on the way
(manifest and layer digests, media types).

Then Envoy 1.40 takes sluice.wasm straight from the registry: the wasm
filter's code is a ``remote`` source whose ``http_uri`` is the registry's
blob URL of the raw-module layer, with its ``sha256``, as a mesh agent that
resolved an image would hand it over. Facts from Envoy's source
(``source/extensions/common/wasm/wasm.cc``, ``createWasm``;
``source/common/config/remote_data_fetcher.cc``;
``RemoteAsyncDataProvider`` in ``source/common/config/datasource.h``):

- the fetch needs a 200 (no redirect is followed) and compares the body's
  sha256 (lowercase hex, no ``sha256:`` prefix) with ``sha256``; a mismatch
  is a failed fetch;
- fetched code is cached by its ``sha256`` for the process;
- by default the listener waits (init manager) for the fetch, and when it
  fails for good the listener goes live anyway with a plugin that failed to
  load ("Plugin configured to fail closed failed to load"): a wrong
  ``sha256`` would *replace* a working configuration with a broken one;
- with ``vm_config.nack_on_code_cache_miss: true`` a configuration whose code
  is not in the cache is rejected at once ("Unable to create Wasm plugin")
  while the code is fetched in the background; the control plane's next push
  then finds it cached. A wrong ``sha256`` never fills the cache, so that
  configuration is always refused and the previous one keeps serving.

The last test shows the default at work, as the reason for the flag.

The registry tests skip, with the reason, where ``docker-registry`` or
``skopeo`` is missing (``cargo xtask test`` installs them with apt-get when
it can, and passes on why it could not).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from lab import Envoy, LlmSim, ManagedProcess, render_envoy
from lab import paths
from lab.procs import wait_until
from lab.render import sluice

TOOLS = ("docker-registry", "skopeo")
REPOSITORY = "sluice"
TAG = "lab"
VARIANTS = ("wasm", "compat")
REGISTRY_CLUSTER = "oci-registry"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        reason = os.environ.get("SLUICE_OCI_TOOLS_UNAVAILABLE") or (
            f"{' and '.join(missing)} not on PATH (`cargo xtask test` installs them "
            "with apt-get where it can)")
        pytest.skip(reason)


# -- the registry --------------------------------------------------------


@dataclass
class Registry:
    address: str  # 127.0.0.1:PORT
    proc: ManagedProcess
    policy: Path  # skopeo's trust policy: accept anything (a local test registry)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def ref(self, tag: str) -> str:
        return f"docker://{self.address}/{REPOSITORY}:{tag}"

    def blob_url(self, digest: str) -> str:
        return f"http://{self.address}/v2/{REPOSITORY}/blobs/{digest}"

    def log(self) -> str:
        return self.proc.stderr_path.read_text(errors="replace") + \
            self.proc.stdout_path.read_text(errors="replace")

    def fetches_by_others(self, digest: str) -> int:
        """GETs of a blob in the registry's access log, skopeo's left out."""
        return sum(1 for line in self.log().splitlines()
                   if f'"GET /v2/{REPOSITORY}/blobs/{digest} ' in line and "skopeo" not in line)

    def skopeo(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(["skopeo", "--policy", str(self.policy), *args],
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, \
            f"skopeo {' '.join(args)} failed:\n{done.stderr.decode(errors='replace')}"
        return done


def _v2_answers(address: str, proc: ManagedProcess) -> bool:
    if not proc.alive():
        raise RuntimeError(f"the registry exited: {proc.describe_exit()}")
    try:
        return httpx.get(f"http://{address}/v2/", timeout=1.0, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry on 127.0.0.1 with filesystem storage and no auth; stopped after the module."""
    require_tools()
    root = tmp_path_factory.mktemp("registry")
    policy = root / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    address = f"127.0.0.1:{free_port()}"
    config = root / "config.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": address},
    }))
    proc = ManagedProcess("docker-registry", ["docker-registry", "serve", config], root)
    try:
        wait_until(lambda: _v2_answers(address, proc), 15.0, interval=0.1,
                   what="the registry's /v2/")
        yield Registry(address, proc, policy)
    finally:
        proc.stop()


# -- the packaged images ---------------------------------------------------


@dataclass
class Packaged:
    report: dict[str, str]  # `sluice package`'s lines, key -> value
    out: Path

    def layout(self, variant: str) -> Path:
        return self.out / variant

    def manifest(self, variant: str) -> dict:
        return json.loads(blob(self.layout(variant), self.report[f"{variant}-manifest"]))


def blob(layout: Path, digest: str) -> bytes:
    algorithm, hex_digest = digest.split(":", 1)
    return (layout / "blobs" / algorithm / hex_digest).read_bytes()


def index_manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    return entry["digest"]


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory) -> Packaged:
    """Both variants packaged by the native CLI and pushed with skopeo
    (``sluice:lab-wasm``, ``sluice:lab-compat``)."""
    wasm = paths.WASM_DIR / "sluice.wasm"
    if not wasm.is_file():
        pytest.fail(f"{wasm} is missing: run `cargo xtask build` first")
    out = tmp_path_factory.mktemp("oci")
    done = sluice("package", "--wasm", str(wasm), "--out", str(out), "--tag", TAG)
    assert done.returncode == 0, done.stderr
    report = dict(line.split(" ", 1) for line in done.stdout.splitlines()
                  if line and not line.startswith("#"))
    for variant in VARIANTS:
        registry.skopeo("copy", "--dest-tls-verify=false",
                        f"oci:{out / variant}:{TAG}", registry.ref(f"{TAG}-{variant}"))
    return Packaged(report, out)


def test_both_variants_round_trip_through_the_registry(registry, pushed, tmp_path):
    module = (paths.WASM_DIR / "sluice.wasm").read_bytes()
    assert pushed.report["module-sha256"] == sha256_hex(module)
    for variant in VARIANTS:
        local = pushed.manifest(variant)
        ref = registry.ref(f"{TAG}-{variant}")
        raw = registry.skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
        # The registry serves the very manifest bytes sluice wrote.
        assert f"sha256:{sha256_hex(raw)}" == pushed.report[f"{variant}-manifest"], variant
        remote = json.loads(raw)
        assert remote["mediaType"] == OCI_MANIFEST
        layers = [(layer["mediaType"], layer["digest"]) for layer in remote["layers"]]
        assert layers == [(layer["mediaType"], layer["digest"]) for layer in local["layers"]]
        if variant == "wasm":
            assert remote["config"]["mediaType"] == WASM_CONFIG
            assert [media for media, _ in layers] == [WASM_CONFIG, WASM_LAYER]
            assert layers[1][1] == f"sha256:{pushed.report['module-sha256']}"
        else:
            assert remote["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
            assert layers == [("application/vnd.oci.image.layer.v1.tar+gzip",
                               pushed.report["compat-layer"])]
            assert remote["annotations"] == {"module.wasm.image/variant": "compat"}

        # Pulled back into a new layout: the same manifest, the same blobs.
        back = tmp_path / variant
        registry.skopeo("copy", "--src-tls-verify=false", ref, f"oci:{back}:{TAG}")
        assert index_manifest_digest(back, TAG) == pushed.report[f"{variant}-manifest"]
        for descriptor in [remote["config"], *remote["layers"]]:
            assert blob(back, descriptor["digest"]) == \
                blob(pushed.layout(variant), descriptor["digest"])


# -- Envoy loading sluice.wasm from the registry -----------------------------


def registry_cluster(registry: Registry) -> dict:
    return {
        "name": REGISTRY_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": REGISTRY_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": registry.port}}}}]}],
        },
    }


def remote_code(registry: Registry, layer_digest: str, sha256: str) -> dict:
    """A wasm ``code`` source fetching the module from the registry's blob URL."""
    return {"remote": {
        "http_uri": {"uri": registry.blob_url(layer_digest), "cluster": REGISTRY_CLUSTER,
                     "timeout": "10s"},
        "sha256": sha256,
    }}


def use_remote_code(node, code: dict, nack_on_cache_miss: bool = False) -> int:
    """Replaces every local ``sluice.wasm`` code source under ``node`` with
    ``code``; the number replaced."""
    replaced = 0
    if isinstance(node, dict):
        vm = node.get("vm_config")
        local = vm.get("code", {}).get("local", {}) if isinstance(vm, dict) else {}
        if str(local.get("filename", "")).endswith("sluice.wasm"):
            vm["code"] = json.loads(json.dumps(code))
            if nack_on_cache_miss:
                vm["nack_on_code_cache_miss"] = True
            replaced += 1
        for value in node.values():
            replaced += use_remote_code(value, code, nack_on_cache_miss)
    elif isinstance(node, list):
        for value in node:
            replaced += use_remote_code(value, code, nack_on_cache_miss)
    return replaced


def remote_stat(envoy: Envoy, name: str) -> int:
    """A counter of Envoy's wasm remote code loads: ``wasm.remote_load_<name>``."""
    return envoy.stats("wasm.remote_load").get(f"wasm.remote_load_{name}", 0)


def ask(base_url: str, tenant: str = "acme") -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=10.0, trust_env=False,
                      headers={"x-tenant-id": tenant},
                      json={"model": "sim-large", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hello"}]})


def test_envoy_loads_sluice_from_the_registry_blob_url(registry, pushed, lab_factory):
    layer = pushed.report["wasm-layer"]
    sha256 = pushed.report["module-sha256"]
    fetched_before = registry.fetches_by_others(layer)

    def from_registry(bootstrap: str) -> str:
        doc = yaml.safe_load(bootstrap)
        assert use_remote_code(doc, remote_code(registry, layer, sha256)) >= 1
        doc["static_resources"]["clusters"].append(registry_cluster(registry))
        return yaml.safe_dump(doc, sort_keys=False)

    lab = lab_factory(bootstrap_hook=from_registry)
    assert "sluice.wasm" not in lab.bootstrap, "the module must come from the registry only"
    assert remote_stat(lab.envoy, "fetch_successes") >= 1
    wait_until(lambda: registry.fetches_by_others(layer) > fetched_before, 5.0,
               what="the registry's access log line of Envoy's blob fetch")

    answer = ask(lab.base_url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"], answer.text
    # sluice acted: its token quota for acme (policies/lab.toml: 20k/min).
    assert answer.headers.get("x-ratelimit-limit-tokens") == "20000", dict(answer.headers)


RELOAD_POLICY = """
name = "oci-{version}"

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

  [[tokens.quota]]
  tokens = "{limit}/min"
"""


def listener_from_registry(tmp: Path, sim: LlmSim, port: int, version: int, limit: int,
                           code: dict, nack_on_cache_miss: bool) -> tuple[dict, dict]:
    """(bootstrap without listeners, the listener), sluice's code from the registry."""
    policy = tmp / f"policy-{version}.toml"
    policy.write_text(RELOAD_POLICY.format(version=version, limit=limit))
    doc = yaml.safe_load(render_envoy(policy, endpoints={("primary", "zone-a"): [sim.listen]},
                                      listen=f"127.0.0.1:{port}"))
    listener = doc["static_resources"].pop("listeners")[0]
    assert use_remote_code(listener, code, nack_on_cache_miss) >= 1
    return doc, listener


def write_lds(path: Path, listener: dict) -> None:
    """Replaces the LDS file atomically (write aside, then rename), as Envoy expects."""
    resource = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}
    aside = path.with_suffix(".tmp")
    aside.write_text(yaml.safe_dump({"resources": [resource]}, sort_keys=False))
    os.replace(aside, path)


def lds_stat(envoy: Envoy, name: str) -> int:
    return envoy.stats("listener_manager.lds").get(f"listener_manager.lds.{name}", 0)


@dataclass
class LdsLab:
    """Envoy whose one listener comes from an LDS file, sluice's code from the registry."""

    envoy: Envoy
    sim: LlmSim
    port: int
    lds: Path
    tmp: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, version: int, limit: int, code: dict, nack_on_cache_miss: bool) -> None:
        """A listener update, as a control plane would push it."""
        _, listener = listener_from_registry(self.tmp, self.sim, self.port, version, limit,
                                             code, nack_on_cache_miss)
        write_lds(self.lds, listener)


@contextmanager
def lds_lab(registry: Registry, pushed: Packaged, tmp_path: Path):
    """Serving a first listener whose sluice (5000 tokens/min) came from the registry."""
    good = remote_code(registry, pushed.report["wasm-layer"], pushed.report["module-sha256"])
    run_dir = tmp_path / "run"
    xds = tmp_path / "xds"
    xds.mkdir()
    lds = xds / "lds.yaml"
    port = free_port()
    with LlmSim(zone="zone-a", models=["sim-large"], instance="oci", run_dir=run_dir) as sim:
        bootstrap, listener = listener_from_registry(tmp_path, sim, port, 1, 5000, good,
                                                     nack_on_cache_miss=False)
        write_lds(lds, listener)
        bootstrap["static_resources"]["clusters"].append(registry_cluster(registry))
        bootstrap["dynamic_resources"] = {"lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": str(lds), "watched_directory": {"path": str(xds)}},
        }}
        with Envoy(yaml.safe_dump(bootstrap, sort_keys=False), run_dir) as envoy:
            lab = LdsLab(envoy, sim, port, lds, tmp_path)
            wait_until(lambda: lds_stat(envoy, "update_success") >= 1, 15.0,
                       what="the first listener from LDS")
            wait_until(lambda: ask(lab.base_url).status_code == 200, 15.0,
                       what="the listener with sluice from the registry to serve")
            first = ask(lab.base_url)
            assert first.headers.get("x-ratelimit-limit-tokens") == "5000", dict(first.headers)
            yield lab


def wrong_code(registry: Registry, pushed: Packaged, **remote: object) -> dict:
    """The right URL with the sha256 of something else: a stale or tampered reference."""
    code = remote_code(registry, pushed.report["wasm-layer"], sha256_hex(b"not sluice.wasm"))
    code["remote"].update(remote)
    return code


def test_a_wrong_sha256_is_refused_and_the_previous_config_keeps_serving(
        registry, pushed, tmp_path):
    with lds_lab(registry, pushed, tmp_path) as lab:
        envoy = lab.envoy
        rejected = lds_stat(envoy, "update_rejected")
        failures = remote_stat(envoy, "fetch_failures")
        # A policy that would show if it had been taken: 9000 tokens.
        lab.push(2, 9000, wrong_code(registry, pushed), nack_on_cache_miss=True)
        wait_until(lambda: lds_stat(envoy, "update_rejected") > rejected, 15.0,
                   what="Envoy to reject the listener with the wrong sha256")
        envoy.wait_for_log("config rejected: Unable to create Wasm plugin sluice")
        # The background fetch got the module and found it did not match.
        wait_until(lambda: remote_stat(envoy, "fetch_failures") > failures, 15.0,
                   what="the failed fetch of the mismatching module")

        # Traffic still flows through the previous listener, sluice acting.
        for _ in range(3):
            again = ask(lab.base_url)
            assert again.status_code == 200, again.text
            assert again.headers.get("x-ratelimit-limit-tokens") == "5000"


def test_without_nack_a_wrong_sha256_replaces_the_listener_with_a_failed_plugin(
        registry, pushed, tmp_path):
    """Why the update above sets ``nack_on_code_cache_miss``: by default Envoy
    accepts the listener, waits for the fetch, and puts it in service with a
    plugin that failed to load: every request fails closed (503 under the
    render's ``FAIL_RELOAD``, since there is no VM to reload)."""
    with lds_lab(registry, pushed, tmp_path) as lab:
        envoy = lab.envoy
        accepted = lds_stat(envoy, "update_success")
        failures = remote_stat(envoy, "fetch_failures")
        # No retry: the verdict comes with the first fetch.
        lab.push(2, 9000, wrong_code(registry, pushed, retry_policy={"num_retries": 0}),
                 nack_on_cache_miss=False)
        wait_until(lambda: lds_stat(envoy, "update_success") > accepted, 15.0,
                   what="Envoy to accept the listener")
        wait_until(lambda: remote_stat(envoy, "fetch_failures") > failures, 15.0,
                   what="the failed fetch of the mismatching module")
        envoy.wait_for_log("Plugin configured to fail closed failed to load")
        [answer] = wait_until(lambda: [r for r in [ask(lab.base_url)] if r.status_code != 200],
                              15.0, what="the new listener to take over")
        assert answer.status_code == 503, answer.text
        assert "x-ratelimit-limit-tokens" not in answer.headers
