"""Envoy CPU time per request, with and without sluice's filters.

Requests per second on a shared 2-core machine swing with whatever else runs;
the CPU time Envoy's own process spends per request (utime + stime from
/proc/<pid>/stat, divided by the requests wrk completed) is much steadier.
All variants run side by side, against one llm-sim upstream with zero
simulated latency, and their load runs are interleaved round by round (in a
shuffled order) so drifts in the machine hit every variant alike.

Variants (all rendered from policies by ``sluice render envoy``, then
extended the way the lab extends bootstraps):

- ``none``: Envoy with only the router;
- ``noop``: plus a Rust proxy-wasm filter that does nothing (the V8 floor);
- ``local_ratelimit``: plus Envoy's native local rate limiter (never limiting);
- ``tokens``: plus sluice's token filter, admitting every request;
- ``breaker``: plus sluice's breaker filter, admitting every request;
- ``tokens@LABEL``: the token filter from another build (``--build LABEL=WASM``),
  to compare build profiles in one run.

Each variant runs a non-streaming workload (a 1 KiB JSON chat request, JSON
answer) and a streaming one (the same request with ``stream: true``; the
answer is 100 SSE chunks plus the usage chunk). Envoy runs one worker
(``--concurrency 1``) so its accounting is not spread over idle threads.

    PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py [--rounds 3] [--seconds 5]

Prints a table and writes ``benches/envoy-cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "envoy"))

from lab import Envoy, LlmSim, add_wasm_filter, install_cleanup_handlers, render_envoy  # noqa: E402
from lab import paths  # noqa: E402

POLICY_BASE = """
name = "bench"

[tenant]
from = "header"
header = "x-tenant-id"

[[backend]]
name = "primary"
models = ["sim-large"]
timeout = "60s"

  [[backend.zone]]
  name = "zone-a"
  region = "lab"
  endpoints = ["127.0.0.1:1"]
"""

SECTIONS = {
    "none": "",
    "tokens": """
[tokens]
default_max_tokens = 256
  [[tokens.quota]]
  tokens = "1000M/min"
  requests = "100M/min"
""",
    "breaker": """
