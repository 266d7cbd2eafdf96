"""The LiteLLM proxy as a lab process, the third system of the side-by-side drills.

``LiteLLM(config, run_dir, endpoints=[(zone, base_url), ...])`` renders the
proxy's config (``envoy/drills/litellm.yaml`` plus one deployment per llm-sim
endpoint), starts ``target/litellm-venv/bin/litellm`` through the lab's
process registry (own session, parent-death signal, stopped on failure too),
and waits until it answers. Install the venv with ``cargo xtask litellm-venv``.

Only 127.0.0.1 is ever contacted: LiteLLM's fetches of remote data (model
cost map, blog posts, beta-header and preset lists) are turned off or pointed
at a closed local port, and telemetry stays off (see ``_offline_env``).
"""

from __future__ import annotations

import copy
import os
import secrets
import socket
from pathlib import Path
from typing import Sequence

import httpx
import yaml

from . import paths
from .procs import ManagedProcess, wait_until

# Made by `cargo xtask litellm-venv` in the target dir; SLUICE_LITELLM_VENV overrides.
LITELLM_VENV = Path(os.environ.get("SLUICE_LITELLM_VENV") or paths.TARGET_DIR / "litellm-venv")
LITELLM_BIN = LITELLM_VENV / "bin" / "litellm"
DEFAULT_CONFIG = paths.REPO_ROOT / "envoy" / "drills" / "litellm.yaml"
# The order of each zone: zone-a is served first, zone-b on fallback.
ZONE_ORDER = {"zone-a": 1, "zone-b": 2}
MODEL = "gpt-sim"
# A local port nothing listens on: a URL LiteLLM would fetch fails at once, here.
_CLOSED = "http://127.0.0.1:9"


def installed() -> bool:
    return LITELLM_BIN.is_file()


def _offline_env() -> dict[str, str]:
    """Environment that keeps LiteLLM off the network and off stray files."""
    return {
        # Read the model cost map, beta headers, presets... from the wheel.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOCAL_BLOG_POSTS": "True",
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
        "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
        # Belt and braces: were any of them fetched, it would be from here.
        "LITELLM_MODEL_COST_MAP_URL": f"{_CLOSED}/model_cost_map.json",
        "LITELLM_BLOG_POSTS_URL": f"{_CLOSED}/rss.xml",
        "LITELLM_ANTHROPIC_BETA_HEADERS_URL": f"{_CLOSED}/beta.json",
        "LITELLM_AUTOROUTER_PRESETS_URL": f"{_CLOSED}/presets.json",
        # PRODUCTION: no .env file is loaded from the working directory or above.
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOG": "ERROR",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_SCHEMA_UPDATE": "true",
        "NO_PROXY": "*",
        "PYTHONUNBUFFERED": "1",
    }


# Unset for the proxy (`env -u`): a database URL, even empty, makes LiteLLM
# want Postgres; proxy variables would route its calls elsewhere.
_UNSET = ("DATABASE_URL", "DIRECT_URL", "DATABASE_HOST", "REDIS_HOST", "REDIS_URL",
          "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def render_config(endpoints: Sequence[tuple[str, str]], base: Path = DEFAULT_CONFIG,
                  model: str = MODEL) -> dict:
    """The proxy config: ``base`` plus one deployment per (zone, base_url)."""
    config = yaml.safe_load(base.read_text())
    router = config.setdefault("router_settings", {})
    timeout = router.get("timeout", 10)
    model_list = []
    for index, (zone, base_url) in enumerate(endpoints):
        if zone not in ZONE_ORDER:
            raise ValueError(f"unknown zone {zone!r}: expected one of {sorted(ZONE_ORDER)}")
        model_list.append({
            "model_name": model,
            "litellm_params": {
                # The OpenAI-compatible provider: the request goes to api_base as is.
                "model": f"openai/{model}",
                "api_base": f"{base_url.rstrip('/')}/v1",
                "api_key": "sk-sim",
                "order": ZONE_ORDER[zone],
                "timeout": timeout,
                "stream_timeout": timeout,
                "max_retries": 0,
            },
            "model_info": {"id": f"{zone}-{index}"},
        })
    config["model_list"] = model_list
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiteLLM:
    """One LiteLLM proxy over the given llm-sim endpoints, on 127.0.0.1."""

    def __init__(self, config: Path | dict | None, run_dir: Path,
                 endpoints: Sequence[tuple[str, str]] = (), port: int = 0,
                 workers: int = 1, ready_timeout: float = 90.0):
        if not installed():
            raise FileNotFoundError(
                f"{LITELLM_BIN} is missing: run `cargo xtask litellm-venv` first")
        run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, dict):
            rendered = copy.deepcopy(config)
        else:
            rendered = render_config(endpoints, base=config or DEFAULT_CONFIG)
        self.config = rendered
        self.config_path = run_dir / "litellm.yaml"
        self.config_path.write_text(yaml.safe_dump(rendered, sort_keys=False))
        # LiteLLM binds the port itself and does not report it: pick a free one.
        self.port = port or _free_port()
        unset = [arg for name in _UNSET for arg in ("-u", name)]
        argv = [
            "/usr/bin/env", *unset, LITELLM_BIN,
            "--config", self.config_path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--num_workers", str(workers),
        ]
        # The proxy refuses to start without a master key (or with a weak one):
        # a fresh strong one per run; clients send it as their API key.
        self.api_key = f"sk-{secrets.token_hex(32)}"
        env = _offline_env()
        env["LITELLM_MASTER_KEY"] = self.api_key
        self.proc = ManagedProcess("litellm", argv, run_dir, env=env)
        try:
            wait_until(self._ready, ready_timeout, interval=0.2,
                       what=f"LiteLLM on port {self.port} to be ready")
        except BaseException:
            self.proc.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"LiteLLM died before it was ready: {self.proc.describe_exit()}")
        try:
            # Liveliness answers once the app serves; readiness also reports the
            # (absent) database and cache. Both need no upstream call.
            response = httpx.get(f"{self.base_url}/health/readiness", timeout=2.0,
                                 trust_env=False)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def pids(self) -> list[int]:
        """The proxy's process and all its descendants (workers), alive now."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, ()))
        return found

    def cpu_seconds(self) -> float:
        """utime + stime of the proxy's process tree, in seconds.

        Counts the live processes (their own time plus that of children they
        reaped: cutime/cstime), so a worker that exited and was reaped still
        counts through its parent.
        """
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone since pids() listed it
            # After the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += sum(int(f) for f in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> "LiteLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
