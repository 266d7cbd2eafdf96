"""The demo's report: ``report.md``, a plot of requests per second and a
plot for each chapter about one backend's endpoints, retries or zones."""

from __future__ import annotations

import datetime as dt
import math
import textwrap
from collections import Counter
from pathlib import Path

from .chapters import Chapter, Route
from .live import endpoint_label
from .traffic import OUTCOMES, Recorder, percentile, summarize

COLORS = {"ok": "#2e7d32", "429": "#f9a825", "fallback": "#1565c0", "error": "#c62828"}
ENDPOINT_COLORS = ("#1565c0", "#ef6c00", "#6a1b9a", "#2e7d32", "#00838f", "#ad1457")


def _pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _span(recorder: Recorder, chapter: Chapter) -> tuple[float, float]:
    """When a chapter started and ended, in the record's time."""
    return (chapter.started or 0.0,
            chapter.ended if chapter.ended is not None else recorder.now())


def _two_panels(plt):
    """A chapter plot: two panels sharing the time axis, the top one larger."""
    return plt.subplots(2, 1, figsize=(11, 7), dpi=110, sharex=True,
                        gridspec_kw={"height_ratios": [3, 2]})


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(recorder: Recorder, chapters: list[Chapter], path: Path) -> None:
    """Stacked requests per second by outcome, with chapter boundaries marked."""
    plt = _pyplot()
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
    _save(plt, fig, path)


def plot_endpoints(recorder: Recorder, chapter: Chapter, endpoints: list[tuple[str, str]],
                   path: Path) -> None:
    """One chapter about a backend's endpoints: answers per second by the
    endpoint that gave them (stacked) over the clients' time to first token
    per second (p50, p99), with the chapter's marks and details."""
    plt = _pyplot()
    t0, t1 = _span(recorder, chapter)
    outcomes = recorder.between(t0, t1 + 1e-9)
    seconds = list(range(int(math.ceil(t1 - t0)) + 1))
    per_second: dict[str, Counter] = {instance: Counter() for instance, _ in endpoints}
    ttfts: dict[int, list[float]] = {}
    for o in outcomes:
        second = int(o.t - t0)
        if o.instance in per_second:
            per_second[o.instance][second] += 1
        if o.ttft is not None:
            ttfts.setdefault(second, []).append(o.ttft * 1000)

    fig, (top, bottom) = _two_panels(plt)
    bottom_of = [0] * len(seconds)
    for i, (instance, address) in enumerate(endpoints):
        values = [per_second[instance][s] for s in seconds]
        top.bar(seconds, values, bottom=bottom_of, width=0.9, align="edge",
                color=ENDPOINT_COLORS[i % len(ENDPOINT_COLORS)],
                label=f"{endpoint_label(i)} = {instance} ({address})")
        bottom_of = [b + v for b, v in zip(bottom_of, values)]
    peak = max(bottom_of + [1])
    # Marks (faults injected) across both panels, their words in the
    # headroom; details (ejections, returns) as dotted lines, staggered.
    for t, text in recorder.events:
        if t0 < t < t1 and not text.endswith((" start", " end")):
            for ax in (top, bottom):
                ax.axvline(t - t0, color="#555", linestyle="--", linewidth=1)
            parts = text.split("; ")
            words = "\n".join(line for i, part in enumerate(parts)
                              for line in textwrap.wrap(part + (";" if i < len(parts) - 1
                                                                else ""), 20,
                                                        break_on_hyphens=False))
            top.text(t - t0 + 0.2, peak * 1.58, words, fontsize=7, va="top")
    _details(recorder, top, t0, t1, peak)
    top.set_ylim(0, peak * 1.6)
    top.set_ylabel("answers per second\nby endpoint")
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(endpoints), fontsize=7,
               frameon=False)
    fig.suptitle(f"{chapter.title}: which endpoint answered each second, and how soon",
                 fontsize=11)

    xs = [s + 0.5 for s in seconds if s in ttfts]
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        bottom.plot(xs, [percentile(ttfts[s], q) for s in seconds if s in ttfts],
                    marker=".", linewidth=1.2, label=name)
    pool = chapter.endpoints
    if pool is not None and pool.first_token_timeout:
        bottom.axhline(pool.first_token_timeout * 1000, color="#c62828", linestyle="--",
                       linewidth=1, label="first-token deadline")
    bottom.set_yscale("log")
    bottom.set_ylabel("clients' time to\nfirst token (ms)")
    bottom.set_xlabel(f"seconds since the chapter started ({t0:.0f} s into the demo)")
    bottom.legend(loc="center right", fontsize=7)
    _save(plt, fig, path)


