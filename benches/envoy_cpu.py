r"""Envoy CPU time per request, with and without sluice's filters.

Requests per second on a shared 2-core machine swing with whatever else runs;
the CPU time Envoy's own process spends per request (utime + stime from
/proc/<pid>/stat, divided by the requests wrk completed) is much steadier.
All variants run side by side, against the same llm-sim upstreams with zero
simulated latency (``--endpoints``, default 4, in the backend's one zone,
for every variant), and their load runs are interleaved round by round (in a
shuffled order) so drifts in the machine hit every variant alike.

Every variant is ``sluice render envoy`` of its policy (the base below plus
its sections) with any wasm filter the render put before the router removed
and the variant's own filters inserted there by this script, so a variant is
exactly what it says whatever the render emits for a policy. Listener,
routes and cluster stay as rendered: the same for every policy without
[outlier]; with [outlier], the cluster load-balances with ``override_host``
and runs sluice.wasm's per-attempt instance (root id ``sluice.attempt``) as
an upstream filter, both part of what [outlier] costs. Wasm filters get the
options the render gives sluice's (V8, one VM per module, the policy text as
the render wrote it, endpoints included, as configuration,
``allow_on_headers_stop_iteration: true``, without which a paused header
phase never reaches the body callbacks), except ``failure_policy``:
FAIL_CLOSED here, so a broken VM shows up as non-2xx answers instead of as a
filter that costs nothing.

Variants (the default set; ``--variants`` picks others):

- ``none``: Envoy with only the router;
- ``noop``: plus a Rust proxy-wasm filter that does nothing (the V8 floor);
- ``noop-body``: plus a filter that only holds the request until its body is
  whole, reads it, and reads every response chunk: the floor of any
  body-reading filter, and the unit of the ratios reported;
- ``local_ratelimit``: plus Envoy's native local rate limiter (never limiting);
- ``sluice-tokens``, ``sluice-breaker``, ``sluice-both``: the one module
  ``sluice.wasm`` with the policy's [tokens], [breaker], or both sections,
  admitting every request;
- ``chain``: the two separate filters ``sluice_tokens.wasm`` then
  ``sluice_breaker.wasm``, both sections (what sluice ran before the fold).

Not in the default set, for [outlier]'s cost (issue target: the engine with
[outlier] enabled adds ≤ 1.3× the CPU of the engine without it):

- ``sluice-all``: sluice.wasm with [tokens], [breaker] and [outlier] (every
  key at its default), cluster as rendered; against ``sluice-both``;
- ``sluice-outlier``: [outlier] alone; against ``sluice-none-enabled``, the
  module with no section;
- ``sluice-all-noattempt``: ``sluice-all`` with the per-attempt instance
  removed from the cluster (picking without learning from attempts): splits
  that instance's cost from the rest;
- ``sluice-all-noopattempt``: ``sluice-all`` with ``sluice_noop.wasm`` as
  the per-attempt filter instead: splits that instance's cost into the
  floor of any wasm filter run per attempt and sluice's own work.

For [failover]'s cost, ``sluice-failover`` ([outlier] and [failover], the
simulators split over two zones) against ``sluice-outlier-2z`` ([outlier]
alone on the same two zones).

For the record of every capability (``cargo xtask bench``, see
``benches/cpu.md``): ``sluice-retry`` ([retry] alone, every key at its
default, with the per-attempt instance the render adds) and
``sluice-every`` (every section: [tokens], [breaker], [outlier], [retry]
and [failover], on two zones). ``--json PATH`` also writes the run's raw
numbers (every round's µs per request, requests, non-2xx answers, the
machine) for ``benches/record.py``.

The report then has a table of these pairs' ratios, both as total CPU and
as CPU added over ``none``::

    V=none,noop-body,sluice-none-enabled,sluice-outlier,sluice-both,sluice-all,sluice-all-noattempt
    PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py --variants $V \
        --out /tmp/envoy-cpu-outlier.md

Also available: ``tokens`` and ``breaker`` (one separate filter each), and
``VARIANT@LABEL``, a variant run with another build (``--build LABEL=PATH``):
PATH is a .wasm file that replaces the module of a one-module variant, or a
directory every module of the variant is read from. A variant whose .wasm
file is missing is skipped with the reason printed.

The separate filters were folded into ``sluice.wasm``; once the workspace no
longer has their crates, build them from a commit before the fold and run the
chain from there::

    git worktree add /tmp/prefold cc3299f
    (cd /tmp/prefold && cargo build --release --target wasm32-wasip1 \
        -p sluice-tokens -p sluice-breaker --target-dir /tmp/prefold/target)
    V=none,noop,noop-body,local_ratelimit,sluice-tokens,sluice-breaker,sluice-both,chain@prefold
    PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py --variants $V \
        --build prefold=/tmp/prefold/target/wasm32-wasip1/release

Each variant runs a non-streaming workload (a 1 KiB JSON chat request, JSON
answer) and a streaming one (the same request with ``stream: true``; the
answer is 100 SSE chunks plus the usage chunk). Envoy runs one worker
(``--concurrency 1``) so its accounting is not spread over idle threads.

    cargo xtask build   # or build the filters and native tools another way
    PYTHONPATH=envoy target/lab-venv/bin/python benches/envoy_cpu.py [--rounds 3] [--seconds 5]

From a worktree whose build artefacts live elsewhere, pass
``--target-dir DIR`` (or set ``SLUICE_TARGET_DIR``): the filters are read from
``DIR/wasm32-wasip1/release``, the sluice CLI and llm-sim from ``DIR/native``.

Prints the table of ratios to noop-body's added CPU and writes it, with the
command, date and machine, to ``benches/envoy-cpu.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "envoy"))

# The lab (``lab``, ``lab.paths``) is imported in main(), after --target-dir
# has set SLUICE_TARGET_DIR: its paths are fixed when it is first imported.

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
# The same backend split over two zones of one region (the simulators
# alternate between them): what [failover] needs to have an opinion.
POLICY_TWO_ZONES = POLICY_BASE + """
  [[backend.zone]]
  name = "zone-b"
  region = "lab"
  endpoints = ["127.0.0.1:2"]
