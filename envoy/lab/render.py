"""Envoy bootstraps from policies, through the sluice CLI.

The lab never keeps a hand-written copy of a policy's Envoy config: it runs
``sluice render envoy``, pointing each backend zone at the llm-sim ports
chosen at run time with ``--endpoints BACKEND/ZONE=HOST:PORT``. Test variants
may add a filter to the rendered chain (:func:`add_wasm_filter`, used for the
conformance probe).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import paths


@dataclass(frozen=True)
class BackendZone:
    """One locality of a backend, as a policy declares it."""

    backend: str
    zone: str
    models: tuple[str, ...]
    #: The zone's ``endpoints`` as written (placeholders the lab replaces;
    #: empty for a zone that names a ``cluster``).
    endpoints: tuple[str, ...] = ()


def policy_zones(policy: Path) -> list[BackendZone]:
    """Every ``[[backend]]`` × ``[[backend.zone]]`` of a policy file.

    Only the names, models and endpoints are read here; the policy crate
    validates the rest (``sluice validate``).
    """
    doc = tomllib.loads(policy.read_text())
    out = []
    for backend in doc.get("backend", []):
        models = tuple(backend.get("models", []))
        for zone in backend.get("zone", []):
            out.append(BackendZone(backend["name"], zone["name"], models,
                                   tuple(zone.get("endpoints", []))))
    return out


def sluice(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs the sluice CLI (``target/native/sluice``, or ``$SLUICE_CLI``)."""
    cli = os.environ.get("SLUICE_CLI") or str(paths.native_tool("sluice"))
    return subprocess.run(
        [cli, *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def render_envoy(policy: Path, *, wasm_dir: Path = paths.WASM_DIR,
                 endpoints: dict[tuple[str, str], Iterable[str]] | None = None,
                 listen: str = "127.0.0.1:0", admin: str = "127.0.0.1:0",
                 extra: Iterable[str] = ()) -> str:
    """``sluice render envoy POLICY`` with run-time endpoints (and ``extra``
    arguments, e.g. ``--native-outlier``); the YAML text."""
    args = ["render", "envoy", str(policy), "--wasm-dir", str(wasm_dir),
            "--listen", listen, "--admin", admin, *extra]
    for (backend, zone), hosts in sorted((endpoints or {}).items()):
        args += ["--endpoints", f"{backend}/{zone}={','.join(hosts)}"]
    done = sluice(*args)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"`sluice {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def wasm_filter(name: str, wasm: Path, configuration: str = "",
                failure_policy: str = "FAIL_CLOSED") -> dict[str, Any]:
    """An ``envoy.filters.http.wasm`` entry running ``wasm`` in V8."""
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "failure_policy": failure_policy,
            },
        },
    }


def _http_connection_managers(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        typed = node.get("typed_config")
        if (node.get("name") == "envoy.filters.network.http_connection_manager"
                and isinstance(typed, dict)):
            yield typed
        for value in node.values():
            yield from _http_connection_managers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _http_connection_managers(value)


def add_wasm_filter(bootstrap: str, name: str, wasm: Path, configuration: str = "",
                    position: str = "first") -> str:
    """Adds a wasm filter to every HTTP connection manager of a bootstrap.

    ``position`` is ``"first"`` (before the first wasm filter: sees the
    request before sluice's filters, after Envoy's own filters such as the
    compressor, so a probe that replaces response bodies is compressed as
    any answer is) or ``"last"`` (just before the router).
    """
    doc = yaml.safe_load(bootstrap)
    managers = list(_http_connection_managers(doc))
    if not managers:
        raise ValueError("the bootstrap has no http_connection_manager")
    for hcm in managers:
        filters = hcm.setdefault("http_filters", [])
        entry = wasm_filter(name, wasm, configuration)
        if position == "first":
            first_wasm = next((i for i, f in enumerate(filters)
                               if "wasm" in str(f.get("typed_config", {}).get("@type", ""))),
                              0)
            filters.insert(first_wasm, entry)
        else:
            router = next((i for i, f in enumerate(filters)
                           if f.get("name") == "envoy.filters.http.router"), len(filters))
            filters.insert(router, entry)
    return yaml.safe_dump(doc, sort_keys=False)


def to_json(bootstrap: str) -> str:
    """The bootstrap as JSON (handy for assertions and diffs)."""
    return json.dumps(yaml.safe_load(bootstrap), indent=2)
