"""Failover drills: one backend over zones of two llm-sim endpoints each,
Envoy in zone-a (``--node-zone zone-a``), 8 closed-loop ``openai`` SDK
clients alternating streamed and whole answers (one drill with the
``anthropic`` SDK against an Anthropic backend), a zone misbehaving — under
sluice (``[outlier]`` + ``[failover]``) and, on the same traffic in the same
run, under Envoy's own zone failover (``sluice render envoy
--native-failover``: zones as priorities, outlier detection, ``/health``
checks, retries across priorities).

What is measured, for both:

- *failed*: SDK calls that did not get a 200 (what the application sees);
- *moved in*: seconds from the fault to the last upstream attempt a sick
  zone received, probes excluded (the attempts are Envoy's router log, every
  retry included; a probe is a request sluice answered with
  ``x-sluice-zone: …; reason=probe``, read from Envoy's access log);
- *p99 wait*: time to the first token, or to the whole answer when not
  streamed, over a window;
- 429s the clients saw and those the simulators sent (``rejected_quota``);
- fail-backs: sluice's ``sluice_failover.primary.zone-a.failbacks``; for
  both, how often zone-a's share of attempts came back (in 0.5 s bins);
- upstream attempts per SDK call.

Native failover, for reference (one run on this 2-core machine, load ≈ 2.5):
0 failed and moved in 0.33 s on the 503 outage; p99 wait 3.5× the healthy
one with 500 ms added (it never moves); no client 429 on a spent or running
out quota, at 2.3 and 1.7 upstream attempts per call (every request tries
the refusing zone first); no failure and no return to zone-a while it flaps
(its endpoints stay ejected for 30 s); all traffic on region-2 0.25 s after
region-1 died.

The drills:

- zone-a answers 503 to every inference while ``/health`` stays green.
  Target for sluice: 0 failed, moved in ≤ 0.1 s (asserted: ≤ 1 s);
- zone-a adds 500 ms to every request (no fixed timeout in the policy).
  Target: p99 wait of the requests started ≥ 2 s after the fault within
  1.2× the healthy p99 (asserted: 1.5×, probes excluded); natively nothing
  moves;
- zone-a's provider quota is spent (429 with the provider's rate-limit
  headers, reset a minute away), through the ``openai`` SDK and through the
  ``anthropic`` SDK; and a variant where its remaining quota only falls
  toward zero (75% used when the drill starts, no 429 yet). Target: no 429
  reaches a client while zone-b has capacity; in the falling variant sluice
  moves before the first refusal (0 refused by the simulators);
- zone-a flaps, 503 and healthy in turns of 2 s, for 20 s (the issue's
  drill runs 60 s; scaled down to keep the file near 4 minutes on 2 busy
  cores). Target: at most one fail-back per ``failback_after`` (30 s), and
  no more failures than the steady outage drill;
- region loss: zone-a and zone-b (region-1) die, zone-c (region-2) lives.
  Target: every request on region-2 within 2 s. Streams in flight when
  their server dies are cut: they fail under either, and are counted in
  ``failed`` but not in ``failed_after_fault``.

Results go to ``target/drills/failover.json`` and a table is printed at the
end. The sluice side asserts its targets (with the looser bounds above);
the native side asserts nothing: it is the reference.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import drills, paths
from lab.policies import REGIONS_LAYOUT, zones
from lab.procs import wait_until

SECTIONS = """
[outlier]
jitter = "0%"

[failover]
local_zone = "auto"
"""
NODE_ZONE = ("--node-zone", "zone-a")
VARIANTS = {"sluice": NODE_ZONE, "native": ("--native-failover", *NODE_ZONE)}
TWO_ZONES = [("zone-a", "region-1", 2), ("zone-b", "region-1", 2)]
CLIENTS = 8
MAX_TOKENS = 8
WARMUP = 3.0
AFTER = 6.0
# The router's line per upstream attempt (its start as Unix seconds, so a
# fault's time can be compared), and the access log's line per request.
UPSTREAM_FORMAT = "%START_TIME(%s.%3f)% %REQ(X-REQUEST-ID)% %UPSTREAM_HOST% %RESPONSE_CODE%\n"
ACCESS_FORMAT = "%REQ(X-REQUEST-ID)% %RESP(X-SLUICE-ZONE)%\n"
RESULTS: dict[str, dict[str, dict]] = {}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = paths.TARGET_DIR / "drills" / "failover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"drills": RESULTS}, indent=2, sort_keys=True))
    print(f"\nfailover drills → {out}")
    for drill, by_variant in RESULTS.items():
        print(f"\n  {drill:<40} {'sluice':>12} {'native':>12}")
        metrics = sorted({m for v in by_variant.values() for m in v})
        for m in metrics:
            row = [fmt(by_variant.get(v, {}).get(m)) for v in ("sluice", "native")]
            print(f"    {m:<38} {row[0]:>12} {row[1]:>12}")


@dataclass
class Attempt:
    """One upstream attempt, as Envoy's router logged it."""

    t: float                # Unix seconds when it started
    request: str            # x-request-id
    zone: str | None        # the zone of the host it went to
    status: str