"""
# The zone's endpoints are replaced by the llm-sims' addresses at run time
# (``sluice render envoy --endpoints``, which also writes them into the policy
# text the filters are given): every variant's cluster holds the same
# ``--endpoints`` simulators, so the upstream traffic is the same whatever the
# filters are.

# Sections that enable a capability and never limit the benchmark's load.
TOKENS = """
[tokens]
default_max_tokens = 256
  [[tokens.quota]]
  tokens = "1000M/min"
  requests = "100M/min"
"""

BREAKER = """
[breaker]
mode = "consecutive"
consecutive_failures = 1000
"""

# Every key at its default, as a user who writes just the header gets it
# (the simulators never fail and are equally fast, so nothing is ejected;
# the report lists the outlier counters to show it).
OUTLIER = """
[outlier]
"""

# Every key at its default but the proxy's zone (the bench renders no
# node locality).
FAILOVER = """
[failover]
local_zone = "zone-a"
"""

# Every key at its default: a budget of retries, none of them used (the
# simulators never fail), so what is measured is the per-request and
# per-attempt bookkeeping.
RETRY = """
[retry]
"""

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


@dataclass(frozen=True)
class Variant:
    """What one Envoy runs besides the router."""

    what: str
    modules: tuple[str, ...] = ()  # wasm modules (file stems), in chain order
    sections: str = ""             # policy sections appended to POLICY_BASE
    native: tuple[dict, ...] = ()  # native filters, before the wasm ones
    # Keep the per-attempt instance (upstream filter `sluice.attempt`) that
    # the render puts on the clusters of [outlier] backends; False removes it
    # (and the upstream filter chain with it), to split its cost from the
    # picking's. Only meaningful with OUTLIER in `sections`.
    attempt_filter: bool = True
    # Run this module (a file stem) as the per-attempt upstream filter in
    # place of sluice.wasm: its own VM, no configuration. With sluice_noop,
    # the floor of any wasm filter that runs once per attempt.
    attempt_module: str | None = None
    # Zones the backend's endpoints are split over (1 or 2).
    zones: int = 1


VARIANTS = {
    "none": Variant("Envoy with only the router"),
    "noop": Variant("a Rust filter that does nothing", ("sluice_noop",)),
    "noop-body": Variant("a Rust filter that holds and reads the request body and reads "
                         "every response chunk, nothing else", ("sluice_noop_body",)),
    "local_ratelimit": Variant("Envoy's native local rate limiter, never limiting",
                               native=(LOCAL_RATELIMIT,)),
    "sluice-tokens": Variant("sluice.wasm, [tokens] only", ("sluice",), TOKENS),
    "sluice-breaker": Variant("sluice.wasm, [breaker] only", ("sluice",), BREAKER),
    "sluice-both": Variant("sluice.wasm, [tokens] and [breaker]", ("sluice",), TOKENS + BREAKER),
    "sluice-none-enabled": Variant("sluice.wasm with no section (routes by model, strips "
                                   "internal headers)", ("sluice",)),
    "sluice-outlier": Variant("sluice.wasm, [outlier] only (defaults): endpoint picking "
                              "through override_host, plus the per-attempt instance "
                              "`sluice.attempt` on the cluster", ("sluice",), OUTLIER),
    "sluice-outlier-2z": Variant("sluice-outlier with the endpoints split over two zones "
                                 "(the baseline of sluice-failover)", ("sluice",), OUTLIER,
                                 zones=2),
    "sluice-failover": Variant("sluice.wasm, [outlier] and [failover] (defaults, local zone "
                               "zone-a), the endpoints split over two zones: every request "
                               "drawn to a zone, its endpoints picked within it; each "
                               "attempt's rate-limit headers read", ("sluice",),
                               OUTLIER + FAILOVER, zones=2),
    "sluice-retry": Variant("sluice.wasm, [retry] only (defaults): the zone's retry budget "
                            "read and the router's retry headers set per request, each "
                            "attempt deposited by the per-attempt instance `sluice.attempt` "
                            "the render puts on the cluster",
                            ("sluice",), RETRY),
    "sluice-every": Variant("sluice.wasm with every section: [tokens], [breaker], [outlier], "
                            "[retry] and [failover] (local zone zone-a), the endpoints split "
                            "over two zones, cluster as rendered (override_host, per-attempt "
                            "instance)", ("sluice",), TOKENS + BREAKER + OUTLIER + RETRY + FAILOVER,
                            zones=2),
    "sluice-all": Variant("sluice.wasm, [tokens], [breaker] and [outlier] (defaults), with "
                          "override_host and the per-attempt instance `sluice.attempt` on the "
                          "cluster, as rendered", ("sluice",), TOKENS + BREAKER + OUTLIER),
    "sluice-all-noattempt": Variant("sluice-all with the cluster's per-attempt instance (and "
                                    "its upstream filter chain) removed from the rendered "
                                    "bootstrap: picking without learning from attempts; a "
                                    "profiling split, not a configuration to run",
                                    ("sluice",), TOKENS + BREAKER + OUTLIER,
                                    attempt_filter=False),
    "sluice-all-noopattempt": Variant("sluice-all with the cluster's per-attempt instance "
                                      "replaced by sluice_noop.wasm (a filter that does "
                                      "nothing, in its own VM): the cost of running any wasm "
                                      "filter once per attempt; a profiling split",
                                      ("sluice",), TOKENS + BREAKER + OUTLIER,
                                      attempt_module="sluice_noop"),
    "chain": Variant("sluice_tokens.wasm then sluice_breaker.wasm, [tokens] and [breaker]",
                     ("sluice_tokens", "sluice_breaker"), TOKENS + BREAKER),
    "tokens": Variant("sluice_tokens.wasm alone, [tokens]", ("sluice_tokens",), TOKENS),
    "breaker": Variant("sluice_breaker.wasm alone, [breaker]", ("sluice_breaker",), BREAKER),
}

DEFAULT_VARIANTS = "none,noop,noop-body,local_ratelimit,sluice-tokens,sluice-breaker,sluice-both,chain"

# Modules not built by every checkout yet, and why a missing one is skipped.
PREFOLD = ("the separate filters are folded into sluice.wasm: build them from a commit "
           "before the fold and run VARIANT@LABEL with --build LABEL=DIR (see the docstring)")
WHY_MISSING = {
    "sluice": "the one module is not built (crate filters/sluice, then `cargo xtask build`)",
    "sluice_tokens": PREFOLD,
    "sluice_breaker": PREFOLD,
}

RATIO_UNIT = "noop-body"

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def http_filters(doc: dict) -> list:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]


def wasm_entry(module: str, wasm: Path, configuration: str) -> dict:
    """A wasm filter with the options ``sluice render envoy`` gives sluice's."""
    from lab import wasm_filter

    entry = wasm_filter(module, wasm, configuration, failure_policy="FAIL_CLOSED")
    entry["typed_config"]["config"]["allow_on_headers_stop_iteration"] = True
    return entry