def _details(recorder: Recorder, ax, t0: float, t1: float, peak: float) -> None:
    """A chapter's details (an endpoint ejected or back, a zone drained or
    back) as dotted lines in ``ax``'s headroom (``peak`` × 1.08–1.24),
    staggered; red for the bad news."""
    details = [(t, text) for t, text in recorder.details if t0 <= t <= t1]
    for n, (t, text) in enumerate(details):
        color = "#c62828" if text.endswith(("ejected", "drained", "panic")) else "#2e7d32"
        ax.axvline(t - t0, ymax=(1.08 + 0.08 * (n % 3)) / 1.6, color=color, linestyle=":",
                   linewidth=1.2)
        ax.text(t - t0 + 0.15, peak * (1.08 + 0.08 * (n % 3)), text, fontsize=7,
                color=color, va="bottom")


def _marks(recorder: Recorder, axes, t0: float, t1: float, top_axis, peak: float,
           width: int = 22) -> None:
    """A chapter's marks (faults injected) across ``axes``, their words in
    ``top_axis``'s headroom (``peak`` × 1.58), ``width`` characters a line."""
    for t, text in recorder.events:
        if t0 < t < t1 and not text.endswith((" start", " end")):
            for ax in axes:
                ax.axvline(t - t0, color="#555", linestyle="--", linewidth=1)
            words = "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))
            top_axis.text(t - t0 + 0.2, peak * 1.58, words, fontsize=7, va="top")


def plot_retries(recorder: Recorder, chapter: Chapter, path: Path) -> None:
    """One chapter about a backend's retries: the HTTP requests clients sent
    each second against the attempts its endpoints received (the watcher's
    samples of their counters), then the answers by outcome (failures that
    said ``x-should-retry: false`` apart) over the budget's balance."""
    plt = _pyplot()
    retried = chapter.retries
    assert retried is not None
    t0, t1 = _span(recorder, chapter)
    seconds = list(range(int(math.ceil(t1 - t0)) + 1))
    sent = recorder.exchanges_between(t0, t1 + 1e-9, retried.model)
    calls = recorder.between(t0, t1 + 1e-9)
    requests, answers = Counter(), {k: Counter() for k in ("ok", "failed", "told")}
    for e in sent:
        second = int(e.t - t0)
        requests[second] += 1
        kind = ("told" if e.should_retry == "false" else "failed") if e.failed else "ok"
        answers[kind][second] += 1
    per_call = Counter(int(o.t - t0) for o in calls)
    # Attempts per second from the counters sampled about once a second.
    upstream = recorder.series(retried.series("upstream"), t0 - 1, t1 + 1)
    rates = [((a + b) / 2 - t0, (vb - va) / (b - a))
             for (a, va), (b, vb) in zip(upstream, upstream[1:]) if b - a > 0.2]
    balance = recorder.series(retried.series("balance"), t0 - 1, t1 + 1)

    fig, (top, bottom) = _two_panels(plt)
    xs = [s + 0.5 for s in seconds]
    top.bar(seconds, [requests[s] for s in seconds], width=0.9, align="edge", color="#90a4ae",
            label="HTTP requests the clients' SDK sent")
    top.plot(xs, [per_call[s] for s in seconds], color="#1565c0", linewidth=1.2, marker=".",
             label="SDK calls finished")
    top.plot([x for x, _ in rates], [r for _, r in rates], color="#c62828", linewidth=1.8,
             marker=".", label="attempts the replicas received")
    peak = max([requests[s] for s in seconds] + [r for _, r in rates] + [1])
    # Each stretch between the chapter's marks: attempts per request, as
    # Envoy counted them for the answers (x-envoy-attempt-count).
    bounds = [t0] + [t for t, text in recorder.events
                     if t0 < t < t1 and not text.endswith((" start", " end"))] + [t1]
    for a, b in zip(bounds, bounds[1:]):
        stretch = [e for e in sent if a <= e.t < b]
        if stretch:
            amp = sum(e.attempts for e in stretch) / len(stretch)
            top.text((a + b) / 2 - t0, peak * 1.22, f"{amp:.2f} attempts\nper request",
                     fontsize=8, ha="center", va="center", color="#c62828")
    top.set_ylim(0, peak * 1.6)
    top.set_ylabel("per second")
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{chapter.title}: requests against attempts, and what clients were told",
                 fontsize=11)

    stacked = [0] * len(seconds)
    for kind, color, label in (("ok", "#2e7d32", "ok"),
                               ("failed", "#ef6c00", "failed (SDK may retry)"),
                               ("told", "#c62828", "failed, x-should-retry: false")):
        values = [answers[kind][s] for s in seconds]
        bottom.bar(seconds, values, bottom=stacked, width=0.9, align="edge", color=color,
                   label=label)
        stacked = [b + v for b, v in zip(stacked, values)]
    bottom.set_ylim(0, max(stacked + [1]) * 1.45)
    bottom.set_ylabel("HTTP answers\nper second")
    bottom.set_xlabel(f"seconds since the chapter started ({t0:.0f} s into the demo)")
    gauge = bottom.twinx()
    gauge.plot([t - t0 for t, _ in balance], [v for _, v in balance], color="#6a1b9a",
               linewidth=1.5, label="budget balance (retries)")
    gauge.set_ylim(bottom=0)
    gauge.set_ylabel("budget balance", color="#6a1b9a")
    handles = bottom.get_legend_handles_labels()
    extra = gauge.get_legend_handles_labels()
    bottom.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left", fontsize=7,
                  ncol=2)
    _marks(recorder, (top, bottom), t0, t1, top, peak)
    _save(plt, fig, path)


