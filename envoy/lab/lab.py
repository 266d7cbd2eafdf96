"""A whole lab: one llm-sim per endpoint of a policy, and Envoy in front.

::

    with Lab("my-scenario") as lab:            # policies/lab.toml by default
        lab.sims["primary", "zone-a"].set_faults(error_rate=0.5)
        httpx.get(f"{lab.base_url}/v1/models")

Each ``[[backend.zone]]`` gets as many simulators as it lists ``endpoints``
(one for a zone that lists none), and Envoy is rendered with all their
addresses, so outlier detection has several hosts of a zone to tell apart.
``lab.sims[backend, zone]`` and ``lab.sim(backend, zone)`` are the zone's
first; ``lab.endpoint_sims(backend, zone)`` is all of them, in the policy's
order. A zone's only simulator is named ``BACKEND-ZONE``; several are
``BACKEND-ZONE-0``, ``BACKEND-ZONE-1``… (the ``x-llm-sim-instance`` header).

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
                 seed: int = 0, keep_logs: bool = False, concurrency: int = 2,
                 render_args: tuple[str, ...] = ()):
        """``sim_args[backend, zone]`` goes to every simulator of that zone;
        simulators are seeded ``seed``, ``seed + 1``… in the policy's order."""
        self.name = paths.safe_name(name)
        self.policy = Path(policy)
        self.run_dir = paths.LOGS_DIR / self.name
        self.bootstrap_hook = bootstrap_hook
        self.sim_args = sim_args or {}
        self.seed = seed
        self.keep_logs = keep_logs
        self.concurrency = concurrency
        self.render_args = render_args
        self.zones: list[BackendZone] = []
        self.sims: dict[tuple[str, str], LlmSim] = {}
        self._zone_sims: dict[tuple[str, str], list[LlmSim]] = {}
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
            seed = self.seed
            for bz in self.zones:
                key = (bz.backend, bz.zone)
                count = max(1, len(bz.endpoints))
                sims = self._zone_sims.setdefault(key, [])
                for j in range(count):
                    instance = f"{bz.backend}-{bz.zone}" + (f"-{j}" if count > 1 else "")
                    sims.append(LlmSim(
                        zone=bz.zone, models=list(bz.models) or ["sim-model"],
                        instance=instance, run_dir=self.run_dir,
                        seed=seed, extra_args=self.sim_args.get(key)))
                    seed += 1
                self.sims[key] = sims[0]
            endpoints = {key: [sim.listen for sim in sims]
                         for key, sims in self._zone_sims.items()}
            bootstrap = render_envoy(self.policy, endpoints=endpoints, extra=self.render_args)
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
            for sim in self.all_sims():
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
        """The zone's first simulator (its only one, in most policies)."""
        return self.sims[backend, zone]

    def endpoint_sims(self, backend: str, zone: str) -> list[LlmSim]:
        """Every simulator of the zone, one per endpoint, in the policy's order."""
        return list(self._zone_sims[backend, zone])

    def all_sims(self) -> list[LlmSim]:
        """Every simulator of the lab, zone by zone."""
        return [sim for sims in self._zone_sims.values() for sim in sims]

    def models(self, backend: str) -> list[str]:
        for bz in self.zones:
            if bz.backend == backend:
                return list(bz.models)
        raise KeyError(backend)