def module_files(name: str, wasm_dir: Path, builds: dict[str, Path]) -> list[Path]:
    """The .wasm files of variant ``name`` (``VARIANT`` or ``VARIANT@LABEL``)."""
    base, _, label = name.partition("@")
    variant = VARIANTS[base]
    if label and not builds[label].is_dir():
        return [builds[label]]
    directory = builds[label] if label else wasm_dir
    return [directory / f"{m}.wasm" for m in variant.modules]


UPSTREAM_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def policy_for(name: str) -> str:
    """The policy ``sluice render envoy`` is given for variant ``name``."""
    variant = VARIANTS[name.partition("@")[0]]
    base = POLICY_TWO_ZONES if variant.zones == 2 else POLICY_BASE
    return base + variant.sections


def zone_endpoints(name: str, addresses: list[str]) -> dict[tuple[str, str], list[str]]:
    """``--endpoints`` of variant ``name``: every simulator in zone-a, or
    alternately in zone-a and zone-b."""
    if VARIANTS[name.partition("@")[0]].zones == 2:
        return {("primary", "zone-a"): addresses[0::2], ("primary", "zone-b"): addresses[1::2]}
    return {("primary", "zone-a"): addresses}


def attempt_file(name: str, wasm_dir: Path, builds: dict[str, Path]) -> Path:
    """The .wasm file of variant ``name``'s ``attempt_module``."""
    base, _, label = name.partition("@")
    directory = builds[label] if label and builds[label].is_dir() else wasm_dir
    return directory / f"{VARIANTS[base].attempt_module}.wasm"


