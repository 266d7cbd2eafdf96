"""From what the clients and the simulators recorded to a drill's numbers.

Times are milliseconds from the main load generator's run start
(``run_start_unix_ms``); a request belongs to the window its *due time*
(``scheduled_ms``) falls in, as loadgen's own timeline does.

- *failed*: every request that did not end ``ok`` (HTTP errors, 429s,
  transport errors, cut streams, requests the generator dropped);
- *TTFT*: ``ttft_ms`` of ``ok`` streamed requests (from the due time;
  whole JSON answers are left out, their first byte is their last, and a
  window's mix of the two would move the percentiles; sluice's probes
  excluded, as in its promises, and shown apart with them), p50/p99 before the fault (from 1 s in),
  in the 5 s just after it, and over the last 5 s ("settled");
- *time to move*: seconds from the fault to the send time of the last
  request (due after the fault) whose answer came from the sick zone or
  endpoint (``x-llm-sim-zone``/``-instance``, or LiteLLM's forwarded
  ``llm_provider-…``), sluice's probes (``x-sluice-zone: …reason=probe``)
  excluded; 0 when none did. ``None`` ("not moved") when such answers
  still come in the last 2 s. For a blackhole, whose requests never
  answer, it is read from the simulators' own inference counters instead
  (polled every 250 ms): the last poll at which the sick endpoint received
  a request;
- *amplification*: inference requests the simulators received after the
  fault over client requests due after it (retries, probes and fallbacks
  all count upstream; health checks do not);
- *CPU*: utime + stime of the proxy's process tree over the load, per
  client request.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from . import catalog

SETTLE_MS = 5000
JUST_AFTER_MS = 5000
SKIP_START_MS = 1000
NOT_MOVED_TAIL_MS = 2000


def read_records(out_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out_dir / "requests.jsonl").read_text().splitlines()
               if line.strip()]
    summary = json.loads((out_dir / "summary.json").read_text())
    return records, summary


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return round(float(ordered[rank]), 1)


def ttft_stats(records: list[dict], start: float, end: float, probes: bool = False) -> dict:
    values = [r["ttft_ms"] for r in records
              if start <= r["scheduled_ms"] < end and r["outcome"] == "ok" and r["stream"]
              and r.get("ttft_ms") is not None and (probes or not is_probe(r))]
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def served_zone(r: dict) -> str | None:
    h = r.get("headers") or {}
    return h.get("x-llm-sim-zone") or h.get("llm_provider-x-llm-sim-zone")


def served_instance(r: dict) -> str | None:
    h = r.get("headers") or {}
    return h.get("x-llm-sim-instance") or h.get("llm_provider-x-llm-sim-instance")


def is_probe(r: dict) -> bool:
    zone = (r.get("headers") or {}).get("x-sluice-zone") or ""
    return "reason=probe" in zone or "/probe" in zone


def outcome_class(r: dict) -> str:
    if r["outcome"] == "ok":
        return "ok"
    if r["status"] == 429:
        return "http_429"
    if r["outcome"] == "http_error":
        return "http_5xx" if r["status"] >= 500 else "http_4xx"
    return {"transport_error": "transport", "cut": "cut", "dropped": "dropped"}[r["outcome"]]


OUTCOMES = ("ok", "http_5xx", "http_429", "http_4xx", "transport", "cut", "dropped")


def windows(records: list[dict], duration_ms: float, width: int = 1000) -> list[dict]:
    """Per ``width`` ms: requests by outcome and p99 TTFT of the ok ones."""
    n = int(-(-duration_ms // width))
    out = [{"t_s": i * width / 1000, **{k: 0 for k in OUTCOMES}, "ttft": []} for i in range(n)]
    for r in records:
        i = int(r["scheduled_ms"] // width)
        if 0 <= i < n:
            out[i][outcome_class(r)] += 1
            if r["outcome"] == "ok" and r["stream"] and r.get("ttft_ms") is not None:
                out[i]["ttft"].append(r["ttft_ms"])
    for w in out:
        w["ttft_p99"] = percentile(w.pop("ttft"), 99)
    return out


def parse_rate(text: str) -> tuple[float, float]:
    """``"6000/min"`` → (6000, 60 s)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKM]?)\s*/\s*(s|sec|min|h|hour|day)\s*", text)
    if not m:
        raise ValueError(f"cannot read the rate {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6}[m.group(2)]
    period = {"s": 1, "sec": 1, "min": 60, "h": 3600, "hour": 3600, "day": 86400}[m.group(3)]
    return value, period


def policy() -> dict:
    from .systems import POLICY
    return tomllib.loads(POLICY.read_text())


def retry_bound(requests_after: int, seconds: float) -> float | None:
    """The retry budget's promise as a ratio of upstream attempts to requests."""
    if requests_after <= 0:
        return None
    retry = policy().get("retry", {})
    budget = float(str(retry.get("budget", "20%")).rstrip("%")) / 100
    floor = float(retry.get("min_retries_per_second", 10))
    return round(1 + budget + floor * seconds / requests_after, 3)


def quota_of(tenant: str) -> tuple[float, float, float]:
    """(limit, period s, capacity) of the first ``[[tokens.quota]]`` naming ``tenant``."""
    for rule in policy().get("tokens", {}).get("quota", []):
        tenants = (rule.get("match") or {}).get("tenants", [])
        if isinstance(tenants, str):
            tenants = [tenants]
        if tenant in tenants:
            limits = rule["tokens"] if isinstance(rule["tokens"], list) else [rule["tokens"]]
            limit, period = parse_rate(limits[0])
            burst = float(rule.get("burst", limit))
            return limit, period, burst
    raise KeyError(tenant)


def _sum(stats: dict[str, dict], key: str, instances=None) -> int:
    return sum(s.get(key, 0) for i, s in stats.items() if instances is None or i in instances)


def analyse(drill: catalog.Drill, *, records: list[dict], summary: dict, fault_ms: float,
            stats_start: dict, stats_fault: dict, stats_end: dict,
            polls: list[tuple[float, dict]], cpu_s: float,
            extra: dict[str, tuple[list[dict], dict]]) -> dict:
    duration_ms = drill.duration * 1000
    sent = [r for r in records if r["outcome"] != "dropped"]
    before = [r for r in records if r["scheduled_ms"] < fault_ms]
    after = [r for r in records if r["scheduled_ms"] >= fault_ms]
    settled = [r for r in records if r["scheduled_ms"] >= duration_ms - SETTLE_MS]
    extra_sent = sum(1 for recs, _ in extra.values() for r in recs if r["outcome"] != "dropped")
    client_requests = len(sent) + extra_sent

    m: dict = {
        "requests": len(records),
        "requests_after": len(after),
        "failed_before": sum(r["outcome"] != "ok" for r in before if r["scheduled_ms"] >= 0),
        "failed_after": sum(r["outcome"] != "ok" for r in after),
        "failed_settled": sum(r["outcome"] != "ok" for r in settled),
        "http_429_after": sum(r["status"] == 429 for r in after),
        "outcomes_after": {k: sum(outcome_class(r) == k for r in after) for k in OUTCOMES},
        "ttft": {
            "before": ttft_stats(records, SKIP_START_MS, fault_ms),
            "after": ttft_stats(records, fault_ms, fault_ms + JUST_AFTER_MS),
            "settled": ttft_stats(records, duration_ms - SETTLE_MS, duration_ms),
        },
        # The same with sluice's probes, which are user requests too.
        "ttft_with_probes": {
            "after": ttft_stats(records, fault_ms, fault_ms + JUST_AFTER_MS, probes=True),
            "settled": ttft_stats(records, duration_ms - SETTLE_MS, duration_ms, probes=True),
        },
        "generator_lag_p99_ms": percentile(
            [r["start_ms"] - r["scheduled_ms"] for r in sent if r.get("start_ms") is not None], 99),
        "cpu_s": round(cpu_s, 3),
        "cpu_ms_per_request": round(1000 * cpu_s / client_requests, 3) if client_requests else None,
        "client_requests": client_requests,
    }
    m["failed_after_pct"] = round(100 * m["failed_after"] / len(after), 2) if after else None

    # Where answers came from after the fault.
    def sick(r: dict) -> bool:
        return (served_zone(r) in drill.sick_zones
                or served_instance(r) in drill.sick_instances)

    sick_after = [r for r in after if sick(r) and not is_probe(r)]
    m["sick_served_after"] = len(sick_after)
    m["probes_after"] = sum(is_probe(r) for r in after)
    late = [r for r in after if r["scheduled_ms"] >= fault_ms + 3000]
    m["sick_share_after_3s"] = (round(sum(sick(r) and not is_probe(r) for r in late) / len(late), 4)
                                if late else None)
    if not drill.sick_zones and not drill.sick_instances:
        m["moved_s"] = None
        m["moved_note"] = "nothing to move from"
    elif drill.move_by == "upstream":
        m["moved_s"], m["moved_note"] = _moved_upstream(drill, polls, fault_ms, duration_ms)
    else:
        last = max((r["start_ms"] for r in sick_after if r.get("start_ms") is not None),
                   default=None)
        if last is None:
            m["moved_s"], m["moved_note"] = 0.0, "no answer from the sick part after the fault"
        elif last >= duration_ms - NOT_MOVED_TAIL_MS:
            m["moved_s"], m["moved_note"] = None, "still served by the sick part at the end"
        else:
            m["moved_s"] = round(max(0.0, last - fault_ms) / 1000, 3)
            m["moved_note"] = f"last sick answer sent at {last / 1000:.2f} s"

    # Upstream attempts per client request, after the fault.
    up_after = _sum(stats_end, "inference_requests") - _sum(stats_fault, "inference_requests")
    client_after = (sum(1 for r in after if r["outcome"] != "dropped")
                    + sum(1 for recs, _ in extra.values() for r in recs
                          if r["outcome"] != "dropped" and r["scheduled_ms"] >= 0))
    m["upstream_after"] = up_after
    m["amplification"] = round(up_after / client_after, 3) if client_after else None
    m["upstream_total"] = (_sum(stats_end, "inference_requests")
                           - _sum(stats_start, "inference_requests"))
    m["retry_bound"] = retry_bound(client_after, (duration_ms - fault_ms) / 1000)

    if drill.kind == "overshoot":
        limit, period, burst = quota_of(drill.load.tenant or "")
        used = sum(_sum(stats_end, k) - _sum(stats_start, k)
                   for k in ("tokens_produced", "prompt_tokens"))
        window_s = summary["elapsed_ms"] / 1000
        allowed = burst + limit * window_s / period
        m.update(tokens_used=used, tokens_allowed=round(allowed, 1), window_s=window_s,
                 overshoot_pct=round(100 * (used - allowed) / allowed, 2),
                 ok_streams=sum(r["outcome"] == "ok" for r in records),
                 tokens_by_usage=sum(r.get("total_tokens") or 0 for r in records
                                     if r["outcome"] == "ok"))
    if drill.kind == "flood":
        def part(recs: list[dict]) -> dict:
            ok = [r for r in recs if r["outcome"] == "ok"]
            ttfts = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
            return {"n": len(recs), "success_pct": round(100 * len(ok) / len(recs), 2) if recs
                    else None, "http_429": sum(r["status"] == 429 for r in recs),
                    "p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)}
        flood_records = extra.get("flood", ([], {}))[0]
        m["flood"] = {
            "named_before": part([r for r in before if r["scheduled_ms"] >= SKIP_START_MS]),
            "named_during": part(after),
            "flood": part(flood_records),
        }
    return m


def _moved_upstream(drill: catalog.Drill, polls: list[tuple[float, dict]], fault_ms: float,
                    duration_ms: float) -> tuple[float | None, str]:
    last_rise = None
    prev = None
    for t, stats in polls:
        count = _sum(stats, "inference_requests", drill.sick_instances)
        if prev is not None and count > prev and t > fault_ms:
            last_rise = t
        prev = count
    if last_rise is None:
        return 0.0, "the sick endpoint received nothing after the fault"
    if last_rise >= duration_ms - NOT_MOVED_TAIL_MS:
        return None, "the sick endpoint still received requests at the end"
    return round((last_rise - fault_ms) / 1000, 3), \
        f"last request reached the sick endpoint by {last_rise / 1000:.2f} s (250 ms polls)"