@dataclass
class Setup:
    lab: object
    sims: dict[str, list]           # zone → its simulators
    upstream_log: Path
    access_log: Path
    zone_of: dict[str, str] = field(default_factory=dict)   # host:port → zone

    def all_sims(self) -> list:
        return [s for sims in self.sims.values() for s in sims]

    def set_zone(self, zone: str, **faults) -> float:
        """Sets the faults on every simulator of ``zone``; the Unix time
        once all of them have them."""
        for sim in self.sims[zone]:
            sim.set_faults(**faults)
        return time.time()

    def observed(self) -> tuple[list[Attempt], set[str]]:
        """Every upstream attempt, and the ids of the requests sluice
        answered as probes."""
        attempts = []
        for line in drills.flushed(self.upstream_log).splitlines():
            parts = line.split(" ")
            if len(parts) != 4:
                continue
            t, request, host, status = parts
            try:
                started = float(t)
            except ValueError:
                continue
            attempts.append(Attempt(started, request, self.zone_of.get(host), status))
        probes = set()
        for line in drills.flushed(self.access_log).splitlines():
            request, _, zone_header = line.partition(" ")
            # A probe served where it was sent, or retried elsewhere
            # (`…; reason=retry; first=zone-a/probe`).
            if "reason=probe" in zone_header or "/probe" in zone_header:
                probes.add(request)
        return attempts, probes


def drill_lab(lab_factory, tmp_path: Path, variant: str, *, layout=None,
              sections: str = SECTIONS, api: str | None = None) -> Setup:
    layout = TWO_ZONES if layout is None else layout
    policy = tmp_path / "drill.toml"
    policy.write_text(zones("failover-drill", sections, layout=layout, api=api))
    upstream_log, access_log = tmp_path / "upstream.log", tmp_path / "access.log"
    lab = lab_factory(policy=policy, render_args=VARIANTS[variant],
                      bootstrap_hook=drills.with_upstream_log(
                          upstream_log, UPSTREAM_FORMAT,
                          access_log=access_log, access_format=ACCESS_FORMAT))
    sims = {zone: lab.endpoint_sims("primary", zone) for zone, _, _ in layout}
    if variant == "native":
        # A first health check can time out while Envoy's main thread is
        # still compiling sluice.wasm: start once every endpoint passed one.
        wait_until(lambda: "failed_active_hc" not in lab.envoy.admin("/clusters").text,
                   10.0, interval=0.1, what="every endpoint healthy")
    setup = Setup(lab, sims, upstream_log, access_log)
    setup.zone_of = {sim.listen: zone for zone, zs in sims.items() for sim in zs}
    return setup


def traffic(setup: Setup, seconds: float, events, *, sdk: str = "openai") -> drills.Drill:
    return drills.run(setup.lab.base_url, seconds=seconds, clients=CLIENTS,
                      max_tokens=MAX_TOKENS, events=events, tenant="failover-drill",
                      stream=None, sdk=sdk)


def moved_in(attempts: list[Attempt], probes: set[str], sick: set[str],
             fault: float) -> float:
    """Seconds from ``fault`` to the last attempt, probes excluded, that went
    to one of the ``sick`` zones (0: none after the fault)."""
    last = max((a.t for a in attempts
                if a.zone in sick and a.t >= fault and a.request not in probes), default=None)
    return 0.0 if last is None else round(last - fault, 3)


def share(attempts: list[Attempt], probes: set[str], zone: str, start: float,
          end: float) -> float | None:
    """``zone``'s share of the attempts (probes excluded) started in [start, end)."""
    window = [a for a in attempts if start <= a.t < end and a.request not in probes]
    if not window:
        return None
    return round(sum(a.zone == zone for a in window) / len(window), 3)


def returns(attempts: list[Attempt], probes: set[str], zone: str, start: float,
            end: float, bin_s: float = 0.5) -> int:
    """How often ``zone`` got traffic back: bins (of ``bin_s``) where its
    share rose to half or more after a bin under a fifth."""
    count, away = 0, False
    t = start
    while t < end:
        s = share(attempts, probes, zone, t, t + bin_s)
        if s is not None:
            if s < 0.2:
                away = True
            elif s >= 0.5 and away:
                count += 1
                away = False
        t += bin_s
    return count