def bootstrap_for(name: str, rendered: str, wasm_dir: Path,
                  builds: dict[str, Path]) -> str:
    """The bootstrap rendered from variant ``name``'s policy, with the
    variant's filters before the router in place of the render's.

    Listener, routes and clusters stay as rendered: for a policy with
    [outlier] the cluster load-balances with ``override_host`` and runs the
    per-attempt instance ``sluice.attempt`` (given here the variant's module
    file and ``FAIL_CLOSED``, like the listener's; or removed, for a variant
    without ``attempt_filter``). Without [outlier] every variant's cluster is
    the same. The filters get the policy text as the render wrote it (the
    zone's endpoints replaced by the simulators'), which [outlier] needs to
    know the endpoints it picks among.
    """
    variant = VARIANTS[name.partition("@")[0]]
    doc = yaml.safe_load(rendered)
    chain = http_filters(doc)
    policy = next((f["typed_config"]["config"]["configuration"]["value"] for f in chain
                   if f.get("typed_config", {}).get("@type") == WASM_TYPE), None)
    if policy is None:
        raise RuntimeError("the render emitted no sluice.wasm to read the rendered policy from")
    # The render emits sluice's module even for a policy with no capability
    # (it routes by model); the bench's one backend needs none of it. The
    # render's gzip compressor goes too: wrk asks for no encoding, and every
    # variant is measured against the same bare chain.
    chain[:] = [f for f in chain
                if f.get("typed_config", {}).get("@type") != WASM_TYPE
                and f.get("name") != "envoy.filters.http.compressor"]
    if [f.get("name") for f in chain] != ["envoy.filters.http.router"]:
        raise RuntimeError(f"the base bootstrap should hold only the router, not {chain}")
    files = module_files(name, wasm_dir, builds)
    added = list(variant.native)
    for module, wasm in zip(variant.modules, files):
        added.append(wasm_entry(module, wasm, policy))
    chain[:0] = added
    for cluster in doc["static_resources"]["clusters"]:
        options = cluster.get("typed_extension_protocol_options", {}).get(UPSTREAM_OPTIONS)
        attempt = [f for f in (options or {}).get("http_filters", [])
                   if f.get("typed_config", {}).get("@type") == WASM_TYPE]
        if not attempt:
            continue
        if not variant.attempt_filter:
            del cluster["typed_extension_protocol_options"]
            continue
        if variant.modules != ("sluice",):
            raise RuntimeError(f"variant {name}: the render put sluice.wasm on cluster "
                               f"{cluster['name']}, but the variant runs {variant.modules}")
        config = attempt[0]["typed_config"]["config"]
        config["vm_config"]["code"]["local"]["filename"] = str(files[0])
        config["failure_policy"] = "FAIL_CLOSED"
        if config["configuration"]["value"] != policy:
            raise RuntimeError("the render gave the attempt instance another policy text")
        if variant.attempt_module:
            module = variant.attempt_module
            attempt[0].clear()
            attempt[0].update(wasm_entry(module, attempt_file(name, wasm_dir, builds), ""))
    return yaml.safe_dump(doc, sort_keys=False)


