"""Per-drill tables and plots, verdicts, and the report that links them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import catalog

LABELS = {"sluice": "sluice", "native": "Envoy alone", "litellm": "LiteLLM"}


def fmt(v, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _usable(m: dict | None) -> bool:
    return bool(m) and "cannot" not in m and "error" not in m


def behind(drill: catalog.Drill, result: dict) -> list[str]:
    """Plain statements of where sluice did worse than a peer."""
    s = result["systems"].get("sluice")
    if not _usable(s):
        return []
    out = []
    for peer, p in result["systems"].items():
        if peer == "sluice" or not _usable(p):
            continue
        label = LABELS[peer]
        if s["failed_after"] > p["failed_after"]:
            out.append(f"{label} failed fewer requests after the fault "
                       f"({p['failed_after']} vs sluice's {s['failed_after']})")
        sm, pm = s.get("moved_s"), p.get("moved_s")
        if drill.sick_zones or drill.sick_instances:
            if sm is None and pm is not None:
                out.append(f"{label} moved off the sick part ({pm:.2f} s); sluice did not")
            elif sm is not None and pm is not None and sm > pm + 0.05:
                out.append(f"{label} moved sooner ({pm:.2f} s vs {sm:.2f} s)")
        sp, pp = s["ttft"]["settled"]["p99"], p["ttft"]["settled"]["p99"]
        if sp is not None and pp is not None and sp > 1.1 * pp and sp > pp + 10:
            out.append(f"{label} has a lower settled p99 TTFT ({pp:.0f} ms vs {sp:.0f} ms)")
        sa, pa = s.get("amplification"), p.get("amplification")
        if drill.name in ("total_outage", "random_503") and sa and pa and sa > pa + 0.05:
            out.append(f"{label} sent fewer upstream attempts per request ({pa:.2f} vs {sa:.2f})")
        sc, pc = s.get("cpu_ms_per_request"), p.get("cpu_ms_per_request")
        if sc is not None and pc is not None and sc > pc:
            out.append(f"{label} used less proxy CPU per request ({pc:.2f} vs {sc:.2f} ms)")
    return out


def verdict(drill: catalog.Drill, result: dict) -> dict:
    s = result["systems"].get("sluice")
    if not _usable(s) or drill.verdict is None:
        return {"status": "n/a", "promise": "", "detail": "sluice did not run",
                "behind": []}
    v = drill.verdict(s, result)
    return {"status": v.status, "promise": v.promise, "detail": v.detail,
            "behind": behind(drill, result)}


def _cell_rows(drill: catalog.Drill) -> list[tuple[str, callable]]:
    def ttft(phase):
        return lambda m: f"{fmt(m['ttft'][phase]['p50'], '', 0)} / {fmt(m['ttft'][phase]['p99'], '', 0)}"
    rows = [
        ("client requests (all loads)", lambda m: fmt(m["client_requests"])),
        ("failed after the fault", lambda m: f"{m['failed_after']} of {m['requests_after']} "
                                             f"({fmt(m['failed_after_pct'], '%')})"),
        ("… by kind (5xx/429/transport/cut/dropped)", lambda m: "/".join(
            str(m["outcomes_after"][k]) for k in ("http_5xx", "http_429", "transport", "cut",
                                                  "dropped"))),
        ("failed in the last 5 s", lambda m: fmt(m["failed_settled"])),
        ("TTFT p50 / p99 before (ms)", ttft("before")),
        ("TTFT p50 / p99 first 5 s after (ms)", ttft("after")),
        ("TTFT p50 / p99 last 5 s (ms)", ttft("settled")),
        ("… p99 first 5 s / last 5 s with sluice's probes (ms)", lambda m: (
            f"{fmt(m['ttft_with_probes']['after']['p99'], '', 0)} / "
            f"{fmt(m['ttft_with_probes']['settled']['p99'], '', 0)}")),
    ]
    if drill.sick_zones or drill.sick_instances:
        rows += [
            ("time to move (s)", lambda m: fmt(m.get("moved_s"), digits=3)
             if m.get("moved_s") is not None else "not moved"),
            ("answers from the sick part after the fault", lambda m: fmt(m["sick_served_after"])),
            ("sick share ≥ 3 s after the fault", lambda m: fmt(
                None if m["sick_share_after_3s"] is None else 100 * m["sick_share_after_3s"], "%")),
            ("sluice probes after the fault", lambda m: fmt(m["probes_after"])),
        ]
    rows += [
        ("amplification (upstream / client, after the fault)",
         lambda m: f"{fmt(m.get('amplification'))} (budget bound {fmt(m.get('retry_bound'))})"),
    ]
    if drill.kind == "overshoot":
        rows += [("tokens used (sims) / allowed", lambda m: f"{m['tokens_used']} / "
                  f"{fmt(m['tokens_allowed'], '', 0)} over {fmt(m['window_s'], ' s', 1)}"),
                 ("overshoot", lambda m: fmt(m["overshoot_pct"], "%")),
                 ("streams served", lambda m: fmt(m["ok_streams"]))]
    if drill.kind == "flood":
        def part(key, phase):
            return lambda m: (f"{fmt(m['flood'][key]['success_pct'], '%')} ok, "
                              f"{m['flood'][key]['http_429']} × 429, first byte p50/p99 "
                              f"{fmt(m['flood'][key]['p50'], '', 0)}/{fmt(m['flood'][key]['p99'], '', 0)} ms"
                              f" (n={m['flood'][key]['n']})")
        rows += [("globex before the flood", part("named_before", "")),
                 ("globex during the flood", part("named_during", "")),
                 ("the flood's own requests", part("flood", ""))]
    rows += [("proxy CPU (ms / client request)", lambda m: fmt(m.get("cpu_ms_per_request"))),
             ("load generator lag p99 (ms)", lambda m: fmt(m.get("generator_lag_p99_ms"), "", 0))]
    return rows


def table_md(drill: catalog.Drill, result: dict) -> str:
    systems = list(result["systems"])
    lines = [f"# {drill.name}: {drill.title}", "",
             f"Fault at {drill.fault_at:g} s of {drill.duration:g} s: `{json.dumps(drill.faults)}`. "
             f"Load: {_load_text(drill)}.", "",
             "| | " + " | ".join(LABELS[s] for s in systems) + " |",
             "|---|" + "---|" * len(systems)]
    for label, cell in _cell_rows(drill):
        cells = []
        for s in systems:
            m = result["systems"][s]
            if "cannot" in m:
                cells.append("cannot do")
            elif "error" in m:
                cells.append("harness error")
            else:
                try:
                    cells.append(cell(m))
                except (KeyError, TypeError):
                    cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for s in systems:
        m = result["systems"][s]
        if "cannot" in m:
            lines.append(f"\n**{LABELS[s]} cannot do this drill:** {m['cannot']}.")
        if "error" in m:
            lines.append(f"\n**{LABELS[s]}: harness error:** `{m['error']}`")
    v = result["verdict"]
    lines += ["", f"**Verdict: {v['status']}.** Promise: {v['promise']}. Measured: {v['detail']}."]
    if v["behind"]:
        lines += ["", "Where sluice is behind a peer:"] + [f"- {b}" for b in v["behind"]]
    notes = [f"- {LABELS[s]}: time to move: {m['moved_note']}"
             for s, m in result["systems"].items() if _usable(m) and m.get("moved_note")]
    if notes:
        lines += ["", "Notes:"] + notes
    lines += ["", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def _load_text(drill: catalog.Drill) -> str:
    def one(load: catalog.Load) -> str:
        mode = (f"open loop {load.open_loop:g} req/s" if load.open_loop is not None
                else f"closed loop {load.closed_loop} clients"
                + (f" ({load.error_pause_ms} ms pause after a failure)" if load.error_pause_ms
                   else ""))
        who = (f"invented tenants `{load.tenant_flood}…`" if load.tenant_flood
               else f"tenant `{load.tenant}`")
        return (f"{mode}, {int(load.stream_share * 100)}% streamed, max_tokens "
                f"{load.max_tokens}, {who}" + (" from the fault on" if load.starts_at_fault else ""))
    parts = [one(drill.load)] + [f"plus {k}: {one(v)}" for k, v in drill.extra_load]
    return "; ".join(parts)


def plot(drill: catalog.Drill, result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    fig, axes = plt.subplots(2, len(systems), figsize=(4.2 * len(systems), 5.6),
                             squeeze=False, sharex=True)
    # One latency scale for every system, so the panels compare at a glance.
    lat = [w["ttft_p99"] for m in result["systems"].values() if _usable(m)
           for w in m["windows"] if w["ttft_p99"]]
    colors = {"ok": "#4c9a2a", "http_5xx": "#d62728", "http_429": "#ff7f0e",
              "http_4xx": "#9467bd", "transport": "#7f7f7f", "cut": "#8c564b",
              "dropped": "#000000"}
    ymax = max((sum(w[k] for k in colors) for m in result["systems"].values() if _usable(m)
                for w in m["windows"]), default=1)
    for col, s in enumerate(systems):
        top, bottom = axes[0][col], axes[1][col]
        m = result["systems"][s]
        top.set_title(LABELS[s])
        if not _usable(m):
            text = "cannot do this drill" if "cannot" in m else "harness error"
            for ax in (top, bottom):
                ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
                ax.set_yticks([])
            continue
        ts = [w["t_s"] for w in m["windows"]]
        base = [0] * len(ts)
        for k, c in colors.items():
            vals = [w[k] for w in m["windows"]]
            if any(vals):
                top.bar(ts, vals, width=0.9, bottom=base, color=c, label=k, align="edge")
                base = [b + v for b, v in zip(base, vals)]
        top.set_ylim(0, ymax * 1.1)
        top.legend(fontsize=7, loc="lower left")
        p99 = [(w["t_s"] + 0.5, w["ttft_p99"]) for w in m["windows"] if w["ttft_p99"]]
        if p99:
            bottom.plot([t for t, _ in p99], [v for _, v in p99], marker=".", color="#1f77b4")
            bottom.set_yscale("log")
            if lat:
                bottom.set_ylim(min(lat) * 0.8, max(lat) * 1.25)
        fault_s = m["fault_ms"] / 1000
        for ax in (top, bottom):
            ax.axvline(fault_s, color="black", linestyle="--", linewidth=1)
        bottom.set_xlabel("seconds (due time)")
        if col == 0:
            top.set_ylabel("requests / s by outcome")
            bottom.set_ylabel("p99 TTFT of streams, probes incl. (ms)")
    fig.suptitle(f"{drill.name}: {drill.title} (fault: dashed line)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_drill(drill: catalog.Drill, result: dict, out_dir: Path) -> None:
    (out_dir / "table.md").write_text(table_md(drill, result))
    plot(drill, result, out_dir / "timeline.png")


def headline_rows(result: dict, link_prefix: str = "") -> list[str]:
    drill = catalog.BY_NAME[result["drill"]]
    rows = []
    for s, m in result["systems"].items():
        name = f"[{drill.name}]({link_prefix}{drill.name}/table.md)"
        if "cannot" in m:
            rows.append(f"| {name} | {LABELS[s]} | cannot do | | | | |")
            continue
        if "error" in m:
            rows.append(f"| {name} | {LABELS[s]} | harness error | | | | |")
            continue
        moved = ("–" if not (drill.sick_zones or drill.sick_instances)
                 else fmt(m.get("moved_s"), " s", 2) if m.get("moved_s") is not None
                 else "not moved")
        extra = f"amp {fmt(m.get('amplification'))}"
        if drill.kind == "overshoot":
            extra = f"overshoot {fmt(m.get('overshoot_pct'), '%')}"
        if drill.kind == "flood":
            d = m["flood"]["named_during"]
            extra = (f"globex {fmt(d['success_pct'], '%')} ok, first-byte p99 "
                     f"{fmt(d['p99'], ' ms', 0)}")
        rows.append(f"| {name} | {LABELS[s]} | {m['failed_after']} "
                    f"({fmt(m['failed_after_pct'], '%', 1)}) | {moved} | "
                    f"{fmt(m['ttft']['settled']['p99'], ' ms', 0)} | "
                    f"{fmt(m.get('cpu_ms_per_request'))} | {extra} |")
    return rows


HEADLINE_HEAD = ["| drill | system | failed after fault | time to move | p99 TTFT settled | "
                 "CPU ms/req | other |", "|---|---|---|---|---|---|---|"]


def write_report(out_root: Path, _results: list[dict], systems: list[str], command: str) -> None:
    """``report.md`` over every drill result present under ``out_root``."""
    results = []
    for drill in catalog.DRILLS:
        path = out_root / drill.name / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    lines = ["# sluice chaos drills, side by side", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}`.", "",
             "Systems: **sluice** (sluice.wasm in Envoy 1.40, envoy/drills/policy.toml), "
             "**Envoy alone** (the same policy without [tokens] and [breaker], rendered with "
             "`--native-failover --native-retry`: Envoy's own locality failover, outlier "
             "detection, health checks, route retries and retry budget; sluice.wasm only routes "
             "by model), **LiteLLM** (1.108.7, envoy/drills/litellm.yaml). Four llm-sims each "
             "(zone-a: a1, a2; zone-b: b1, b2), fresh per run; the proxy prefers zone-a.", "",
             *HEADLINE_HEAD]
    for r in results:
        lines += headline_rows(r)
    lines += ["", "## Verdicts (sluice against its policy's promise)", ""]
    for r in results:
        v = r["verdict"]
        lines.append(f"- **[{r['drill']}]({r['drill']}/table.md)** {v['status']}: "
                     f"{v['detail']} (promise: {v['promise']})")
        for b in v["behind"]:
            lines.append(f"  - behind: {b}")
    lines += ["", "## Plots", ""]
    for r in results:
        lines.append(f"- [{r['drill']}]({r['drill']}/timeline.png): {r['title']}")
    lines += ["", "Definitions: envoy/drills/measure.py (module docs). \"time to move\": from "
              "the fault to the send time of the last request answered by the sick zone or "
              "endpoint (sluice's probes excluded; blackhole: the last request the sick "
              "simulator received, polled every 250 ms); \"not moved\": still answered there in "
              "the run's last 2 s. CPU: utime+stime of the proxy's process tree over the load, "
              "per client request.", ""]
    (out_root / "report.md").write_text("\n".join(lines))


def write_bench(out_root: Path, bench_md: Path, command: str) -> None:
    """The committed summary: ``bench_md`` with the headline table and the
    verdicts of every result under ``out_root``, the plots copied next to it
    (``<bench_md without .md>/<drill>.png``)."""
    import os
    import shutil
    import subprocess

    png_dir = bench_md.with_suffix("")
    png_dir.mkdir(parents=True, exist_ok=True)
    results = [json.loads((out_root / d.name / "result.json").read_text())
               for d in catalog.DRILLS if (out_root / d.name / "result.json").is_file()]
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")), "unknown")
    rel = png_dir.name
    rates = "/".join(sorted({f"{r['load']['main']['open_loop']:g}" for r in results
                             if catalog.BY_NAME[r["drill"]].kind == "default"
                             and r["load"]["main"].get("open_loop")})) or "?"
    lines = ["# Chaos drills side by side: sluice, Envoy alone, LiteLLM", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
             f"- Machine: {os.cpu_count()} CPUs (`nproc`), {model}",
             f"- Command: `{command}`",
             "- Definitions and per-drill tables: `envoy/drills/measure.py`; the full outputs "
             "(loadgen records, result.json, table.md per drill) are written to "
             "`target/drills/`.", "",
             "Systems: **sluice** (sluice.wasm in Envoy 1.40, `envoy/drills/policy.toml`), "
             "**Envoy alone** (the same policy without `[tokens]` and `[breaker]`, rendered "
             "with `--native-failover --native-retry`: Envoy's locality priorities, outlier "
             "detection, `/health` checks, route retries and retry budget; sluice.wasm is left "
             "routing by model only, so its CPU is in that column too), **LiteLLM** "
             "(1.108.7, one worker, `envoy/drills/litellm.yaml`). Four llm-sims each "
             "(zone-a: a1, a2; zone-b: b1, b2; first token 50 ms, 200 tokens/s), fresh per "
             f"run; the proxy prefers zone-a. Open loop {rates} req/s, half streamed, unless "
             "the drill says otherwise; fault at 5 s of 20 s.", "",
             "\"failed\": requests due after the fault that did not end ok; \"time to move\": "
             "fault → send time of the last request answered by the sick zone/endpoint "
             "(sluice's probes excluded; blackhole: the last request the sick simulator "
             "received, 250 ms polls), \"not moved\" if still answered there in the last 2 s; "
             "\"p99 TTFT settled\": streamed requests due in the last 5 s; CPU: utime+stime of "
             "the proxy's process tree over the load per client request; amp: upstream "
             "inference requests per client request after the fault.", "",
             *HEADLINE_HEAD]
    for r in results:
        lines += [row.replace(f"]({r['drill']}/table.md)", f"]({rel}/{r['drill']}.png)")
                  for row in headline_rows(r)]
        src = out_root / r["drill"] / "timeline.png"
        if src.is_file():
            shutil.copyfile(src, png_dir / f"{r['drill']}.png")
    lines += ["", "## Verdicts (sluice against its policy's promise)", ""]
    for r in results:
        v = r["verdict"]
        lines.append(f"- **{r['drill']}** ({r['title']}): **{v['status']}**: {v['detail']} "
                     f"(promise: {v['promise']})")
        for b in v["behind"]:
            lines.append(f"  - behind: {b}")
        for s, m in r["systems"].items():
            if "cannot" in m:
                lines.append(f"  - {LABELS[s]} cannot do it: {m['cannot']}")
    lines += ["", "## Plots", ""]
    for r in results:
        lines += [f"### {r['drill']}", "", f"![{r['drill']}]({rel}/{r['drill']}.png)", ""]
    bench_md.write_text("\n".join(lines))
