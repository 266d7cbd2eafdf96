"""The chaos drills, declared: what breaks, when, under what load, and what
sluice's policy promises about it.

Every drill runs on the same topology for each system (4 llm-sims: zone-a
``a1``, ``a2``; zone-b ``b1``, ``b2``; the proxy in zone-a), with fresh
simulators (same seeds) and a fresh proxy per system. Load starts, the fault
is applied ``fault_at`` seconds into it, and the load runs on to
``duration``. :mod:`drills.run` executes a drill; :mod:`drills.measure`
turns the clients' and the simulators' records into numbers; each drill's
``verdict`` judges sluice's numbers against the promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: The systems, in the order every table shows them.
SYSTEMS = ("sluice", "native", "litellm")

#: The simulators: (instance, zone). Seeds are 1, 2, 3, 4 in this order.
SIMS = (("a1", "zone-a"), ("a2", "zone-a"), ("b1", "zone-b"), ("b2", "zone-b"))
ZONE_A = ("a1", "a2")
ALL = ("a1", "a2", "b1", "b2")

#: Every simulator: a 50 ms first token, 200 tokens/s, 16 tokens by default.
SIM_TTFT_MS = 50
SIM_ARGS = ["--ttft-ms", str(SIM_TTFT_MS), "--tokens-per-sec", "200",
            "--output-tokens", "16", "--quiet"]

#: The reasons a peer cannot run a drill.
NATIVE_NO_TOKENS = (
    "Envoy alone cannot count tokens per tenant: local_ratelimit counts requests "
    "(per descriptor), not prompt + completion tokens, and reads no usage from answers")
LITELLM_NO_TENANTS = (
    "LiteLLM's per-tenant limits need virtual keys, i.e. PostgreSQL, or our own "
    "custom_auth code inside it (envoy/drills/LITELLM.md); a model-level tpm is "
    "shared by every tenant, not a tenant quota")


@dataclass(frozen=True)
class Load:
    """One load generator (``tools/loadgen``)."""

    # Requests per second, or None for a closed loop. 20, not more: LiteLLM's
    # one worker spends ~30 ms of CPU per request here (half of them
    # streamed), so at 30 req/s it queues before any fault and the drill
    # would measure its overload rather than its answer to the fault.
    open_loop: float | None = 20.0
    closed_loop: int | None = None      # clients
    stream_share: float = 0.5
    max_tokens: int = 16
    tenant: str | None = "drill"
    tenant_flood: str | None = None     # prefix of invented tenants
    error_pause_ms: int = 0             # closed loop: back-off after a failed request
    starts_at_fault: bool = False       # starts with the fault, runs to the end


@dataclass(frozen=True)
class Verdict:
    status: str         # PASS | MISS | n/a
    promise: str        # what the policy promises, in words
    detail: str         # what was measured against it


@dataclass(frozen=True)
class Drill:
    name: str
    title: str
    #: instance → fault set (``LlmSim.set_faults`` keywords), applied at ``fault_at``.
    faults: dict[str, dict]
    #: What "the sick part" is, for time to move: zones and/or instances.
    sick_zones: tuple[str, ...] = ()
    sick_instances: tuple[str, ...] = ()
    load: Load = Load()
    #: A second load generator (the tenant flood), keyed for the outputs.
    extra_load: tuple[tuple[str, Load], ...] = ()
    duration: float = 20.0
    fault_at: float = 5.0
    #: system → why it cannot run this drill (shown as a row, never omitted).
    cannot: dict[str, str] = field(default_factory=dict)
    #: How time to move is read: from answer headers, or from the simulators'
    #: own counters (the blackhole: its requests never answer).
    move_by: str = "headers"
    verdict: Callable[[dict, dict], Verdict] | None = None
    #: Extra per-drill numbers (e.g. overshoot), computed by measure.
    kind: str = "default"
    #: Simulator arguments replacing :data:`SIM_ARGS`' for this drill.
    sim_args: tuple[str, ...] = ()


def _fmt(v, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def _verdict_zone_outage(m: dict, _all: dict) -> Verdict:
    moved = m.get("moved_s")
    ok = m["failed_after"] == 0 and moved is not None and moved <= 0.1
    return Verdict("PASS" if ok else "MISS", "0 failed, moved in ≤ 0.1 s",
                   f"{m['failed_after']} failed, moved in {_fmt(moved, ' s')}")


def _p99_ratio(m: dict) -> float | None:
    before, settled = m["ttft"]["before"]["p99"], m["ttft"]["settled"]["p99"]
    if not before or settled is None:
        return None
    return settled / before


def _verdict_latency(promise_factor: float):
    def judge(m: dict, _all: dict) -> Verdict:
        ratio = _p99_ratio(m)
        ok = m["failed_after"] == 0 and ratio is not None and ratio <= promise_factor
        return Verdict("PASS" if ok else "MISS",
                       f"0 failed; settled p99 TTFT ≤ {promise_factor}× the healthy p99",
                       f"{m['failed_after']} failed; settled p99 {_fmt(ratio)}× healthy "
                       f"({_fmt(m['ttft']['settled']['p99'], ' ms')} vs "
                       f"{_fmt(m['ttft']['before']['p99'], ' ms')})")
    return judge


def _verdict_429(m: dict, _all: dict) -> Verdict:
    ok = m["http_429_after"] == 0 and m["failed_after"] == 0
    return Verdict("PASS" if ok else "MISS",
                   "no 429 (or other failure) reaches a client while zone-b has capacity",
                   f"{m['http_429_after']} client 429s, {m['failed_after']} failed; "
                   f"{m['sick_served_after']} answers from zone-a after the fault")


def _verdict_total_outage(m: dict, _all: dict) -> Verdict:
    amp, bound = m.get("amplification"), m.get("retry_bound")
    ok = amp is not None and bound is not None and amp <= bound
    return Verdict("PASS" if ok else "MISS",
                   "upstream attempts ≤ requests × (1 + budget) + floor × seconds",
                   f"amplification {_fmt(amp)} (bound {_fmt(bound)})")


def _verdict_random_503(m: dict, _all: dict) -> Verdict:
    amp, bound = m.get("amplification"), m.get("retry_bound")
    ok = amp is not None and bound is not None and amp <= bound
    return Verdict("PASS" if ok else "MISS",
                   "retries stay within the budget (failures beyond what it pays reach "
                   "clients, by design)",
                   f"amplification {_fmt(amp)} (bound {_fmt(bound)}); "
                   f"{m['failed_after']} failed after the fault "
                   f"({_fmt(m['failed_after_pct'], '%')})")


def _verdict_overshoot(m: dict, _all: dict) -> Verdict:
    over = m.get("overshoot_pct")
    ok = over is not None and over <= 0.0
    return Verdict("PASS" if ok else "MISS",
                   "tokens used ≤ burst + limit × window (the README's overshoot bound, O = 0)",
                   f"used {m.get('tokens_used')} tokens against {_fmt(m.get('tokens_allowed'))} "
                   f"allowed: overshoot {_fmt(over, '%')}")


def _verdict_reset(m: dict, _all: dict) -> Verdict:
    settled = m["failed_settled"]
    return Verdict("PASS" if settled == 0 else "MISS",
                   "cut streams stop once the resetting zone is left (0 failed in the last 5 s); "
                   "a stream cut after its first byte cannot be retried",
                   f"{m['failed_after']} failed after the fault, {settled} in the last 5 s; "
                   f"moved in {_fmt(m.get('moved_s'), ' s')}")


def _verdict_flood(m: dict, _all: dict) -> Verdict:
    f = m.get("flood") or {}
    during = f.get("named_during", {})
    ok = during.get("http_429", 1) == 0 and (during.get("success_pct") or 0) >= 99.0
    return Verdict("PASS" if ok else "MISS",
                   "a flood of new tenants never limits a named tenant (its slots, its quota)",
                   f"globex: {_fmt(during.get('success_pct'), '%')} ok, "
                   f"{during.get('http_429')} × 429 during the flood; first-byte p99 "
                   f"{_fmt(f.get('named_before', {}).get('p99'), ' ms')} → "
                   f"{_fmt(during.get('p99'), ' ms')}")


_TOKEN_CANNOT = {"native": NATIVE_NO_TOKENS, "litellm": LITELLM_NO_TENANTS}

DRILLS: list[Drill] = [
    Drill("zone_outage", "zone-a answers 503 to every inference, /health green",
          faults={i: {"fixed_status": 503} for i in ZONE_A}, sick_zones=("zone-a",),
          verdict=_verdict_zone_outage),
    Drill("slow_zone", "zone-a adds 500 ms to every first token",
          faults={i: {"added_latency_ms": 500} for i in ZONE_A}, sick_zones=("zone-a",),
          verdict=_verdict_latency(1.2)),
    Drill("slow_endpoint", "one zone-a endpoint (a1) answers its first token 5× slower",
          faults={"a1": {"added_latency_ms": 4 * SIM_TTFT_MS}}, sick_instances=("a1",),
          verdict=_verdict_latency(1.2)),
    Drill("blackhole", "one zone-a endpoint (a1) reads requests and never answers",
          faults={"a1": {"blackhole": True}}, sick_instances=("a1",), move_by="upstream",
          verdict=_verdict_latency(1.2)),
    Drill("storm_429", "zone-a answers 429 with retry-after: 2 to everything",
          faults={i: {"fixed_status": 429, "retry_after_s": 2} for i in ZONE_A},
          sick_zones=("zone-a",), verdict=_verdict_429),
    Drill("total_outage", "all four endpoints answer 503",
          faults={i: {"fixed_status": 503} for i in ALL}, sick_zones=(),
          verdict=_verdict_total_outage),
    Drill("random_503", "30% random 503s on every endpoint",
          faults={i: {"error_rate": 0.3} for i in ALL}, verdict=_verdict_random_503),
    Drill("token_overshoot", "32 concurrent streams of tenant acme against its 6000 tokens/min",
          faults={}, load=Load(open_loop=None, closed_loop=32, stream_share=1.0,
                                max_tokens=256, tenant="acme", error_pause_ms=250),
          duration=15.0, fault_at=0.0, cannot=_TOKEN_CANNOT, kind="overshoot",
          # Streams that use their whole cap (256 tokens, ~1.3 s): what is
          # reserved is what is used, and 32 of them overlap for real.
          sim_args=("--ttft-ms", str(SIM_TTFT_MS), "--tokens-per-sec", "200",
                    "--output-tokens", "256", "--quiet"),
          verdict=_verdict_overshoot),
    Drill("midstream_reset", "half of zone-a's streams are cut after 4 tokens",
          faults={i: {"abort_after_tokens": 4, "abort_rate": 0.5} for i in ZONE_A},
          sick_zones=("zone-a",), verdict=_verdict_reset),
    Drill("tenant_flood", "new tenants flood in at 40 req/s beside named tenant globex (10 req/s)",
          faults={}, load=Load(open_loop=10.0, tenant="globex"),
          extra_load=(("flood", Load(open_loop=40.0, tenant=None, tenant_flood="flood-",
                                     starts_at_fault=True)),),
          cannot=_TOKEN_CANNOT, kind="flood", verdict=_verdict_flood),
]

BY_NAME = {d.name: d for d in DRILLS}