def check_variants(names: list[str], wasm_dir: Path, builds: dict[str, Path]) -> dict[str, str]:
    """Why each runnable-but-unbuilt variant is skipped; raises on a bad name."""
    skipped = {}
    for name in names:
        base, _, label = name.partition("@")
        if base not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        if label:
            if label not in builds:
                raise SystemExit(f"variant {name}: no --build {label}=WASM")
            if not builds[label].exists():
                raise SystemExit(f"variant {name}: --build {label}={builds[label]} does not exist")
            if not builds[label].is_dir() and len(VARIANTS[base].modules) != 1:
                raise SystemExit(f"variant {name}: a .wasm file replaces the module of a "
                                 f"variant with exactly one, and {base} has "
                                 f"{len(VARIANTS[base].modules)}: pass a directory")
        needed = module_files(name, wasm_dir, builds)
        if VARIANTS[base].attempt_module:
            needed.append(attempt_file(name, wasm_dir, builds))
        missing = [p for p in needed if not p.is_file()]
        if missing:
            why = WHY_MISSING.get(missing[0].stem, "run `cargo xtask build` (or pass --build)")
            if "@" in name:
                why = f"not in --build {label}"
            skipped[name] = f"{missing[0]} is missing: {why}"
    return skipped


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
    parser.add_argument("--endpoints", type=int, default=4,
                        help="llm-sim upstreams in the backend's one zone, for every variant "
                             "([outlier] needs at least 2 to pick among; default 4)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)} "
                             f"(default {DEFAULT_VARIANTS})")
    parser.add_argument("--build", action="append", default=[], metavar="LABEL=PATH",
                        help="another build, run as variant VARIANT@LABEL: a .wasm file "
                             "(one-module variants) or a directory of .wasm files")
    parser.add_argument("--target-dir", type=Path, metavar="DIR",
                        help="cargo's target directory holding wasm32-wasip1/release and "
                             "native (default $SLUICE_TARGET_DIR, else target/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "envoy-cpu.md")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the run's raw numbers here, as JSON")
    args = parser.parse_args()
    if args.target_dir:
        os.environ["SLUICE_TARGET_DIR"] = str(args.target_dir.resolve())
    from lab import Envoy, LlmSim, install_cleanup_handlers, render_envoy
    from lab import paths

    builds = {k: Path(v) for k, v in (b.split("=", 1) for b in args.build)}
    requested = [v for v in args.variants.split(",") if v]
    skipped = check_variants(requested, paths.WASM_DIR, builds)
    for v, why in skipped.items():
        print(f"skipping {v}: {why}", file=sys.stderr)
    variants = [v for v in requested if v not in skipped]
    if not variants:
        print("no variant left to run", file=sys.stderr)
        return 1
    ensure_wrk()
    install_cleanup_handlers()
    machine = {"nproc": os.cpu_count() or 0, "load_before": os.getloadavg()}
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    run_dir = paths.LOGS_DIR / "bench-envoy-cpu"
    shutil.rmtree(run_dir, ignore_errors=True)
    results: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    requests: dict[tuple[str, str], int] = {}
    failed: dict[str, str] = {}
    sluice_stats: dict[str, dict[str, int]] = {}
    started = []
    try:
        # 100 chunks per stream, each written as it is made.
        sims = []
        for i in range(args.endpoints):
            sim = LlmSim(zone="zone-a", models=["sim-large"], instance=f"bench-{i}",
                         run_dir=run_dir, seed=i,
                         extra_args=["--ttft-ms", "0", "--ttft-per-prompt-token-us", "0",
                                     "--tokens-per-sec", "20000", "--output-tokens", "100",
                                     "--quiet"])
            started.append(sim)
            sims.append(sim)
        renders: dict[str, str] = {}
        envoys = {}
        for v in variants:
            # A variant whose render or Envoy fails is reported as failed,
            # not dropped: the others still run.
            try:
                policy = policy_for(v)
                if policy not in renders:
                    policy_file = workdir / f"policy-{len(renders)}.toml"
                    policy_file.write_text(policy)
                    renders[policy] = render_envoy(
                        policy_file, wasm_dir=paths.WASM_DIR,
                        endpoints=zone_endpoints(v, [s.listen for s in sims]))
                envoy = Envoy(bootstrap_for(v, renders[policy], paths.WASM_DIR, builds),
                              run_dir, name=f"envoy-{v.replace('@', '-')}", concurrency=1,
                              log_level="warning", component_log_level="wasm:warning")
            except Exception as err:  # noqa: BLE001 (any failure is the variant's result)
                failed[v] = " ".join(str(err).split())[:400]
                print(f"variant {v} failed to start: {failed[v]}", file=sys.stderr)
                continue
            started.append(envoy)
            envoys[v] = envoy
        variants = [v for v in variants if v in envoys]
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
                    requests[key] = requests.get(key, 0) + done
                    print(f"round {r + 1} {key[1]:6} {v:20} {done:7} req  "
                          f"{per_request:8.1f} us/req  non-2xx {bad}", flush=True)
        # What sluice counted, to show what ran: attempts seen by the
        # per-attempt instance, endpoints picked, ejections, panics.
        for v, envoy in envoys.items():
            counted = {k: n for k, n in envoy.stats("sluice").items()
                       if re.search(r"attempt|outlier", k)}
            if counted:
                sluice_stats[v] = counted
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    machine["load_after"] = os.getloadavg()
    files = {v: module_files(v, paths.WASM_DIR, builds)
             + ([attempt_file(v, paths.WASM_DIR, builds)]
                if VARIANTS[v.partition("@")[0]].attempt_module else [])
             for v in requested if v not in skipped}
    # The report lists a variant that failed to start with the skipped ones,
    # its reason saying so.
    not_run = {**skipped, **{v: f"FAILED to start: {why}" for v, why in failed.items()}}
    write_report(args, requested, not_run, files, results, errors, machine, sluice_stats)
    if args.json:
        write_json(args, requested, skipped, failed, files, results, errors, requests,
                   machine, sluice_stats)
    return 0 if not any(errors.values()) and not failed else 1


