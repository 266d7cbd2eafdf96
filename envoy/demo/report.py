"""The demo's report: ``report.md`` and a plot of requests per second."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from pathlib import Path

from .chapters import Chapter
from .traffic import OUTCOMES, Recorder, summarize

COLORS = {"ok": "#2e7d32", "429": "#f9a825", "fallback": "#1565c0", "error": "#c62828"}


def plot(recorder: Recorder, chapters: list[Chapter], path: Path) -> None:
    """Stacked requests per second by outcome, with chapter boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = recorder.snapshot()
    end = max([o.t for o in outcomes] + [t for t, _ in recorder.events] + [1.0])
    seconds = list(range(int(math.ceil(end)) + 1))
    per_second = {k: Counter() for k in OUTCOMES}
    for o in outcomes:
        per_second[o.outcome][int(o.t)] += 1

    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    bottom = [0] * len(seconds)
    for outcome in OUTCOMES:
        values = [per_second[outcome][s] for s in seconds]
        if any(values):
            ax.bar(seconds, values, bottom=bottom, width=0.9, align="edge",
                   color=COLORS[outcome], label=outcome)
            bottom = [b + v for b, v in zip(bottom, values)]
    top = max(bottom + [1])
    for chapter in chapters:
        if chapter.started is None:
            continue
        ax.axvline(chapter.started, color="#555", linestyle="--", linewidth=1)
        ax.text(chapter.started + 0.2, top * 1.02, chapter.title, fontsize=8, va="bottom")
    for t, text in recorder.events:
        if not text.endswith((" start", " end")):
            ax.axvline(t, color="#999", linestyle=":", linewidth=1)
            ax.text(t + 0.2, top * 0.9, text, fontsize=7, rotation=90, va="top")
    ax.set_xlabel("seconds since the demo started")
    ax.set_ylabel("requests finished per second")
    ax.set_ylim(0, top * 1.15)
    ax.set_title("sluice demo: requests per second by outcome")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(path: Path, *, chapters: list[Chapter], recorder: Recorder, lab_info: dict,
          envoy_stats: dict[str, int], plot_file: str | None) -> None:
    lines = [
        "# sluice demo report",
        "",
        f"Run {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"policy `{lab_info['policy']}`; Envoy {lab_info['envoy_version']}.",
        "",
        "Lab: Envoy listening on " + lab_info["envoy"] + "; simulators: "
        + ", ".join(f"{k} at {v}" for k, v in lab_info["sims"].items()) + ".",
        "",
        *([f"Not enforced yet by the rendered Envoy: {'; '.join(lab_info['not_enforced'])}.", ""]
          if lab_info.get("not_enforced") else []),
        "## Chapters",
        "",
        "| # | chapter | status | seconds | requests | ok | 429 | fallback | errors |",
        "|---|---------|--------|--------:|---------:|---:|----:|---------:|-------:|",
    ]
    for i, ch in enumerate(chapters, 1):
        if not ch.built:
            lines.append(f"| {i} | {ch.title} | not yet built | | | | | | |")
            continue
        if ch.started is None:
            lines.append(f"| {i} | {ch.title} | not run | | | | | | |")
            continue
        s = ch.summary
        status = "held" if all(c.held for c in ch.checks) else "**FAILED**"
        lines.append(f"| {i} | {ch.title} | {status} | {ch.ended - ch.started:.0f} | "
                     f"{s['requests']} | {s['ok']} | {s['429']} | {s['fallback']} | {s['error']} |")
    if plot_file:
        lines += ["", f"![requests per second by outcome]({plot_file})"]
    for i, ch in enumerate(chapters, 1):
        lines += ["", f"### {i}. {ch.title}", "", ch.story, ""]
        if not ch.built:
            lines.append("_Not yet built._")
            continue
        if ch.started is None:
            lines.append("_Not run in this demo._")
            continue
        for check in ch.checks:
            mark = "✅" if check.held else "❌"
            lines.append(f"- {mark} {check.claim}: {check.seen}")
        tokens = ch.summary.get("tokens", {})
        if tokens:
            lines.append("- tokens by tenant: " + ", ".join(
                f"{t} {n:,}" for t, n in sorted(tokens.items())))
        zones = ch.summary.get("zones", {})
        if zones:
            lines.append("- answered by zone: " + ", ".join(
                f"{z} {n}" for z, n in sorted(zones.items())))
    total = summarize(recorder.snapshot())
    lines += ["", "## Totals", "",
              f"{total['requests']} requests: " + ", ".join(f"{k} {total[k]}" for k in OUTCOMES)
              + ".", ""]
    if envoy_stats:
        lines += ["## Envoy counters at the end", "", "```"]
        lines += [f"{k}: {v}" for k, v in sorted(envoy_stats.items())]
        lines += ["```", ""]
    path.write_text("\n".join(lines) + "\n")
