"""The lab runner itself: processes start, become ready, and always stop.

These use a tiny bootstrap with a direct response (no upstream, no sluice
filter), so they test the runner alone; everything that runs a policy goes
through ``sluice render envoy`` instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from lab import Envoy, paths, survivors, validate
from lab.procs import ManagedProcess, wait_until

HAND_BOOTSTRAP = textwrap.dedent("""\
    admin:
      address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    static_resources:
      listeners:
      - name: lab-runner-selftest
        address: {socket_address: {address: 127.0.0.1, port_value: 0}}
        filter_chains:
        - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: selftest
              route_config:
                virtual_hosts:
                - name: all
                  domains: ["*"]
                  routes:
                  - match: {prefix: "/"}
                    direct_response: {status: 200, body: {inline_string: "runner ok\\n"}}
              http_filters:
              - name: envoy.filters.http.router
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    """)


@pytest.fixture
def run_dir(request, tmp_path) -> Path:
    return tmp_path / paths.safe_name(request.node.name)


def test_envoy_starts_on_runtime_ports_and_stops(run_dir):
    with Envoy(HAND_BOOTSTRAP, run_dir) as envoy:
        host, port = envoy.address.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        response = httpx.get(f"{envoy.base_url}/x", timeout=5, trust_env=False)
        assert response.status_code == 200 and response.text == "runner ok\n"
        assert envoy.stats("selftest").get("http.selftest.downstream_rq_2xx") == 1
        pid = envoy.proc.pid
    assert not envoy.proc.alive()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_two_envoys_run_side_by_side(run_dir):
    with Envoy(HAND_BOOTSTRAP, run_dir, name="one") as one, \
            Envoy(HAND_BOOTSTRAP, run_dir, name="two") as two:
        assert one.address != two.address
        for envoy in (one, two):
            assert httpx.get(envoy.base_url, timeout=5, trust_env=False).status_code == 200


def test_bad_bootstrap_is_rejected_by_validate_and_start(run_dir):
    bad = HAND_BOOTSTRAP.replace("stat_prefix: selftest", "stat_prefix_typo: selftest")
    path = run_dir / "bad.yaml"
    run_dir.mkdir(parents=True)
    path.write_text(bad)
    assert validate(path).returncode != 0
    (run_dir / "good.yaml").write_text(HAND_BOOTSTRAP)
    assert validate(run_dir / "good.yaml").returncode == 0, validate(run_dir / "good.yaml").stderr
    with pytest.raises(RuntimeError, match="Envoy exited"):
        Envoy(bad, run_dir, ready_timeout=20)
    assert not survivors()


def test_processes_stop_when_the_test_body_raises(run_dir):
    pids = []
    with pytest.raises(ZeroDivisionError):
        with Envoy(HAND_BOOTSTRAP, run_dir) as envoy:
            pids.append(envoy.proc.pid)
            1 / 0
    assert not survivors()


def test_sigterm_ignoring_child_is_killed_after_the_grace_period(run_dir):
    stubborn = [sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('up', flush=True); time.sleep(60)"]
    proc = ManagedProcess("stubborn", stubborn, run_dir)
    wait_until(lambda: proc.stdout_path.read_text().startswith("up"), 10, what="child up")
    started = time.monotonic()
    code = proc.stop(timeout=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_children_die_with_a_killed_runner(run_dir):
    """SIGKILL of the Python runner (no cleanup code runs) still stops Envoy."""
    run_dir.mkdir(parents=True)
    (run_dir / "bootstrap.yaml").write_text(HAND_BOOTSTRAP)
    script = textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from lab import Envoy
        envoy = Envoy(Path({str(run_dir / 'bootstrap.yaml')!r}).read_text(), Path({str(run_dir)!r}))
        print(envoy.proc.pid, flush=True)
        time.sleep(60)
        """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = runner.stdout.readline()
        envoy_pid = int(line)
        assert Path(f"/proc/{envoy_pid}").exists()
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(10)

        def gone():
            try:
                return "Z" in Path(f"/proc/{envoy_pid}/stat").read_text().rsplit(")", 1)[1][:3]
            except FileNotFoundError:
                return True

        wait_until(gone, 10, what="the orphaned Envoy to die")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(5)
        runner.stdout.close()