def failed(samples, since: float = 0.0) -> list:
    return [s for s in samples if s.start >= since and (s.status != 200 or s.error)]


def common(setup: Setup, d: drills.Drill, attempts, probes, fault_offset: float) -> dict:
    """The numbers every drill reports."""
    after = [s for s in d.samples if s.start >= fault_offset]
    return {
        "sdk_calls": len(d.samples),
        "failed": len(failed(d.samples)),
        "failed_after_fault": len(failed(after)),
        "client_429s": sum(1 for s in d.samples if s.status == 429),
        # When the first failures started, and what they were.
        "first_failures": [(round(s.start - fault_offset, 2), s.status, s.error)
                           for s in failed(d.samples)[:3]],
        "upstream_attempts_per_call": round(
            sum(1 for a in attempts if a.request not in probes) / max(1, len(d.samples)), 3),
        "probes": len(probes),
    }


def sluice_failbacks(setup: Setup, zone: str = "zone-a") -> int | None:
    stats = setup.lab.envoy.stats(filter="sluice_failover")
    suffix = f"sluice_failover.primary.{zone}.failbacks"
    return next((v for k, v in stats.items() if k.endswith(suffix)), None)


def record(drill: str, variant: str, result: dict) -> dict:
    RESULTS.setdefault(drill, {})[variant] = result
    return result


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_zone_outage(lab_factory, tmp_path, variant):
    """zone-a answers 503 to every inference; its /health stays green."""
    setup = drill_lab(lab_factory, tmp_path, variant)
    d = traffic(setup, WARMUP + AFTER,
                [(WARMUP, lambda: setup.set_zone("zone-a", fixed_status=503))])
    fault = d.marks[f"t={WARMUP}"]
    attempts, probes = setup.observed()
    result = record("zone-a 503", variant, common(setup, d, attempts, probes, WARMUP) | {
        "moved_in_s": moved_in(attempts, probes, {"zone-a"}, fault),
        "zone_a_share_before": share(attempts, probes, "zone-a", fault - 2.0, fault),
        "zone_a_share_from_1s": share(attempts, probes, "zone-a", fault + 1.0, fault + AFTER),
    })
    if variant == "sluice":
        assert result["failed"] == 0, result
        # Target 0.1 s; a loaded 2-core machine gets ten times that.
        assert result["moved_in_s"] <= 1.0, result


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_zone_latency(lab_factory, tmp_path, variant):
    """zone-a adds 500 ms to every request; nothing fails."""
    setup = drill_lab(lab_factory, tmp_path, variant)
    # A longer healthy window: for the baseline p99, and for zone-b's
    # reference (its first tokens over 30 s must rest on [outlier]'s
    # min_samples, 5, and a standby zone sees one probe a second).
    warmup = WARMUP + 5.0
    d = traffic(setup, warmup + AFTER,
                [(warmup, lambda: setup.set_zone("zone-a", added_latency_ms=500))])
    fault = d.marks[f"t={warmup}"]
    attempts, probes = setup.observed()
    baseline = drills.p99([s.wait for s in d.samples if 1.0 <= s.start < warmup])
    late = [s for s in d.samples if s.start >= warmup + 2.0]
    after_all = drills.p99([s.wait for s in late])
    after = drills.p99([s.wait for s in late if s.reason != "probe"])
    result = record("zone-a +500ms", variant, common(setup, d, attempts, probes, warmup) | {
        "p99_wait_ms_before": round(baseline * 1000),
        "p99_wait_ms_from_2s": round(after * 1000) if after is not None else None,
        "p99_wait_ms_from_2s_with_probes": round(after_all * 1000) if after_all else None,
        "ratio": round(after / baseline, 2) if after is not None else None,
        "zone_a_share_from_2s": share(attempts, probes, "zone-a", fault + 2.0, fault + AFTER),
    })
    if variant == "sluice":
        assert result["failed"] == 0, result
        # Target 1.2× the healthy p99; 1.5× for a loaded machine.
        assert after <= 1.5 * baseline, result


QUOTA_DRILLS = {
    # Spent: every answer 429 with remaining 0, reset a minute away.
    "spent": {"quota_requests": 100, "quota_requests_used": 100, "quota_window_s": 60},
    # 75% used: remaining falls from 50 per endpoint; no 429 until it is gone.
    "falling": {"quota_requests": 200, "quota_requests_used": 150, "quota_window_s": 60},
}


