"""Envoy CPU per request: no filter, the do-nothing filter, and a sluice filter.

What a filter costs in Envoy is measured where it runs: three Envoys (one
worker each) are started side by side from the same rendered bootstrap, one
without any Wasm filter, one with ``sluice_noop.wasm`` (the cost floor of any
Rust proxy-wasm filter: VM context, callbacks, header copies) and one with
the filter under test. They get the same requests, in interleaved rounds (so
drift in the machine's load hits all three alike), and each Envoy's CPU time
is read from ``/proc/<pid>/stat`` (utime + stime) around each round.

    added(filter) = cpu/request(filter) - cpu/request(no filter)
    ratio         = added(filter) / added(noop)

The upstream is one llm-sim answering at once (no time to first token, one
output token), and the client is a bounded pool of keep-alive connections
sending 1 KiB JSON chat completions; neither is on the measured process.

    PYTHONPATH=envoy target/lab-venv/bin/python benches/breaker_cpu.py \\
        --filter breaker --rounds 6 --requests 2000 --out benches/breaker.md

Filters: ``breaker`` (policy with a consecutive breaker that admits every
request) and ``tokens`` (a quota far above the load); add more in FILTERS.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envoy"))

from lab import Envoy, LlmSim, add_wasm_filter, paths, render_envoy, stop_all  # noqa: E402

BASE_POLICY = """
name = "bench"

[[backend]]
name = "primary"
models = ["sim-large"]
timeout = "30s"
  [[backend.zone]]
  name = "zone-a"
  region = "lab"
  endpoints = ["127.0.0.1:1"]
"""

# The section each filter under test needs: configured so that every
# request is admitted (the cost measured is the cost of a pass).
FILTERS = {
    "breaker": """
[breaker]
mode = "consecutive"
consecutive_failures = 5
  [breaker.degrade]
  action = "fail-fast"
""",
    "tokens": """
[tokens]
  [[tokens.quota]]
  tokens = "1000M/min"
""",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def request_body() -> bytes:
    """A chat completion of exactly 1 KiB."""
    doc = {"model": "sim-large", "max_tokens": 1,
           "messages": [{"role": "user", "content": ""}]}
    pad = 1024 - len(json.dumps(doc, separators=(",", ":")))
    doc["messages"][0]["content"] = "x" * pad
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == 1024
    return body


def load(address: str, requests: int, connections: int, body: bytes) -> int:
    """Sends ``requests`` POSTs over ``connections`` keep-alive connections;
    returns how many were answered 200."""
    host, port = address.rsplit(":", 1)
    ok = [0] * connections
    per = requests // connections

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for _ in range(per):
            conn.request("POST", "/v1/chat/completions", body,
                         {"content-type": "application/json", "x-tenant-id": "bench"})
            response = conn.getresponse()
            response.read()
            ok[i] += response.status == 200
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return sum(ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filter", choices=sorted(FILTERS), default="breaker")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=2000, help="per Envoy per round")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write a markdown report here")
    args = parser.parse_args()

    noop_wasm = paths.WASM_DIR / "sluice_noop.wasm"
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    envoys: dict[str, Envoy] = {}
    try:
        sim = LlmSim(zone="zone-a", models=["sim-large"], instance="bench", run_dir=work,
                     extra_args=["--ttft-ms", "0", "--ttft-per-prompt-token-us", "0",
                                 "--output-tokens", "1", "--tokens-per-sec", "1000000"])
        endpoints = {("primary", "zone-a"): [sim.listen]}
        plain = work / "plain.toml"
        plain.write_text(BASE_POLICY)
        guarded = work / f"{args.filter}.toml"
        guarded.write_text(BASE_POLICY + FILTERS[args.filter])
        bootstraps = {
            "none": render_envoy(plain, endpoints=endpoints),
            "noop": add_wasm_filter(render_envoy(plain, endpoints=endpoints), "sluice-noop",
                                    noop_wasm),
            args.filter: render_envoy(guarded, endpoints=endpoints),
        }
        for name, bootstrap in bootstraps.items():
            envoys[name] = Envoy(bootstrap, work / name, name=name, concurrency=1,
                                 component_log_level="wasm:warn")
        body = request_body()
        for envoy in envoys.values():  # warm up: VMs, connections, JIT
            load(envoy.address, 200, args.connections, body)
        cpu = {name: 0.0 for name in envoys}
        answered = {name: 0 for name in envoys}
        for r in range(args.rounds):
            order = list(envoys)
            order = order[r % len(order):] + order[:r % len(order)]
            for name in order:
                pid = envoys[name].proc.pid
                before = cpu_seconds(pid)
                answered[name] += load(envoys[name].address, args.requests, args.connections, body)
                cpu[name] += cpu_seconds(pid) - before
        sent = args.rounds * (args.requests // args.connections) * args.connections
        per = {name: cpu[name] / sent * 1e6 for name in envoys}
        added_noop = per["noop"] - per["none"]
        added_filter = per[args.filter] - per["none"]
        ratio = added_filter / added_noop if added_noop > 0 else float("nan")
        lines = [
            f"| Envoy | CPU µs/request | added over no filter | answered 200 |",
            f"|---|---:|---:|---:|",
        ]
        for name in envoys:
            lines.append(f"| {name} | {per[name]:.1f} | {per[name] - per['none']:+.1f} | "
                         f"{answered[name]}/{sent} |")
        summary = (f"{args.filter} added {added_filter:.1f} µs/request, the do-nothing filter "
                   f"{added_noop:.1f}: ratio {ratio:.2f}× (target ≤ 2×)")
        print("\n".join(lines))
        print(summary)
        if args.out:
            command = ("PYTHONPATH=envoy target/lab-venv/bin/python benches/breaker_cpu.py "
                       f"--filter {args.filter} --rounds {args.rounds} "
                       f"--requests {args.requests} --connections {args.connections} "
                       f"--out {args.out}")
            args.out.write_text(report(args.filter, lines, summary, command, args))
        return 0 if all(answered[n] == sent for n in envoys) else 1
    finally:
        for envoy in envoys.values():
            envoy.stop()
        stop_all()


def report(filter_name: str, table: list[str], summary: str, command: str, args) -> str:
    return f"""# Envoy CPU per request: the {filter_name} filter

{summary}.

Measured with `benches/breaker_cpu.py` (its docstring explains the method):
three Envoy 1.40 processes, one worker each, with no Wasm filter, with the
do-nothing `sluice_noop.wasm`, and with `sluice_{filter_name}.wasm`
configured so that every request passes; {args.rounds} interleaved rounds of
{args.requests} non-streaming 1 KiB JSON chat completions each over
{args.connections} keep-alive connections, against one llm-sim answering at
once. CPU is utime + stime of each Envoy from `/proc/<pid>/stat`.

{chr(10).join(table)}

```sh
cargo xtask build
{command}
```

Machine: 2 cores shared with other work, so single runs vary by a few µs;
the ratio is what to compare.
"""


if __name__ == "__main__":
    sys.exit(main())
