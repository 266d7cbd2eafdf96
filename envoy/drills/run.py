"""Runs chaos drills side by side: sluice in Envoy, Envoy alone, LiteLLM.

    python -m drills.run [NAME...] [--out DIR] [--systems sluice,native,litellm]

(``cargo xtask drills [NAME...]`` builds everything, installs both venvs and
runs this with the lab's environment.) For each drill and system: four fresh
llm-sims and a fresh proxy, a few warm-up requests, then ``tools/loadgen``
(open loop at a fixed rate, or a closed loop) with the drill's fault applied
``fault_at`` seconds in; meanwhile the simulators' counters are polled every
250 ms. Outputs go to ``DIR/<drill>/``: ``<system>/`` (loadgen's
``requests.jsonl`` and ``summary.json``, ``logs/``), ``result.json``,
``table.md`` and ``timeline.png``; ``DIR/report.md`` links them all.

The exit status is 0 when every drill ran, whatever the verdicts (a MISS is
a finding, not a harness error); 1 when a drill could not be run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from lab import paths
from lab.procs import ManagedProcess, install_cleanup_handlers

from . import catalog, measure, report
from .systems import System

POLL_S = 0.25
LOADGEN_TIMEOUT_S = 12
START_DELAY_S = 0.5


def loadgen_argv(system: System, load: catalog.Load, duration: float, out: Path,
                 start_at_ms: int, seed: int) -> list[str]:
    argv = [str(paths.native_tool("loadgen")), "--base-url", system.base_url,
            "--duration", f"{duration:.3f}", "--model", system.model,
            "--max-tokens", str(load.max_tokens), "--stream-share", str(load.stream_share),
            "--timeout", str(LOADGEN_TIMEOUT_S), "--start-at", str(start_at_ms),
            "--seed", str(seed), "--out", str(out)]
    if load.open_loop is not None:
        argv += ["--open-loop", str(load.open_loop)]
    else:
        argv += ["--closed-loop", str(load.closed_loop)]
        if load.error_pause_ms:
            argv += ["--error-pause-ms", str(load.error_pause_ms)]
    if load.tenant_flood:
        argv += ["--tenant-flood", load.tenant_flood]
    elif load.tenant:
        argv += ["--tenant", load.tenant]
    if system.api_key:
        argv += ["--api-key", system.api_key]
    return argv


def run_system(drill: catalog.Drill, name: str, out_dir: Path) -> dict:
    """One system through one drill; its numbers (``measure.analyse``)."""
    sys_dir = out_dir / name
    shutil.rmtree(sys_dir, ignore_errors=True)
    logs = sys_dir / "logs"
    system = System(name, logs, list(drill.sim_args) or None)
    loadgens: list[tuple[str, ManagedProcess, Path]] = []
    try:
        system.warm_up()
        stats_start = system.sim_stats()
        t0_ms = int(time.time() * 1000 + START_DELAY_S * 1000)
        fault_unix_ms = t0_ms + int(drill.fault_at * 1000)
        plan = [("main", drill.load, 0.0)] + [
            (key, load, drill.fault_at if load.starts_at_fault else 0.0)
            for key, load in drill.extra_load]
        for seed, (key, load, offset) in enumerate(plan, start=1):
            out = sys_dir if key == "main" else sys_dir / key
            argv = loadgen_argv(system, load, drill.duration - offset, out,
                                t0_ms + int(offset * 1000), seed)
            loadgens.append((key, ManagedProcess(f"loadgen-{key}", argv, logs), out))

        polls: list[tuple[float, dict]] = []
        stats_fault: dict | None = None
        cpu_start: float | None = None
        deadline = t0_ms / 1000 + drill.duration + LOADGEN_TIMEOUT_S + 20
        next_poll = 0.0
        while any(p.alive() for _, p, _ in loadgens):
            now = time.time()
            if cpu_start is None and now * 1000 >= t0_ms:
                cpu_start = system.proxy_cpu()
            if stats_fault is None and now * 1000 >= fault_unix_ms:
                stats_fault = system.sim_stats()
                for instance, faults in drill.faults.items():
                    system.sims[instance].set_faults(**faults)
                fault_unix_ms = int(time.time() * 1000)   # once every sim has it
            if now >= next_poll and now * 1000 >= t0_ms:
                polls.append((now * 1000, system.sim_stats()))
                next_poll = now + POLL_S
            if now > deadline:
                for _, p, _ in loadgens:
                    p.stop(timeout=8.0)   # SIGTERM: loadgen writes its outputs
                raise TimeoutError(f"loadgen ran past {deadline - t0_ms / 1000:.0f} s")
            time.sleep(0.02)
        cpu_s = system.proxy_cpu() - (cpu_start if cpu_start is not None else 0.0)
        stats_end = system.sim_stats()
        for key, p, _ in loadgens:
            code = p.popen.wait()
            if code != 0:
                raise RuntimeError(f"loadgen {key} exited {code}: {p.describe_exit()}")
        if stats_fault is None:
            raise RuntimeError("the load ended before the fault time")
    finally:
        for _, p, _ in loadgens:
            p.stop()
        system.stop()

    records, summary = measure.read_records(sys_dir)
    run_start = summary["run_start_unix_ms"]
    extra = {key: measure.read_records(out) for key, _, out in loadgens if key != "main"}
    metrics = measure.analyse(
        drill, records=records, summary=summary, fault_ms=fault_unix_ms - run_start,
        stats_start=stats_start, stats_fault=stats_fault, stats_end=stats_end,
        polls=[(t - run_start, s) for t, s in polls], cpu_s=cpu_s, extra=extra)
    metrics["fault_ms"] = fault_unix_ms - run_start
    metrics["windows"] = measure.windows(records, drill.duration * 1000)
    (sys_dir / "polls.json").write_text(json.dumps(
        [{"t_ms": round(t - run_start), **{i: {k: s[k] for k in ("inference_requests",
                                                                  "tokens_produced",
                                                                  "prompt_tokens",
                                                                  "blackholed")}
                                           for i, s in stats.items()}}
         for t, stats in polls]))
    return metrics


def run_drill(drill: catalog.Drill, systems: list[str], out_root: Path,
              log=print) -> dict:
    """Every system through ``drill``; writes and returns its result."""
    out_dir = out_root / drill.name
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"drill": drill.name, "title": drill.title, "faults": drill.faults,
                    "fault_at_s": drill.fault_at, "duration_s": drill.duration,
                    "load": {"main": vars(drill.load),
                             **{k: vars(v) for k, v in drill.extra_load}},
                    "systems": {}}
    for name in systems:
        if name in drill.cannot:
            result["systems"][name] = {"cannot": drill.cannot[name]}
            log(f"  {drill.name} / {name}: cannot do this drill")
            continue
        started = time.monotonic()
        try:
            result["systems"][name] = run_system(drill, name, out_dir)
            m = result["systems"][name]
            log(f"  {drill.name} / {name}: {m['failed_after']} failed after the fault, "
                f"moved {m.get('moved_s')}, amplification {m.get('amplification')}, "
                f"CPU {m.get('cpu_ms_per_request')} ms/req "
                f"({time.monotonic() - started:.0f} s)")
        except Exception as err:  # a harness error: recorded, reported, exit 1
            result["systems"][name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"  {drill.name} / {name}: ERROR {err}")
            traceback.print_exc()
    result["verdict"] = report.verdict(drill, result)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    report.write_drill(drill, result, out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"drills to run (default: all): {', '.join(catalog.BY_NAME)}")
    parser.add_argument("--out", type=Path, default=paths.TARGET_DIR / "drills")
    parser.add_argument("--systems", default=",".join(catalog.SYSTEMS))
    parser.add_argument("--duration", type=float, help="override every drill's duration (s)")
    parser.add_argument("--fault-at", type=float, help="override every drill's fault time (s)")
    parser.add_argument("--rate", type=float,
                        help="override the open-loop rate (req/s) of every drill's main load")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite tables, plots, verdicts and reports from "
                             "the result.json files under --out")
    parser.add_argument("--publish", type=Path, metavar="MD",
                        help="also write this summary page (e.g. benches/drills.md) with "
                             "the plots copied next to it")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in catalog.BY_NAME]
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in catalog.SYSTEMS]
    if unknown or bad:
        parser.error(f"unknown drill(s) {unknown} or system(s) {bad}")
    install_cleanup_handlers()
    drills = [catalog.BY_NAME[n] for n in args.names] or list(catalog.DRILLS)
    if args.duration or args.fault_at is not None:
        drills = [replace(d, duration=args.duration or d.duration,
                          fault_at=d.fault_at if args.fault_at is None else args.fault_at)
                  for d in drills]
    if args.rate:
        drills = [replace(d, load=replace(d.load, open_loop=args.rate))
                  if d.load.open_loop is not None else d for d in drills]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    for drill in drills:
        if args.render_only:
            path = args.out / drill.name / "result.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            result["verdict"] = report.verdict(drill, result)
            path.write_text(json.dumps(result, indent=2))
            report.write_drill(drill, result, args.out / drill.name)
            results.append(result)
            continue
        print(f"drill {drill.name}: {drill.title}", flush=True)
        results.append(run_drill(drill, systems, args.out))
    report.write_report(args.out, [r for r in results], systems,
                        command=" ".join(["python -m drills.run", *(argv or sys.argv[1:])]))
    if args.publish:
        report.write_bench(args.out, args.publish, command=" ".join(
            ["cargo xtask drills", *args.names, "--",
             *([f"--rate {args.rate:g}"] if args.rate else []),
             "--publish", str(args.publish)]))
    print(f"\n{len(results)} drill(s) in {time.monotonic() - started:.0f} s; "
          f"report: {args.out / 'report.md'}")
    print((args.out / "report.md").read_text())
    errors = [(r["drill"], s) for r in results for s, m in r["systems"].items() if "error" in m]
    if errors:
        print(f"harness errors in: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
