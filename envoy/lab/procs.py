"""Child processes the lab starts, and the guarantee that they all stop.

Every process is started in its own session (so a signal to its process group
reaches anything it forks), with ``PR_SET_PDEATHSIG`` so the kernel kills it if
the Python process dies without cleaning up (even on SIGKILL), and is recorded
in a registry that an ``atexit`` hook and SIGTERM/SIGHUP handlers empty. Each
child's environment carries ``SLUICE_LAB_RUN=<id of this Python process's run>``
so that :func:`survivors` can find leftovers, grandchildren included, by
reading ``/proc``.

Stopping is SIGTERM to the group, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Sequence

RUN_ENV = "SLUICE_LAB_RUN"
RUN_ID = os.environ.get("SLUICE_LAB_RUN_ID") or uuid.uuid4().hex[:12]

_PR_SET_PDEATHSIG = 1
_lock = threading.Lock()
_registry: list["ManagedProcess"] = []


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class ManagedProcess:
    """A child process with its log files; stop it with :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], run_dir: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.stdout_path = run_dir / f"{name}.stdout"
        self.stderr_path = run_dir / f"{name}.stderr"
        run_dir.mkdir(parents=True, exist_ok=True)
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env[RUN_ENV] = RUN_ID
        self._stdout: IO[bytes] = open(self.stdout_path, "wb")
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")
        with _lock:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=self._stderr,
                env=child_env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
            _registry.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe_exit(self) -> str:
        code = self.popen.poll()
        tail = tail_text(self.stderr_path, 20)
        state = "running" if code is None else f"exited with {code}"
        return f"{self.name} (pid {self.pid}) {state}; stderr tail:\n{tail}"

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL."""
        try:
            if self.alive():
                _signal_group(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(self.pid, signal.SIGKILL)
                    self.popen.wait(5)
            # Reap anything the child forked into its group, too.
            _signal_group(self.pid, signal.SIGKILL)
        finally:
            for f in (self._stdout, self._stderr):
                if not f.closed:
                    f.close()
            with _lock:
                if self in _registry:
                    _registry.remove(self)
        return self.popen.returncode

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail_text(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def stop_all() -> None:
    """Stops every process still registered (atexit, signals, session end)."""
    with _lock:
        procs = list(_registry)
    for proc in reversed(procs):
        proc.stop(timeout=3.0)


def survivors() -> list[tuple[int, str]]:
    """Processes (pid, command line) that carry this run's id, other than us."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if f"{RUN_ENV}={RUN_ID}".encode() not in environ.split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is already dead; its parent will reap it
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), cmdline.strip()))
    return found


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls ``predicate`` until it returns a truthy value or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


_handlers_installed = False


def install_cleanup_handlers() -> None:
    """atexit + SIGTERM/SIGHUP: stop every child before this process goes.

    SIGINT is left to Python (KeyboardInterrupt unwinds the context managers
    and pytest's finalizers, which stop the processes in order).
    """
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(stop_all)

    def on_signal(signum, _frame):
        stop_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
