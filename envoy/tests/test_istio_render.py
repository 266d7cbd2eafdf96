"""What ``sluice render istio`` writes, run by the real Envoy 1.40.

There is no Kubernetes here, so istiod and the Istio agent are played by
this test, doing only what they are documented to do with the rendered
resources, and the rest is Envoy's:

- istiod builds a sidecar's outbound cluster per ServiceEntry host and port
  (``outbound|PORT||HOST``: its endpoints with their localities, least
  request and the retry limit from the DestinationRule, HTTP/1.1 options)
  and a listener on the port whose HTTP connection manager ends in the
  router; then it applies the EnvoyFilter: the HTTP filter inserted before
  the router, each cluster patch MERGEd into its cluster (a map entry such
  as ``typed_extension_protocol_options``' is replaced whole, as protobuf
  merging does), and the extension configurations served over ECDS;
- the agent turns each remote Wasm code source into a local file after
  checking its ``sha256`` (here an ``http`` URL, whose digest is the
  module's: the file is the module the render was given, and the test
  checks they agree).

ECDS is real: Envoy fetches ``sluice`` and ``sluice.attempt`` from a
filesystem config source in place of ADS, for the listener filter and for
the clusters' upstream filters alike. Requests then go through the
gateway policy's sluice: endpoints picked by ``override_host``, attempts
seen by the upstream filter, quotas answered.
"""

from __future__ import annotations

import copy
import hashlib
import tomllib
from pathlib import Path
from typing import Any

import httpx
import yaml

from lab import paths
from lab.render import sluice

GATEWAY = paths.POLICIES_DIR / "gateway.toml"
WASM = paths.WASM_DIR / "sluice.wasm"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster_backends(policy: Path) -> dict[tuple[str, str], str]:
    """(policy cluster, zone) → backend."""
    doc = tomllib.loads(policy.read_text())
    return {(z.get("cluster", b["name"]), z["name"]): b["name"]
            for b in doc["backend"] for z in b["zone"]}