def plot_zones(recorder: Recorder, chapter: Chapter, path: Path) -> None:
    """One chapter about a backend's zones: answers per second by the zone
    that served them (stacked; x-sluice-zone), with the probes and the calls
    retried in another zone, over each zone's share of new requests (the
    watcher's samples of sluice's gauges) and the calls' p99 latency."""
    plt = _pyplot()
    zoned = chapter.zones
    assert zoned is not None
    t0, t1 = _span(recorder, chapter)
    seconds = list(range(int(math.ceil(t1 - t0)) + 1))
    served = {zone: Counter() for zone in zoned.zones}
    probes, retried, latency = Counter(), Counter(), {}
    for o in recorder.between(t0, t1 + 1e-9):
        second, route = int(o.t - t0), Route.of(o)
        if route.zone in served:
            served[route.zone][second] += 1
        probes[second] += route.probe
        retried[second] += route.reason == "retry"
        if o.latency is not None:
            latency.setdefault(second, []).append(o.latency * 1000)

    fig, (top, bottom) = _two_panels(plt)
    stacked = [0] * len(seconds)
    for i, (zone, region) in enumerate(zip(zoned.zones, zoned.regions)):
        values = [served[zone][s] for s in seconds]
        top.bar(seconds, values, bottom=stacked, width=0.9, align="edge",
                color=ENDPOINT_COLORS[i % len(ENDPOINT_COLORS)], label=f"{zone} ({region})")
        stacked = [b + v for b, v in zip(stacked, values)]
    xs = [s + 0.5 for s in seconds]
    top.plot(xs, [retried[s] for s in seconds], color="#c62828", linewidth=1.2, marker=".",
             label="retried in another zone")
    probed = [s for s in seconds if probes[s]]
    top.plot([s + 0.5 for s in probed], [probes[s] for s in probed], color="#212121",
             linewidth=0, marker="x", label="probes of a drained zone")
    peak = max(stacked + [1])
    _details(recorder, top, t0, t1, peak)
    top.set_ylim(0, peak * 1.6)
    top.set_ylabel("answers per second\nby zone served")
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=5, fontsize=7, frameon=False)
    fig.suptitle(f"{chapter.title}: which zone served each second, and each zone's share",
                 fontsize=11)

    # The watcher samples every zone's gauge at once: stack them.
    shares = [dict(recorder.series(zoned.series(zone, "share"), t0 - 1, t1 + 1))
              for zone in zoned.zones]
    times = sorted(set().union(*shares))
    bottom.stackplot([t - t0 for t in times],
                     *[[share.get(t, 0) / 10 for t in times] for share in shares],
                     step="post", colors=ENDPOINT_COLORS[:len(zoned.zones)], alpha=0.6,
                     labels=[f"{zone} share" for zone in zoned.zones])
    bottom.set_ylim(0, 135)
    bottom.set_ylabel("share of new\nrequests (%)")
    bottom.set_xlabel(f"seconds since the chapter started ({t0:.0f} s into the demo)")
    slow = bottom.twinx()
    slow.plot([s + 0.5 for s in seconds if s in latency],
              [percentile(latency[s], 0.99) for s in seconds if s in latency],
              color="#757575", linewidth=1, linestyle="--", label="calls' p99 latency")
    slow.set_yscale("log")
    slow.set_ylabel("p99 latency (ms)", color="#757575")
    handles = bottom.get_legend_handles_labels()
    extra = slow.get_legend_handles_labels()
    bottom.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right", fontsize=7,
                  ncol=4)
    _marks(recorder, (top, bottom), t0, t1, top, peak, width=14)
    _save(plt, fig, path)


