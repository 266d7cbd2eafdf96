"""An ``llm-sim`` upstream as a child process.

llm-sim binds its ports itself (``--listen 127.0.0.1:0 --control 127.0.0.1:0``)
and prints one JSON line with the bound addresses when it is ready, so no
port is ever guessed. The control port changes faults at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from . import paths
from .procs import ManagedProcess, wait_until


class LlmSim:
    """One llm-sim instance: ``listen`` and ``control`` are ``host:port``."""

    def __init__(self, *, zone: str, models: list[str], instance: str, run_dir: Path,
                 seed: int = 0, extra_args: list[str] | None = None,
                 ready_timeout: float = 15.0):
        self.zone = zone
        self.models = list(models)
        self.instance = instance
        self.seed = seed
        argv = [
            paths.native_tool("llm-sim"),
            "--listen", "127.0.0.1:0",
            "--control", "127.0.0.1:0",
            "--zone", zone,
            "--models", ",".join(models),
            "--instance", instance,
            "--seed", str(seed),
            *(extra_args or []),
        ]
        self.proc = ManagedProcess(f"llm-sim-{instance}", argv, run_dir)
        try:
            ready = wait_until(self._readiness_line, ready_timeout,
                               what=f"llm-sim {instance} readiness line")
        except BaseException:
            self.proc.stop()
            raise
        self.listen: str = ready["listen"]
        self.control: str = ready["control"]
        self._client = httpx.Client(base_url=f"http://{self.control}", timeout=5.0, trust_env=False)

    def _readiness_line(self) -> dict[str, Any] | None:
        if not self.proc.alive():
            raise RuntimeError(f"llm-sim died before it was ready: {self.proc.describe_exit()}")
        text = self.proc.stdout_path.read_text(errors="replace")
        if "\n" not in text:
            return None
        line = text.split("\n", 1)[0]
        try:
            ready = json.loads(line)
        except json.JSONDecodeError as err:
            raise RuntimeError(f"llm-sim readiness line is not JSON: {line!r}") from err
        for key in ("listen", "control"):
            if key not in ready:
                raise RuntimeError(f"llm-sim readiness line lacks {key!r}: {line!r}")
        return ready

    @property
    def base_url(self) -> str:
        """The inference API, for talking to the simulator directly."""
        return f"http://{self.listen}"

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replaces the fault set (``set_faults()`` clears every fault).

        The keywords are the control port's JSON fields, passed through (see
        tools/llm-sim/README.md): ``error_rate=0.5``, ``fixed_status=429,
        retry_after_s=5``, ``blackhole=True`` (inference requests read and
        never answered; health and models still answer), ``dead=True``…
        An unknown field or a bad value raises ``httpx.HTTPStatusError`` (400).
        """
        response = self._client.post("/_sim/faults", json=faults)
        response.raise_for_status()
        return response.json() if response.content else {}

    def faults(self) -> dict[str, Any]:
        response = self._client.get("/_sim/faults")
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        response = self._client.get("/_sim/stats")
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self._client.close()
        self.proc.stop()

    def __enter__(self) -> "LlmSim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