MODES = {"json": "non-streaming (1 KiB JSON)", "stream": "streaming (100 SSE chunks)"}


def added_over_none(results, variant: str, mode: str) -> float | None:
    """Median µs/request of ``variant`` minus that of ``none``, same run."""
    samples, bare = results.get((variant, mode)), results.get(("none", mode))
    if not samples or not bare:
        return None
    return statistics.median(samples) - statistics.median(bare)


def ratio(results, variant: str, mode: str) -> str:
    added, unit = added_over_none(results, variant, mode), added_over_none(results, RATIO_UNIT, mode)
    if variant == "none" or added is None or unit is None or unit <= 0:
        return "–"
    return f"{added / unit:.2f}×"


# Pairs of variants whose ratio a target is stated on: (with, without, what).
PAIRS = (
    ("sluice-all", "sluice-both", "[outlier] added to [tokens] + [breaker]"),
    ("sluice-outlier", "sluice-none-enabled", "[outlier] alone, over the module with no section"),
    ("sluice-all-noattempt", "sluice-both",
     "[outlier] added, per-attempt instance removed (profiling split)"),
    ("sluice-failover", "sluice-outlier-2z", "[failover] added to [outlier], two zones"),
)

# The issue's target on PAIRS' ratios.
PAIR_TARGET = 1.3


def median_of(results, variant: str, mode: str) -> float | None:
    samples = results.get((variant, mode))
    return statistics.median(samples) if samples else None


def pair_ratios(results, a: str, b: str, mode: str) -> dict | None:
    """Both definitions of ``a`` over ``b``, from medians and round by round.

    total: a / b (Envoy's whole CPU per request); added: (a − none) /
    (b − none) (the CPU the filters add over Envoy with only the router).
    Rounds are interleaved, so round r of a, b and none ran minutes apart at
    most: the per-round ratios show how far the pairing alone moves.
    """
    sa, sb, sn = (results.get((v, mode)) for v in (a, b, "none"))
    if not sa or not sb:
        return None
    out = {"a": statistics.median(sa), "b": statistics.median(sb),
           "total": statistics.median(sa) / statistics.median(sb),
           "total_rounds": [x / y for x, y in zip(sa, sb)]}
    if sn:
        none = statistics.median(sn)
        out["none"] = none
        if out["b"] - none > 0:
            out["added"] = (out["a"] - none) / (out["b"] - none)
        out["added_rounds"] = [(x - n) / (y - n) for x, y, n in zip(sa, sb, sn) if y - n > 0]
    return out


def ratio_range(values: list[float]) -> str:
    """Round-by-round ratios as ``median, min–max``."""
    if not values:
        return "–"
    return f"{statistics.median(values):.2f}, {min(values):.2f}–{max(values):.2f}"