[breaker]
mode = "consecutive"
consecutive_failures = 1000
""",
}

LOCAL_RATELIMIT = {
    "name": "envoy.filters.http.local_ratelimit",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "bench_rl",
        "token_bucket": {"max_tokens": 100000000, "tokens_per_fill": 100000000,
                         "fill_interval": "1s"},
        "filter_enabled": {"runtime_key": "rl_enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "rl_enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    },
}


def http_filters(doc: dict) -> list:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]


def bootstrap_for(variant: str, sim_listen: str, workdir: Path,
                  builds: dict[str, Path]) -> str:
    base, _, label = variant.partition("@")
    if label:
        doc = yaml.safe_load(bootstrap_for(base, sim_listen, workdir, builds))
        for f in http_filters(doc):
            code = f.get("typed_config", {}).get("config", {}).get("vm_config", {}).get("code")
            if code:
                code["local"]["filename"] = str(builds[label])
        return yaml.safe_dump(doc, sort_keys=False)
    policy = workdir / f"{variant}.toml"
    policy.write_text(POLICY_BASE + SECTIONS.get(variant, ""))
    text = render_envoy(policy, endpoints={("primary", "zone-a"): [sim_listen]})
    if variant == "noop":
        text = add_wasm_filter(text, "sluice-noop", paths.WASM_DIR / "sluice_noop.wasm")
    elif variant == "local_ratelimit":
        doc = yaml.safe_load(text)
        http_filters(doc).insert(0, LOCAL_RATELIMIT)
        text = yaml.safe_dump(doc, sort_keys=False)
    return text


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def request_body(stream: bool) -> str:
    """A chat request of about 1 KiB."""
    body = {"model": "sim-large", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": ""}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    filler = 1024 - len(json.dumps(body))
    body["messages"][0]["content"] = ("sluice " * 200)[:max(filler, 0)]
    return json.dumps(body)


def wrk_script(workdir: Path, stream: bool) -> Path:
    script = workdir / f"post-{'stream' if stream else 'json'}.lua"
    body = request_body(stream).replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["content-type"] = "application/json"\n'
        'wrk.headers["x-tenant-id"] = "bench"\n')
    return script


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> tuple[int, int]:
    """(completed requests, non-2xx responses) of one bounded wrk run."""
    run = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, seconds)}s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"(\d+) requests in", run.stdout)
    if found is None:
        raise RuntimeError(f"wrk printed no result (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", run.stdout)
    return int(found.group(1)), int(bad.group(1)) if bad else 0


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("installing wrk (apt-get)...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default="none,noop,local_ratelimit,tokens,breaker")
    parser.add_argument("--build", action="append", default=[], metavar="LABEL=WASM",
                        help="another build of a filter, run as variant FILTER@LABEL")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "envoy-cpu.md")
    args = parser.parse_args()
    builds = {k: Path(v) for k, v in (b.split("=", 1) for b in args.build)}
    ensure_wrk()
    install_cleanup_handlers()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        base, _, label = v.partition("@")
        wasm = builds.get(label) if label else paths.WASM_DIR / f"sluice_{base}.wasm"
        if base in ("tokens", "breaker", "noop") and (wasm is None or not wasm.is_file()):
            print(f"missing the module of {v}: run `cargo xtask build` (or pass --build)",
                  file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    run_dir = paths.LOGS_DIR / "bench-envoy-cpu"
    shutil.rmtree(run_dir, ignore_errors=True)
    results: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    started = []
    try:
        # 100 chunks per stream, each written as it is made.
        sim = LlmSim(zone="zone-a", models=["sim-large"], instance="bench", run_dir=run_dir,
                     extra_args=["--ttft-ms", "0", "--ttft-per-prompt-token-us", "0",
                                 "--tokens-per-sec", "20000", "--output-tokens", "100",
                                 "--quiet"])
        started.append(sim)
        envoys = {}
        for v in variants:
            envoy = Envoy(bootstrap_for(v, sim.listen, workdir, builds), run_dir,
                          name=f"envoy-{v.replace('@', '-')}", concurrency=1,
                          log_level="warning", component_log_level="wasm:warning")
            started.append(envoy)
            envoys[v] = envoy
        scripts = {False: wrk_script(workdir, False), True: wrk_script(workdir, True)}
        rng = random.Random(1)
        for r in range(args.rounds):
            for stream in (False, True):
                order = variants[:]
                rng.shuffle(order)
                for v in order:
                    envoy = envoys[v]
                    before = cpu_seconds(envoy.proc.pid)
                    done, bad = run_wrk(f"{envoy.base_url}/v1/chat/completions", scripts[stream],
                                        args.seconds, args.connections)
                    per_request = (cpu_seconds(envoy.proc.pid) - before) / max(done, 1) * 1e6
                    key = (v, "stream" if stream else "json")
                    results.setdefault(key, []).append(per_request)
                    errors[key] = errors.get(key, 0) + bad
                    print(f"round {r + 1} {key[1]:6} {v:16} {done:7} req  "
                          f"{per_request:8.1f} us/req  non-2xx {bad}", flush=True)
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(args, variants, results, errors)
    return 0 if not any(errors.values()) else 1


def write_report(args, variants, results, errors) -> None:
    command = " ".join(sys.argv[1:])
    lines = ["# Envoy CPU per request", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             f"`PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py {command}` "
             f"(wrk -t1 -c{args.connections}, Envoy 1.40 `--concurrency 1`, one llm-sim; "
             "medians over interleaved rounds; µs of Envoy CPU per completed request; "
             "the machine is a shared 2-core VM, so compare within a run).", ""]
    for mode in ("json", "stream"):
        base = statistics.median(results.get(("none", mode), [0.0]))
        noop_added = statistics.median(results.get(("noop", mode), [0.0])) - base
        title = "non-streaming (1 KiB JSON)" if mode == "json" else "streaming (100 SSE chunks)"
        lines += [f"## {title}", "",
                  "| variant | µs/request | added over none | added / noop's added | non-2xx |",
                  "|---|---:|---:|---:|---:|"]
        for v in variants:
            samples = results.get((v, mode))
            if not samples:
                continue
            med = statistics.median(samples)
            added = med - base
            ratio = f"{added / noop_added:.2f}×" if v != "none" and noop_added > 0 else "–"
            lines.append(f"| {v} | {med:.1f} | {added:+.1f} | {ratio} | {errors.get((v, mode), 0)} |")
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
