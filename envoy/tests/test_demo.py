"""The demo runs end to end (shortened) and writes its report and plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab import paths


def test_demo_runs_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT / "envoy"))
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--scale", "0.1", "--out", str(tmp_path)],
        cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=150,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    assert "Chapter 1: Normal traffic" in done.stdout
    report = (tmp_path / "report.md").read_text()
    assert "| Normal traffic | held |" in report
    assert "not yet built" in report
    png = (tmp_path / "requests.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