def pair_lines(results) -> list[str]:
    """The section on PAIRS, for the pairs that ran."""
    rows = []
    for a, b, what in PAIRS:
        for mode, title in MODES.items():
            r = pair_ratios(results, a, b, mode)
            if r is None:
                continue
            added = f"{r['added']:.2f}×" if "added" in r else "–"
            none = f"{r['none']:.1f}" if "none" in r else "–"
            met = (f"{'yes' if r['total'] <= PAIR_TARGET else 'no'} / "
                   + ("–" if "added" not in r else
                      "yes" if r["added"] <= PAIR_TARGET else "no"))
            rows.append(f"| {a} / {b} | {title} | {r['a']:.1f} | {r['b']:.1f} | {none} | "
                        f"{r['total']:.2f}× ({ratio_range(r['total_rounds'])}) | "
                        f"{added} ({ratio_range(r.get('added_rounds', []))}) | {met} |")
    if not rows:
        return []
    lines = ["## Ratios of pairs (target ≤ "
             f"{PAIR_TARGET}× for [outlier])", "",
             "- total = with / without: Envoy's whole CPU per request, medians over rounds;",
             "- added = (with − none) / (without − none): the CPU the filters add over "
             "Envoy with only the router, medians over rounds;",
             "- in brackets, the same ratio round by round, as median, min–max (rounds are "
             "interleaved, so each round's pair ran under about the same machine load: the "
             "median of the per-round ratios is the paired estimate, less moved by load "
             "drifting between rounds than the ratio of medians).", "",
             "| with / without | workload | with, µs | without, µs | none, µs | total | "
             f"added | ≤ {PAIR_TARGET}×? (total / added) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += rows
    lines.append("")
    for a, b, what in PAIRS:
        if any(pair_ratios(results, a, b, m) for m in MODES):
            lines.append(f"- {a} / {b}: {what}")
    lines.append("")
    split = [m for m in MODES
             if all(median_of(results, v, m) is not None
                    for v in ("sluice-all", "sluice-all-noattempt", "sluice-both"))]
    if split:
        lines += ["Where [outlier]'s µs go (medians, µs of Envoy CPU per request):", "",
                  "| workload | sluice-all − sluice-both | of which the per-attempt instance "
                  "(all − all-noattempt) | the rest: picking, override_host, the request "
                  "instance's outlier work (all-noattempt − both) |",
                  "|---|---:|---:|---:|"]
        for m in split:
            al, na, bo = (median_of(results, v, m)
                          for v in ("sluice-all", "sluice-all-noattempt", "sluice-both"))
            lines.append(f"| {MODES[m]} | {al - bo:+.1f} | {al - na:+.1f} | {na - bo:+.1f} |")
        lines.append("")
    floor = [m for m in split if median_of(results, "sluice-all-noopattempt", m) is not None]
    if floor:
        lines += ["The per-attempt instance's µs, split again (medians):", "",
                  "| workload | per-attempt instance (all − all-noattempt) | any wasm filter "
                  "per attempt: sluice_noop there (all-noopattempt − all-noattempt) | sluice's "
                  "own attempt work above that floor (all − all-noopattempt) |",
                  "|---|---:|---:|---:|"]
        for m in floor:
            al, na, nop = (median_of(results, v, m) for v in
                           ("sluice-all", "sluice-all-noattempt", "sluice-all-noopattempt"))
            lines.append(f"| {MODES[m]} | {al - na:+.1f} | {nop - na:+.1f} | {al - nop:+.1f} |")
        lines.append("")
    return lines


def summarize_stats(counted: dict[str, int]) -> str:
    """sluice's attempt and outlier counters in one line: totals of each
    metric, and the per-endpoint ``picked`` counts."""
    totals: dict[str, int] = {}
    picked = []
    for name, n in sorted(counted.items()):
        metric = name.rsplit(".", 1)[-1]
        totals[metric] = totals.get(metric, 0) + n
        if metric == "picked":
            picked.append(n)
    parts = [f"{k} {n}" for k, n in totals.items() if k != "picked"]
    if picked:
        parts.append(f"picked per endpoint {'/'.join(map(str, picked))}")
    return ", ".join(parts)


def describe_file(path: Path) -> str:
    """A module file as the report names it: path, size, build time."""
    st = path.stat()
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(st.st_mtime))
    return f"`{path}` ({st.st_size:,} B, built {built})"