def write(path: Path, *, chapters: list[Chapter], recorder: Recorder, lab_info: dict,
          envoy_stats: dict[str, int], plot_file: str | None,
          endpoints: dict[str, list[tuple[str, str]]] | None = None,
          endpoint_plots: dict[str, str] | None = None,
          retry_plots: dict[str, str] | None = None,
          zone_plots: dict[str, str] | None = None) -> None:
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
        pool = (endpoints or {}).get(ch.key)
        if pool:
            answered = Counter(o.instance for o in recorder.between(ch.started, ch.ended + 1e-9))
            lines.append("- answered by endpoint: " + ", ".join(
                f"{endpoint_label(i)} {instance} ({address}) {answered.get(instance, 0)}"
                for i, (instance, address) in enumerate(pool)))
        retried = ch.retries
        if retried is not None:
            sent = recorder.exchanges_between(ch.started, ch.ended + 1e-9, retried.model)
            told = sum(1 for e in sent if e.failed and e.should_retry == "false")
            calls = recorder.between(ch.started, ch.ended + 1e-9)
            lines.append(
                f"- {retried.backend}: {len(calls)} SDK calls sent {len(sent)} HTTP requests, "
                f"which took {sum(e.attempts for e in sent)} attempts "
                f"(x-envoy-attempt-count); {sum(1 for e in sent if e.failed)} failed, "
                f"{told} of them with x-should-retry: false")
        plot_name = (endpoint_plots or {}).get(ch.key)
        if plot_name:
            lines += ["", f"![{ch.title}: answers by endpoint and time to first token]"
                          f"({plot_name})"]
        zoned = ch.zones
        if zoned is not None:
            routes = Counter(Route.of(o) for o in recorder.between(ch.started, ch.ended + 1e-9))
            lines.append(f"- {zoned.backend}: answered by " + ", ".join(
                f"{zone} {sum(n for r, n in routes.items() if r.zone == zone)}"
                for zone in zoned.zones)
                + f"; {sum(n for r, n in routes.items() if r.probe)} probes, "
                f"{sum(n for r, n in routes.items() if r.reason == 'retry')} calls retried "
                "in another zone")
        plot_name = (retry_plots or {}).get(ch.key)
        if plot_name:
            lines += ["", f"![{ch.title}: requests against attempts, answers and the budget]"
                          f"({plot_name})"]
        plot_name = (zone_plots or {}).get(ch.key)
        if plot_name:
            lines += ["", f"![{ch.title}: answers by zone and each zone's share]"
                          f"({plot_name})"]
    total = summarize(recorder.snapshot())
    lines += ["", "## Totals", "",
              f"{total['requests']} requests: " + ", ".join(f"{k} {total[k]}" for k in OUTCOMES)
              + ".", ""]
    if envoy_stats:
        lines += ["## Envoy counters at the end", "", "```"]
        lines += [f"{k}: {v}" for k, v in sorted(envoy_stats.items())]
        lines += ["```", ""]
    path.write_text("\n".join(lines) + "\n")
