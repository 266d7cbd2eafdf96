"""``cargo xtask demo``: sluice's story told through a real Envoy.

Starts the lab (one llm-sim per endpoint of policies/demo.toml, which is
policies/lab.toml plus an endpoint pool, a retried backend and a backend in
three zones; Envoy rendered by ``sluice render envoy``), runs the chapters in
order with a live view, writes ``target/sluice-demo/report.md``,
``requests.png`` and, for a chapter about one backend's endpoints, retries or
zones, ``<chapter>.png``, stops everything and
exits 0 when every claim of every built chapter held (1 if one did not).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from lab import Lab, install_cleanup_handlers, paths

from . import report
from .chapters import CHAPTERS, DemoContext
from .live import LiveView, endpoint_label
from .traffic import Recorder, summarize

STAT_PATTERNS = re.compile(
    r"^(cluster\.[^.]+\.upstream_rq_(total|2xx|4xx|5xx|retry|retry_overflow|per_try_timeout)"
    r"|http\.(?!admin\.)[^.]+\.downstream_rq_[2-5]xx"
    r"|wasmcustom\..*)$")


def envoy_version() -> str:
    out = subprocess.run([str(paths.envoy_binary()), "--version"], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
    match = re.search(r"version: [0-9a-f]+/([^/\s]+)", out)
    return match.group(1) if match else out.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cargo xtask demo --", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every chapter's duration (e.g. 0.2 for a quick run)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this chapter (by key; repeatable)")
    parser.add_argument("--out", type=Path, default=paths.TARGET_DIR / "sluice-demo",
                        help="where report.md and the plots go")
    args = parser.parse_args(argv)
    install_cleanup_handlers()
    args.out.mkdir(parents=True, exist_ok=True)

    chapters = CHAPTERS
    unknown = set(args.only) - {c.key for c in chapters}
    if unknown:
        parser.error(f"unknown chapter(s) {sorted(unknown)}; known: {[c.key for c in chapters]}")

    policy = paths.DEMO_POLICY.resolve()
    shown = policy.relative_to(paths.REPO_ROOT) if policy.is_relative_to(paths.REPO_ROOT) else policy
    print(f"sluice demo: starting the lab from {shown}", flush=True)
    recorder = Recorder()
    live = LiveView(recorder)
    envoy_stats: dict[str, int] = {}
    endpoints: dict[str, list[tuple[str, str]]] = {}  # chapter key -> (instance, ip:port)
    with Lab("demo", policy, keep_logs=False) as lab:
        lab_info = {
            "policy": str(shown),
            "envoy_version": envoy_version(),
            "envoy": lab.envoy.address,
            "sims": {(f"{b}/{z}" if len(sims) == 1 else f"{b}/{z}/{endpoint_label(i)}"): sim.listen
                     for (b, z) in lab.sims
                     for sims in [lab.endpoint_sims(b, z)] for i, sim in enumerate(sims)},
        }
        print(f"  Envoy {lab_info['envoy_version']} on {lab.envoy.address} "
              f"(admin {lab.envoy.admin_url})")
        for name, address in lab_info["sims"].items():
            print(f"  llm-sim {name} on {address}")
        # `sluice render envoy` says in comments what no filter enforces yet.
        lab_info["not_enforced"] = [line.split(":", 1)[1].strip() for line in
                                    lab.bootstrap.splitlines()
                                    if line.startswith("# NOT ENFORCED YET:")]
        for item in lab_info["not_enforced"]:
            print(f"  not enforced yet by the rendered Envoy: {item}")
        ctx = DemoContext(lab, recorder, live, scale=args.scale)
        for number, chapter in enumerate(chapters, 1):
            heading = f"\n== Chapter {number}: {chapter.title} =="
            if not chapter.built:
                print(f"{heading} (not yet built)\n   {chapter.story}", flush=True)
                continue
            if args.only and chapter.key not in args.only:
                print(f"{heading} (skipped)", flush=True)
                continue
            print(f"{heading}\n   {chapter.story}", flush=True)
            chapter.started = recorder.now()
            recorder.mark(f"{chapter.key} start")
            pool = chapter.endpoints
            if pool is not None:
                endpoints[chapter.key] = [(sim.instance, sim.listen)
                                          for sim in lab.endpoint_sims(pool.backend, pool.zone)]
            live.header(chapter.started,
                        endpoints=[i for i, _ in endpoints.get(chapter.key, [])])
            chapter.checks = chapter.run(ctx)
            chapter.ended = recorder.now()
            recorder.mark(f"{chapter.key} end")
            chapter.summary = summarize(recorder.between(chapter.started, chapter.ended + 1e-9))
            for check in chapter.checks:
                mark = "ok  " if check.held else "FAIL"
                print(f"   [{mark}] {check.claim}: {check.seen}", flush=True)
        envoy_stats = {k: v for k, v in lab.envoy.stats().items()
                       if v and STAT_PATTERNS.match(k)}
    # The lab is stopped here: write the report.
    plot_path = args.out / "requests.png"
    report.plot(recorder, chapters, plot_path)
    endpoint_plots, retry_plots, zone_plots = {}, {}, {}
    for chapter in chapters:
        path = args.out / f"{chapter.key}.png"
        if chapter.key in endpoints:
            report.plot_endpoints(recorder, chapter, endpoints[chapter.key], path)
            endpoint_plots[chapter.key] = path.name
        elif chapter.retries is not None and chapter.started is not None:
            report.plot_retries(recorder, chapter, path)
            retry_plots[chapter.key] = path.name
        elif chapter.zones is not None and chapter.started is not None:
            report.plot_zones(recorder, chapter, path)
            zone_plots[chapter.key] = path.name
    report_path = args.out / "report.md"
    report.write(report_path, chapters=chapters, recorder=recorder, lab_info=lab_info,
                 envoy_stats=envoy_stats, plot_file=plot_path.name,
                 endpoints=endpoints, endpoint_plots=endpoint_plots, retry_plots=retry_plots,
                 zone_plots=zone_plots)
    failed = [c for c in chapters if c.started is not None and not all(h.held for h in c.checks)]
    total = summarize(recorder.snapshot())
    print(f"\nsluice demo: {total['requests']} requests, ok {total['ok']}, 429 {total['429']}, "
          f"fallback {total['fallback']}, errors {total['error']}")
    print(f"report: {report_path}\nplot:   {plot_path}")
    for name in [*endpoint_plots.values(), *retry_plots.values(), *zone_plots.values()]:
        print(f"plot:   {args.out / name}")
    if failed:
        print("sluice demo: claims that did not hold in: " + ", ".join(c.title for c in failed))
        return 1
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    try:
        code = main()
    except KeyboardInterrupt:
        print("\nsluice demo: interrupted; every process was stopped", file=sys.stderr)
        code = 130
    sys.exit(code)