def render_istio(bootstrap: dict[str, Any], policy: Path) -> list[dict[str, Any]]:
    """``sluice render istio`` with the lab's endpoints (read from the
    Envoy render the lab made), the module's digest from the file."""
    owners = cluster_backends(policy)
    args = ["render", "istio", str(policy), "--url", "http://127.0.0.1:9/sluice.wasm",
            "--wasm", str(WASM), "--namespace", "lab"]
    for cluster in bootstrap["static_resources"]["clusters"]:
        for locality in cluster["load_assignment"]["endpoints"]:
            zone = locality["locality"]["zone"]
            addrs = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
            spec = ",".join(f"{a['address']}:{a['port_value']}" for a in addrs)
            args += ["--endpoints", f"{owners[cluster['name'], zone]}/{zone}={spec}"]
    done = sluice(*args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Protobuf-style MERGE of a patch value: messages merge field by
    field, lists append, map entries and ``Any`` values are replaced."""
    for key, value in patch.items():
        if key == "typed_extension_protocol_options":
            target.setdefault(key, {}).update(copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key].extend(copy.deepcopy(value))
        else:
            target[key] = copy.deepcopy(value)


def agent_local_code(typed_config: dict[str, Any]) -> dict[str, Any]:
    """The agent's step: the remote module, fetched and checked, as a file."""
    config = copy.deepcopy(typed_config)
    code = config["config"]["vm_config"]["code"]
    remote = code.pop("remote")
    assert remote["sha256"] == hashlib.sha256(WASM.read_bytes()).hexdigest(), \
        "the rendered sha256 is not the module's"
    code["local"] = {"filename": str(WASM)}
    return config


def from_ecds_file(value: dict[str, Any], ecds: Path) -> dict[str, Any]:
    """A rendered ``config_discovery`` filter, fetched from a file instead
    of ADS (the same ECDS protocol and resources)."""
    value = copy.deepcopy(value)
    source = value["config_discovery"]["config_source"]
    source.pop("ads")
    source["path_config_source"] = {"path": str(ecds / f"{value['name']}.yaml")}
    return value


def sidecar(bootstrap: dict[str, Any], docs: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """What a sidecar would run: istiod's clusters and listener for the
    rendered ServiceEntries and DestinationRules, with the EnvoyFilter
    applied and its extension configurations served from a file."""
    entries = [d for d in docs if d["kind"] == "ServiceEntry"]
    rules = {d["spec"]["host"]: d for d in docs if d["kind"] == "DestinationRule"}
    (envoy_filter,) = [d for d in docs if d["kind"] == "EnvoyFilter"]
    patches = envoy_filter["spec"]["configPatches"]

    clusters, renamed = [], {}
    for entry in entries:
        host, port = entry["spec"]["hosts"][0], entry["spec"]["ports"][0]
        name = f"outbound|{port['number']}||{host}"
        renamed[entry["metadata"]["name"].removeprefix("sluice-")] = name
        localities: dict[str, list] = {}
        for ep in entry["spec"]["endpoints"]:
            localities.setdefault(ep["locality"], []).append({"endpoint": {"address": {
                "socket_address": {"address": ep["address"],
                                   "port_value": ep["ports"][port["name"]]}}}})
        policy = rules[host]["spec"]["trafficPolicy"]
        assert policy["loadBalancer"]["localityLbSetting"] == {"enabled": False}
        cluster = {
            "name": name, "type": "STATIC", "connect_timeout": "10s",
            "lb_policy": policy["loadBalancer"]["simple"],
            "circuit_breakers": {"thresholds": [{
                "max_retries": policy["connectionPool"]["http"]["maxRetries"]}]},
            "typed_extension_protocol_options": {PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
                "explicit_http_config": {"http_protocol_options": {}},
            }},
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"locality": {"region": loc.split("/")[0], "zone": loc.split("/")[1]},
                 "lb_endpoints": eps} for loc, eps in localities.items()]},
        }
        for p in patches:
            m = p.get("match", {}).get("cluster")
            if p["applyTo"] == "CLUSTER" and m and m["service"] == host \
                    and m["portNumber"] == port["number"]:
                assert p["patch"]["operation"] == "MERGE"
                merge(cluster, p["patch"]["value"])
        clusters.append(cluster)

    # A file per extension configuration (Envoy's file-based ECDS takes
    # one resource per file; over ADS istiod sends each by name).
    ecds = run_dir / "ecds"
    ecds.mkdir()
    for p in patches:
        if p["applyTo"] == "EXTENSION_CONFIG":
            name = p["patch"]["value"]["name"]
            (ecds / f"{name}.yaml").write_text(yaml.safe_dump({"version_info": "1", "resources": [
                {"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                 "name": name,
                 "typed_config": agent_local_code(p["patch"]["value"]["typed_config"])}]}))
    for cluster in clusters:
        options = cluster["typed_extension_protocol_options"][PROTOCOL_OPTIONS]
        options["http_filters"] = [f if "config_discovery" not in f else from_ecds_file(f, ecds)
                                   for f in options.get("http_filters", [])]

    # The listener: the lab's address, an HTTP connection manager ending in
    # the router, routes to the outbound clusters; then the HTTP_FILTER patch.
    out = copy.deepcopy(bootstrap)
    listener = out["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            action = route.get("route", {})
            if "cluster" in action:
                action["cluster"] = renamed[action["cluster"]]
    # One insertion per LLM port (each its own listener in a sidecar; the
    # lab has one listener for all): the same filter on each.
    inserts = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert sorted(p["match"]["listener"]["portNumber"] for p in inserts) == \
        sorted({e["spec"]["ports"][0]["number"] for e in entries})
    assert all(p["patch"] == inserts[0]["patch"] for p in inserts)
    insert = inserts[0]
    assert insert["patch"]["operation"] == "INSERT_BEFORE"
    assert insert["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == \
        "envoy.filters.http.router"
    hcm["http_filters"].insert(0, from_ecds_file(insert["patch"]["value"], ecds))
    out["static_resources"]["clusters"] = clusters
    return out


def test_the_rendered_resources_run_sluice_in_envoy(lab_factory, tmp_path):
    made: dict[str, Any] = {}

    def as_sidecar(text: str) -> str:
        bootstrap = yaml.safe_load(text)
        docs = render_istio(bootstrap, GATEWAY)
        made["docs"] = docs
        return yaml.safe_dump(sidecar(bootstrap, docs, tmp_path))

    lab = lab_factory(policy=GATEWAY, bootstrap_hook=as_sidecar)
    served = []
    with httpx.Client(base_url=lab.base_url, timeout=30.0) as client:
        for i in range(12):
            r = client.post("/v1/chat/completions",
                            headers={"x-tenant-id": "acme"},
                            json={"model": "gpt-4o", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": f"hi {i}"}]})
            served.append(r)
    assert all(r.status_code == 200 for r in served), [(r.status_code, r.text[:200]) for r in served]
    # The listener filter (ECDS) acted: quota headers, endpoint and zone named.
    assert all("ratelimit-policy" in r.headers for r in served)
    picked = [r.headers.get("x-sluice-endpoint", "") for r in served]
    assert all("reason=p2c" in p or "reason=probe" in p for p in picked), picked
    assert any(p.split(";")[0] in {a for ep in made["docs"] if ep["kind"] == "ServiceEntry"
                                   for a in (f"{e['address']}:{e['ports']['http-llm']}"
                                             for e in ep["spec"]["endpoints"])}
               for p in picked), picked
    assert all(r.headers.get("x-sluice-zone", "").startswith("us-east-1") for r in served)
    # The upstream filter (ECDS too) saw every attempt.
    stats = lab.envoy.stats("sluice")
    assert stats.get("wasmcustom.sluice.attempts", 0) >= len(served), stats
    # Both extension configurations came over ECDS.
    ecds = lab.envoy.stats("extension_config_discovery")
    for kind, name in (("http_filter", "sluice"), ("upstream_http_filter", "sluice.attempt")):
        assert ecds.get(f"extension_config_discovery.{kind}.{name}.config_reload", 0) >= 1, ecds