@pytest.mark.parametrize("variant", ["sluice", "native"])
@pytest.mark.parametrize("kind,sdk", [("spent", "openai"), ("falling", "openai"),
                                      ("spent", "anthropic")])
def test_zone_quota(lab_factory, tmp_path, kind, sdk, variant):
    """zone-a's provider quota is spent, or running out; zone-b has room."""
    setup = drill_lab(lab_factory, tmp_path, variant,
                      api="anthropic" if sdk == "anthropic" else None)
    d = traffic(setup, WARMUP + AFTER,
                [(WARMUP, lambda: setup.set_zone("zone-a", **QUOTA_DRILLS[kind]))], sdk=sdk)
    fault = d.marks[f"t={WARMUP}"]
    attempts, probes = setup.observed()
    sim_stats = [s.stats() for s in setup.sims["zone-a"]]
    result = record(f"zone-a quota {kind} ({sdk})", variant,
                    common(setup, d, attempts, probes, WARMUP) | {
        "refused_by_zone_a": sum(s["rejected_quota"] for s in sim_stats),
        "zone_a_remaining_at_end": [s["quota_requests_remaining"] for s in sim_stats],
        "moved_in_s": moved_in(attempts, probes, {"zone-a"}, fault),
        "zone_a_share_from_1s": share(attempts, probes, "zone-a", fault + 1.0, fault + AFTER),
    })
    if variant == "sluice":
        assert result["client_429s"] == 0 and result["failed"] == 0, result
        if kind == "falling":
            # Moved on the headers, before the provider refused anything.
            assert result["refused_by_zone_a"] == 0, result


FLAP_SECONDS = 20.0
FLAP_EVERY = 2.0
FAILBACK_AFTER = 30.0   # [failover]'s default


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_zone_flapping(lab_factory, tmp_path, variant):
    """zone-a fails (503) and recovers in turns of 2 s."""
    setup = drill_lab(lab_factory, tmp_path, variant)
    events = []
    t, sick = WARMUP, True
    while t < WARMUP + FLAP_SECONDS:
        faults = {"fixed_status": 503} if sick else {}
        events.append((t, lambda faults=faults: setup.set_zone("zone-a", **faults)))
        t, sick = t + FLAP_EVERY, not sick
    d = traffic(setup, WARMUP + FLAP_SECONDS + 1.0, events)
    fault = d.marks[f"t={WARMUP}"]
    attempts, probes = setup.observed()
    outage = RESULTS.get("zone-a 503", {}).get(variant)
    result = record("zone-a flapping", variant, common(setup, d, attempts, probes, WARMUP) | {
        "seconds_flapping": FLAP_SECONDS,
        "failbacks_metric": sluice_failbacks(setup) if variant == "sluice" else None,
        "zone_a_returns": returns(attempts, probes, "zone-a", fault, fault + FLAP_SECONDS),
        "zone_a_share": share(attempts, probes, "zone-a", fault, fault + FLAP_SECONDS),
        "steady_outage_failed": outage["failed"] if outage else None,
    })
    if variant == "sluice":
        allowed = max(1, int(FLAP_SECONDS // FAILBACK_AFTER))
        assert result["failbacks_metric"] is not None, "no sluice_failover failbacks metric"
        assert result["failbacks_metric"] <= allowed, result
        if outage is not None:
            assert result["failed"] <= outage["failed"], result


@pytest.mark.parametrize("variant", ["sluice", "native"])
def test_region_loss(lab_factory, tmp_path, variant):
    """zone-a and zone-b (region-1) die; zone-c (region-2) lives."""
    setup = drill_lab(lab_factory, tmp_path, variant, layout=REGIONS_LAYOUT)

    def region_1_dies() -> float:
        for zone in ("zone-a", "zone-b"):
            setup.set_zone(zone, dead=True)
        return time.time()

    d = traffic(setup, WARMUP + AFTER, [(WARMUP, region_1_dies)])
    fault = d.marks[f"t={WARMUP}"]
    attempts, probes = setup.observed()
    result = record("region-1 lost", variant, common(setup, d, attempts, probes, WARMUP) | {
        "all_on_region_2_in_s": moved_in(attempts, probes, {"zone-a", "zone-b"}, fault),
        "zone_c_share_before": share(attempts, probes, "zone-c", fault - 2.0, fault),
        "zone_c_share_from_2s": share(attempts, probes, "zone-c", fault + 2.0, fault + AFTER),
    })
    if variant == "sluice":
        assert result["all_on_region_2_in_s"] <= 2.0, result
