"""Fixtures of the Envoy lab tests.

- ``lab``: the default lab (policies/lab.toml, one llm-sim per backend zone,
  Envoy rendered by ``sluice render envoy``), started for the test and stopped
  after it; its logs are kept under ``target/lab-logs/<test>/`` if it failed.
- ``lab_factory``: ``lab_factory(policy=..., bootstrap_hook=..., sim_args=...)``
  starts a custom lab with the same guarantees (several per test are fine).
- ``probe_lab``: the default lab with the conformance probe filter first in
  the chain (skipped until the probe is built).
- ``openai_client`` / ``anthropic_client``: the real SDKs pointed at ``lab``.

Every process a test starts is stopped by the fixture's finalizer, on
failure, timeout (pytest-timeout's SIGALRM) or Ctrl-C too; at the end of the
session, any process still carrying this run's id fails the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import Lab, add_wasm_filter, install_cleanup_handlers, stop_all, survivors  # noqa: E402
from lab import paths  # noqa: E402

TENANT_HEADER = "x-tenant-id"


def pytest_configure(config):
    install_cleanup_handlers()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


@pytest.fixture
def lab_factory(request):
    started: list[Lab] = []

    def start(name: str | None = None, **kwargs) -> Lab:
        label = name or request.node.name
        if started:
            label = f"{label}-{len(started)}"
        lab = Lab(label, **kwargs)
        started.append(lab)
        return lab.start()

    yield start
    failed = _failed(request)
    for lab in reversed(started):
        lab.stop(failed=failed)


def probe_built() -> bool:
    """Whether the conformance probe .wasm exists and is a proxy-wasm module."""
    try:
        return b"proxy_on_context_create" in paths.PROBE_WASM.read_bytes()
    except OSError:
        return False


def with_probe(bootstrap: str) -> str:
    """The rendered chain with the conformance probe in front of it."""
    return add_wasm_filter(bootstrap, "sluice-probe", paths.PROBE_WASM,
                           configuration='{"tick_ms": 100}')


@pytest.fixture
def lab(lab_factory) -> Lab:
    """The default lab: policies/lab.toml as ``sluice render envoy`` renders it."""
    if not paths.LAB_POLICY.is_file():
        pytest.fail(f"{paths.LAB_POLICY} is missing: the lab needs it")
    return lab_factory()


@pytest.fixture
def probe_lab(lab_factory) -> Lab:
    """The default lab with the conformance probe first in the chain.

    The probe replaces each response body with its observation document
    (the upstream body is kept inside it), so this lab is for probe tests only.
    """
    if not probe_built():
        pytest.skip(f"the conformance probe is not built yet ({paths.PROBE_WASM})")
    return lab_factory(bootstrap_hook=with_probe)


@pytest.fixture
def openai_client(lab):
    import openai

    client = openai.OpenAI(base_url=f"{lab.base_url}/v1", api_key="sk-lab",
                           max_retries=0, timeout=30.0,
                           default_headers={TENANT_HEADER: "acme"})
    yield client
    client.close()


@pytest.fixture
def anthropic_client(lab):
    import anthropic

    client = anthropic.Anthropic(base_url=lab.base_url, api_key="sk-ant-lab",
                                 max_retries=0, timeout=30.0,
                                 default_headers={TENANT_HEADER: "globex"})
    yield client
    client.close()


def pytest_sessionfinish(session, exitstatus):
    """Fails the run if any process this run started is still alive."""
    left = survivors()
    if not left:
        return
    stop_all()
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
    sys.stderr.write(f"\nlab: processes left behind by the tests (now killed):\n{lines}\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