def command_line() -> str:
    """How this script was run, as a shell command from the workspace root."""
    python = os.path.relpath(sys.executable, Path.cwd())
    if python.startswith(".."):
        python = sys.executable
    return (f"PYTHONPATH=envoy {shlex.quote(python)} benches/envoy_cpu.py "
            f"{shlex.join(sys.argv[1:])}").rstrip()


def write_json(args, requested, skipped, failed, files, results, errors, requests,
               machine, sluice_stats) -> None:
    """The run's raw numbers: every round, not only the medians."""
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "machine": {"nproc": machine["nproc"], "load_before": list(machine["load_before"]),
                    "load_after": list(machine["load_after"])},
        "settings": {"rounds": args.rounds, "seconds": args.seconds,
                     "connections": args.connections, "endpoints": args.endpoints,
                     "envoy_concurrency": 1},
        "modes": MODES,
        "ratio_unit": RATIO_UNIT,
        "variants": [
            {"name": v, "what": VARIANTS[v.partition("@")[0]].what,
             "files": [{"path": str(f), "bytes": f.stat().st_size,
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                               time.gmtime(f.stat().st_mtime))}
                       for f in files.get(v, [])],
             "skipped": skipped.get(v),
             "failed": failed.get(v),
             "counters": sluice_stats.get(v, {}),
             "modes": {m: {"us_per_request_rounds": results.get((v, m), []),
                           "requests": requests.get((v, m), 0),
                           "non_2xx": errors.get((v, m), 0)}
                       for m in MODES}}
            for v in requested],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")


def write_report(args, requested, skipped, files, results, errors, machine,
                 sluice_stats) -> None:
    variants = [v for v in requested if v not in skipped]
    command = command_line()
    load = " → ".join(" ".join(f"{x:.2f}" for x in machine[k])
                      for k in ("load_before", "load_after"))
    lines = ["# Envoy CPU per request", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with", "",
             "```", command, "```", "",
             f"Machine: {machine['nproc']} CPUs (nproc), load average {load} "
             "(1, 5, 15 min; before → after). "
             f"wrk -t1 -c{args.connections}, {args.rounds} interleaved round(s) of "
             f"{args.seconds} s per variant and workload, Envoy 1.40 `--concurrency 1`, "
             f"{args.endpoints} llm-sim(s) in the backend's zone for every variant; µs of "
             "Envoy CPU per completed request, medians over rounds. Compare "
             "within a run: absolute numbers move with the machine.", "",
             *pair_lines(results),
             f"## Added CPU as a ratio of {RATIO_UNIT}'s", "",
             f"(variant − none) / ({RATIO_UNIT} − none), same run.", "",
             "| variant | " + " | ".join(MODES.values()) + " |",
             "|---|" + "---:|" * len(MODES)]
    for v in requested:
        if v == "none":
            continue
        cells = [("failed" if skipped[v].startswith("FAILED") else "skipped")
                 if v in skipped else ratio(results, v, m) for m in MODES]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(not (added_over_none(results, RATIO_UNIT, m) or 0) > 0 for m in MODES):
        lines += [f"No ratio where {RATIO_UNIT} was not run or added no CPU over none.", ""]
    if skipped:
        lines += ["Not run:", ""] + [f"- {v}: {why}" for v, why in skipped.items()] + [""]
    lines += ["Variants:", ""]
    lines += [f"- `{v}`: {VARIANTS[v.partition('@')[0]].what}"
              + (f" (build `{v.partition('@')[2]}`)" if "@" in v else "")
              + "".join(f"; {describe_file(f)}" for f in files.get(v, []))
              for v in requested]
    lines.append("")
    for mode, title in MODES.items():
        lines += [f"## {title}", "",
                  f"| variant | µs/request | rounds' range | added over none | "
                  f"added / {RATIO_UNIT}'s added | non-2xx |",
                  "|---|---:|---:|---:|---:|---:|"]
        for v in variants:
            samples = results.get((v, mode))
            if not samples:
                continue
            added = added_over_none(results, v, mode)
            added_text = f"{added:+.1f}" if added is not None else "–"
            spread = f"{min(samples):.1f}–{max(samples):.1f}"
            lines.append(f"| {v} | {statistics.median(samples):.1f} | {spread} | {added_text} | "
                         f"{ratio(results, v, mode)} | {errors.get((v, mode), 0)} |")
        lines.append("")
    if sluice_stats:
        lines += ["What sluice counted over the whole run (attempt and outlier counters, "
                  "from Envoy's /stats):", ""]
        for v, counted in sluice_stats.items():
            lines.append(f"- {v}: {summarize_stats(counted)}")
        lines.append("")
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
