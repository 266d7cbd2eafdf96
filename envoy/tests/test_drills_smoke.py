"""The side-by-side drills' runner, end to end, on one short drill.

The zone outage (zone-a answers 503 to every inference while ``/health``
stays green) through ``drills.run.run_drill``, the code ``cargo xtask
drills`` runs, shortened to 5.5 s with the fault at 1.5 s, for sluice and Envoy
alone (LiteLLM is not part of ``cargo xtask test``). Loose bounds, for a
loaded 2-core machine: sluice lets at most 2% of the requests due after the
fault fail and, from 3 s after it, zone-a answers under 10% of them; Envoy
alone only has to have run and produced its numbers (it is the reference,
not under test). The full drills and their real targets: ``cargo xtask
drills`` (benches/drills.md).
"""

from __future__ import annotations

import json
from dataclasses import replace

from drills import catalog
from drills import run as drills_run


def test_zone_outage_drill_runs_for_sluice_and_native(tmp_path):
    drill = replace(catalog.BY_NAME["zone_outage"], duration=5.5, fault_at=1.5)
    result = drills_run.run_drill(drill, ["sluice", "native"], tmp_path)
    out = tmp_path / "zone_outage"
    print("\n" + (out / "table.md").read_text())

    for name in ("sluice", "native"):
        m = result["systems"][name]
        assert "error" not in m, f"{name}: {m.get('error')}"
        assert m["requests_after"] >= 35, f"{name}: too few requests after the fault"
        assert m["cpu_ms_per_request"] is not None and m["cpu_ms_per_request"] > 0
        assert m["upstream_after"] > 0
        # The runner's outputs exist and hold what the tables show.
        assert (out / name / "requests.jsonl").stat().st_size > 0
        assert json.loads((out / name / "summary.json").read_text())["counts"]["requests"] > 0

    s = result["systems"]["sluice"]
    assert s["failed_after"] <= 0.02 * s["requests_after"], s["outcomes_after"]
    assert s["sick_share_after_3s"] is not None and s["sick_share_after_3s"] < 0.10, s

    assert result["verdict"]["status"] in ("PASS", "MISS")
    assert (out / "table.md").read_text().startswith("# zone_outage")
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "result.json").read_text())["drill"] == "zone_outage"
