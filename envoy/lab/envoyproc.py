"""A real Envoy 1.40 as a child process.

The bootstrap binds the admin and the listener on port 0; Envoy writes the
admin address to ``--admin-address-path`` and the listener's bound port is
read from ``/listeners?format=json``, so nothing races for a port. Hot
restart is disabled (``--disable-hot-restart``): no shared-memory region, so
parallel Envoys never clash on a base id and a killed Envoy leaves nothing in
``/dev/shm``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from . import paths
from .procs import ManagedProcess, wait_until


def validate(bootstrap: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs ``envoy --mode validate -c FILE`` (the real binary's config check)."""
    return subprocess.run(
        [str(paths.envoy_binary()), "--mode", "validate", "-c", str(bootstrap),
         "--disable-hot-restart", "-l", "warning"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


class Envoy:
    """Envoy started from ``bootstrap`` (YAML text); ready once constructed."""

    def __init__(self, bootstrap: str, run_dir: Path, *, name: str = "envoy",
                 concurrency: int = 2, log_level: str = "info",
                 component_log_level: str = "wasm:debug",
                 ready_timeout: float = 30.0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.bootstrap_path = run_dir / f"{name}-bootstrap.yaml"
        self.bootstrap_path.write_text(bootstrap)
        self.log_path = run_dir / f"{name}.log"
        self._admin_path = run_dir / f"{name}-admin-address.txt"
        self._admin_path.unlink(missing_ok=True)
        argv = [
            paths.envoy_binary(),
            "-c", self.bootstrap_path,
            "--concurrency", str(concurrency),
            "--disable-hot-restart",
            "--admin-address-path", self._admin_path,
            "--log-path", self.log_path,
            # The log file is flushed on this period (default 10 s): keep it
            # short so a test can read what Envoy just logged.
            "--file-flush-interval-msec", "100",
            "-l", log_level,
            "--component-log-level", component_log_level,
        ]
        self.proc = ManagedProcess(name, argv, run_dir)
        self._admin: httpx.Client | None = None
        try:
            admin = wait_until(self._admin_address, ready_timeout, what="Envoy admin address")
            self._admin = httpx.Client(base_url=f"http://{admin}", timeout=5.0, trust_env=False)
            wait_until(self._ready, ready_timeout, interval=0.1, what="Envoy /ready")
            self.listeners = self._listener_addresses()
        except BaseException:
            self.stop()
            raise

    def _check_alive(self) -> None:
        if not self.proc.alive():
            log = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:]) \
                if self.log_path.exists() else ""
            raise RuntimeError(f"Envoy exited: {self.proc.describe_exit()}\nlog tail:\n{log}")

    def _admin_address(self) -> str | None:
        self._check_alive()
        try:
            text = self._admin_path.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def _ready(self) -> bool:
        self._check_alive()
        assert self._admin is not None
        try:
            return self._admin.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _listener_addresses(self) -> dict[str, str]:
        assert self._admin is not None
        data = self._admin.get("/listeners", params={"format": "json"}).json()
        out = {}
        for status in data.get("listener_statuses", []):
            sock = status["local_address"]["socket_address"]
            out[status["name"]] = f"{sock['address']}:{sock['port_value']}"
        return out

    @property
    def admin_url(self) -> str:
        assert self._admin is not None
        return str(self._admin.base_url).rstrip("/")

    @property
    def address(self) -> str:
        """``host:port`` of the (first) listener."""
        if not self.listeners:
            raise RuntimeError("Envoy has no listener")
        return next(iter(self.listeners.values()))

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def admin(self, path: str, **params: Any) -> httpx.Response:
        assert self._admin is not None
        return self._admin.get(path, params=params)

    def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges from ``/stats`` as ``{name: value}``."""
        params = {"filter": filter} if filter else {}
        text = self.admin("/stats", **params).text
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """Waits until Envoy's log contains ``text``; returns the log."""
        def found() -> str | None:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            return log if text in log else None

        return wait_until(found, timeout, interval=0.1, what=f"{text!r} in Envoy's log")

    def dump_state(self, into: Path) -> None:
        """Saves ``/stats``, ``/clusters`` and ``/config_dump`` (best effort)."""
        if self._admin is None or not self.proc.alive():
            return
        into.mkdir(parents=True, exist_ok=True)
        for path, file in (("/stats", "stats.txt"), ("/clusters", "clusters.txt"),
                           ("/config_dump", "config_dump.json"), ("/listeners", "listeners.txt")):
            try:
                (into / file).write_text(self.admin(path).text)
            except httpx.HTTPError as err:
                (into / file).write_text(f"could not read {path}: {err}\n")

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self.proc.stop(timeout=10.0)

    def __enter__(self) -> "Envoy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
