"""The three systems of the drills, each over four fresh llm-sims.

- ``sluice``: ``sluice render envoy`` of envoy/drills/policy.toml, Envoy in zone-a;
- ``native``: the same policy without ``[tokens]`` and ``[breaker]`` (Envoy
  has neither), rendered with ``--native-failover --native-retry``: Envoy's
  locality priorities, outlier detection, ``/health`` checks, route retries
  and retry budget; sluice.wasm is left routing by model only;
- ``litellm``: the LiteLLM proxy (envoy/lab/litellm.py), zone-a order 1.

Every process goes through the lab's registry (``lab.procs``): stopped when
the system is closed, on failure too, and killed with its parent.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from lab import litellm as litellm_lab
from lab import paths
from lab.envoyproc import Envoy
from lab.llmsim import LlmSim
from lab.procs import wait_until
from lab.render import render_envoy

from . import catalog

POLICY = paths.REPO_ROOT / "envoy" / "drills" / "policy.toml"
MODEL = "gpt-sim"
NODE_ZONE = ("--node-zone", "zone-a")


def native_policy_text(text: str) -> str:
    """The policy without ``[tokens]`` / ``[breaker]`` and their subtables
    (native Envoy has no equivalent to render them as)."""
    out, skipping = [], False
    for line in text.splitlines():
        header = re.match(r"\s*\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?\s*$", line)
        if header:
            top = header.group(1).split(".")[0]
            skipping = top in ("tokens", "breaker")
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def process_tree_cpu(root_pid: int) -> float:
    """utime + stime (and reaped children's) of a process and its descendants, in s."""
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
    ticks, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class System:
    """Four simulators and one proxy in front of them; close with :meth:`stop`."""

    def __init__(self, name: str, run_dir: Path, sim_args: list[str] | None = None):
        if name not in catalog.SYSTEMS:
            raise ValueError(f"unknown system {name!r}")
        self.name = name
        self.run_dir = run_dir
        self.sims: dict[str, LlmSim] = {}
        self.envoy: Envoy | None = None
        self.litellm: litellm_lab.LiteLLM | None = None
        self.api_key: str | None = None
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for seed, (instance, zone) in enumerate(catalog.SIMS, start=1):
                self.sims[instance] = LlmSim(zone=zone, models=[MODEL], instance=instance,
                                             run_dir=run_dir, seed=seed,
                                             extra_args=sim_args or catalog.SIM_ARGS)
            if name == "litellm":
                self._start_litellm()
            else:
                self._start_envoy()
        except BaseException:
            self.stop()
            raise

    def _endpoints(self) -> dict[tuple[str, str], list[str]]:
        out: dict[tuple[str, str], list[str]] = {}
        for instance, zone in catalog.SIMS:
            out.setdefault(("primary", zone), []).append(self.sims[instance].listen)
        return out

    def _start_envoy(self) -> None:
        text = POLICY.read_text()
        extra: tuple[str, ...] = NODE_ZONE
        if self.name == "native":
            text = native_policy_text(text)
            extra = ("--native-failover", "--native-retry", *NODE_ZONE)
        policy = self.run_dir / "policy.toml"
        policy.write_text(text)
        bootstrap = render_envoy(policy, endpoints=self._endpoints(), extra=extra)
        # Warnings only: debug logging would be work measured as the proxy's CPU.
        self.envoy = Envoy(bootstrap, self.run_dir, concurrency=2, log_level="warning",
                           component_log_level="wasm:warning")
        if self.name == "native":
            # A first health check can time out while the main thread is still
            # compiling sluice.wasm: start once every endpoint passed one.
            wait_until(lambda: "failed_active_hc" not in self.envoy.admin("/clusters").text,
                       15.0, interval=0.1, what="every endpoint healthy")

    def _start_litellm(self) -> None:
        endpoints = [(zone, self.sims[instance].base_url) for instance, zone in catalog.SIMS]
        self.litellm = litellm_lab.LiteLLM(None, self.run_dir, endpoints=endpoints)
        self.api_key = self.litellm.api_key

    @property
    def base_url(self) -> str:
        if self.litellm is not None:
            return self.litellm.base_url
        assert self.envoy is not None
        return self.envoy.base_url

    @property
    def model(self) -> str:
        return litellm_lab.MODEL if self.litellm is not None else MODEL

    def proxy_pid(self) -> int:
        if self.litellm is not None:
            return self.litellm.proc.pid
        assert self.envoy is not None
        return self.envoy.proc.pid

    def proxy_cpu(self) -> float:
        return process_tree_cpu(self.proxy_pid())

    def sim_stats(self) -> dict[str, dict]:
        return {instance: sim.stats() for instance, sim in self.sims.items()}

    def warm_up(self) -> None:
        """A few requests so that connection pools and lazy imports are not
        the drill's first seconds (LiteLLM's first request is slow)."""
        import httpx
        headers = {"x-tenant-id": "warmup"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "max_tokens": 4,
                "messages": [{"role": "user", "content": "warm up"}]}
        with httpx.Client(base_url=self.base_url, timeout=15.0, trust_env=False) as c:
            for _ in range(4):
                c.post("/v1/chat/completions", json=body, headers=headers)
        time.sleep(0.2)

    def stop(self) -> None:
        try:
            if self.envoy is not None:
                self.envoy.stop()
            if self.litellm is not None:
                self.litellm.stop()
        finally:
            for sim in self.sims.values():
                sim.stop()
