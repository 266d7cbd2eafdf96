"""A whole lab: one llm-sim per backend zone of a policy, and Envoy in front.

::

    with Lab("my-scenario") as lab:            # policies/lab.toml by default
        lab.sims["primary", "zone-a"].set_faults(error_rate=0.5)
        httpx.get(f"{lab.base_url}/v1/models")

Everything a lab writes goes to ``target/lab-logs/<name>/`` (Envoy's log,
bootstrap, each process's stdout/stderr). When the lab is stopped because of
a failure, Envoy's ``/stats``, ``/clusters`` and ``/config_dump`` are saved
there first and the folder is kept; after a success it is removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from . import paths
from .envoyproc import Envoy
from .llmsim import LlmSim
from .render import BackendZone, policy_zones, render_envoy

BootstrapHook = Callable[[str], str]


class Lab:
    """llm-sim upstreams + an Envoy rendered from ``policy`` by ``sluice``."""

    def __init__(self, name: str, policy: Path = paths.LAB_POLICY, *,
                 bootstrap_hook: BootstrapHook | None = None,
                 sim_args: dict[tuple[str, str], list[str]] | None = None,
                 seed: int = 0, keep_logs: bool = False, concurrency: int = 2):
        self.name = paths.safe_name(name)
        self.policy = Path(policy)
        self.run_dir = paths.LOGS_DIR / self.name
        self.bootstrap_hook = bootstrap_hook
        self.sim_args = sim_args or {}
        self.seed = seed
        self.keep_logs = keep_logs
        self.concurrency = concurrency
        self.zones: list[BackendZone] = []
        self.sims: dict[tuple[str, str], LlmSim] = {}
        self.envoy: Envoy | None = None
        self.bootstrap: str = ""

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "Lab":
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        try:
            self.zones = policy_zones(self.policy)
            if not self.zones:
                raise ValueError(f"{self.policy} declares no backend zone")
            for i, bz in enumerate(self.zones):
                key = (bz.backend, bz.zone)
                self.sims[key] = LlmSim(
                    zone=bz.zone, models=list(bz.models) or ["sim-model"],
                    instance=f"{bz.backend}-{bz.zone}", run_dir=self.run_dir,
                    seed=self.seed + i, extra_args=self.sim_args.get(key))
            endpoints = {key: [sim.listen] for key, sim in self.sims.items()}
            bootstrap = render_envoy(self.policy, endpoints=endpoints)
            if self.bootstrap_hook is not None:
                bootstrap = self.bootstrap_hook(bootstrap)
            self.bootstrap = bootstrap
            self.envoy = Envoy(bootstrap, self.run_dir, concurrency=self.concurrency)
        except BaseException:
            self.stop(failed=True)
            raise
        return self

    def stop(self, failed: bool = False) -> None:
        """Stops Envoy then the simulators; keeps the logs if ``failed``."""
        try:
            if self.envoy is not None:
                if failed:
                    self.envoy.dump_state(self.run_dir)
                self.envoy.stop()
        finally:
            for sim in self.sims.values():
                sim.stop()
        if failed or self.keep_logs:
            (self.run_dir / "README.txt").write_text(
                f"lab {self.name}: policy {self.policy}\n"
                "envoy.log, envoy-bootstrap.yaml, stats.txt, clusters.txt, config_dump.json,\n"
                "and each llm-sim's stdout/stderr.\n")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(failed=exc_type is not None)

    # -- access ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Envoy's listener, ``http://127.0.0.1:PORT``."""
        assert self.envoy is not None, "lab not started"
        return self.envoy.base_url

    def sim(self, backend: str, zone: str) -> LlmSim:
        return self.sims[backend, zone]

    def models(self, backend: str) -> list[str]:
        for bz in self.zones:
            if bz.backend == backend:
                return list(bz.models)
        raise KeyError(backend)
