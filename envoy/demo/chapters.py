"""The demo's story, one chapter per capability.

A chapter is a title, the claim it shows, and a function that drives the lab
and returns checks (what was claimed, whether it held, what was seen). A
chapter whose function is ``None`` is listed as "not yet built": add a new
capability by writing its function and putting it in :data:`CHAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lab import Lab

from .live import LiveView
from .traffic import Recorder, TrafficSpec, run_traffic, summarize


@dataclass(frozen=True)
class Check:
    claim: str
    held: bool
    seen: str


@dataclass
class DemoContext:
    """What a chapter drives: the lab, the record and the live view."""

    lab: Lab
    recorder: Recorder
    live: LiveView
    scale: float = 1.0  # multiplies every chapter's duration (short smoke runs)

    def seconds(self, nominal: float) -> float:
        return max(2.0, nominal * self.scale)

    def traffic(self, specs: list[TrafficSpec], seconds: float) -> None:
        run_traffic(self.lab.base_url, specs, seconds, self.recorder, on_tick=self.live.tick)


@dataclass
class Chapter:
    key: str
    title: str
    story: str
    run: Callable[[DemoContext], list[Check]] | None = None
    # Filled in when the chapter runs:
    started: float | None = None
    ended: float | None = None
    checks: list[Check] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return self.run is not None


def normal_traffic(ctx: DemoContext) -> list[Check]:
    """Two tenants, streaming and not, well within every limit."""
    specs = [TrafficSpec(tenant="acme", stream_every=2),
             TrafficSpec(tenant="globex", stream_every=3)]
    t0 = ctx.recorder.now()
    ctx.traffic(specs, ctx.seconds(20))
    seen = ctx.recorder.between(t0, ctx.recorder.now() + 1)
    s = summarize(seen)
    streamed_ok = sum(1 for o in seen if o.stream and o.outcome == "ok")
    plain_ok = sum(1 for o in seen if not o.stream and o.outcome == "ok")
    tokens = s["tokens"]
    return [
        Check("traffic flowed (at least 10 requests)", s["requests"] >= 10,
              f"{s['requests']} requests"),
        Check("every request succeeded on the primary backend",
              s["ok"] == s["requests"],
              f"ok {s['ok']}, 429 {s['429']}, fallback {s['fallback']}, errors {s['error']}"
              + (f" {s['errors']}" if s["errors"] else "")),
        Check("streaming and non-streaming both work", streamed_ok > 0 and plain_ok > 0,
              f"{streamed_ok} streamed, {plain_ok} not"),
        Check("both tenants were served and billed tokens",
              tokens.get("acme", 0) > 0 and tokens.get("globex", 0) > 0,
              ", ".join(f"{t} {n:,} tokens" for t, n in sorted(tokens.items()))),
    ]


def token_quotas(ctx: DemoContext) -> list[Check]:
    """acme asks for far more than its quota; globex goes on as before.

    Each acme request reserves its prompt plus its max_tokens before Envoy
    calls the upstream, so a burst of large asks finds acme's 20k tokens/min
    bucket taken by the requests already in flight and is turned away at
    once: 429s with OpenAI's rate-limit headers, while globex, with its own
    bucket, is untouched.
    """
    import httpx

    specs = [TrafficSpec(tenant="acme", stream_every=2, max_tokens=(2000, 2500),
                         pause=(0.0, 0.05), workers=10),
             TrafficSpec(tenant="globex", stream_every=3)]
    ctx.recorder.mark("acme bursts past its quota")
    t0 = ctx.recorder.now()
    ctx.traffic(specs, ctx.seconds(20))
    seen = ctx.recorder.between(t0, ctx.recorder.now() + 1)
    acme = summarize([o for o in seen if o.tenant == "acme"])
    globex = summarize([o for o in seen if o.tenant == "globex"])
    # One more ask, to show what a rejected client reads.
    probe = httpx.post(f"{ctx.lab.base_url}/v1/chat/completions", timeout=15.0, trust_env=False,
                       headers={"x-tenant-id": "acme"},
                       json={"model": "sim-large", "max_tokens": 25000,
                             "messages": [{"role": "user", "content": "and one more"}]})
    headers = {k: v for k, v in probe.headers.items()
               if k.startswith("x-ratelimit") or k == "retry-after"}
    return [
        Check("acme was turned away with 429s", acme["429"] > 0,
              f"acme: ok {acme['ok']}, 429 {acme['429']}"),
        Check("acme still got answers within its quota", acme["ok"] > 0,
              f"{acme['tokens'].get('acme', 0):,} tokens billed to acme"),
        Check("globex was never limited", globex["429"] == 0 and globex["ok"] > 0,
              f"globex: ok {globex['ok']}, 429 {globex['429']}, errors {globex['error']}"),
        Check("a rejected client reads OpenAI's rate-limit headers",
              probe.status_code == 429 and "x-ratelimit-remaining-tokens" in headers,
              f"HTTP {probe.status_code} " + ", ".join(f"{k}: {v}" for k, v in sorted(headers.items()))),
    ]


def _breaker_stats(lab: Lab) -> dict[str, int]:
    """The primary circuit's stats from Envoy, by short name (``state``, ...)."""
    prefix = "sluice_breaker.primary.sim-large."
    return {name.split(prefix, 1)[1]: value
            for name, value in lab.envoy.stats("sluice_breaker").items() if prefix in name}


def circuit_breaker(ctx: DemoContext) -> list[Check]:
    """Both primary zones fail, then recover; globex keeps asking throughout.

    Three failures in a row open the primary's circuit (policies/lab.toml);
    while it is open the breaker rewrites each request to sim-small and
    routes it to the fallback backend, so clients get answers instead of
    errors. After the open time, two probes find the primary healthy again
    and the circuit closes.
    """
    specs = [TrafficSpec(tenant="globex", stream_every=2, workers=3)]
    primaries = [ctx.lab.sim("primary", zone) for zone in ("zone-a", "zone-b")]
    before = _breaker_stats(ctx.lab)
    ctx.traffic(specs, ctx.seconds(4))

    ctx.recorder.mark("primary fails (HTTP 500)")
    for sim in primaries:
        sim.set_faults(fixed_status=500)
    t_fail = ctx.recorder.now()
    ctx.traffic(specs, ctx.seconds(12))
    failing = summarize(ctx.recorder.between(t_fail, ctx.recorder.now()))
    opened = _breaker_stats(ctx.lab)

    ctx.recorder.mark("primary recovers")
    for sim in primaries:
        sim.set_faults()
    t_back = ctx.recorder.now()
    ctx.traffic(specs, ctx.seconds(14))
    # The circuit may still be open for up to max_open_for (8 s) after a
    # failed probe: keep the traffic going (bounded) until it has closed.
    for _ in range(10):
        if _breaker_stats(ctx.lab).get("state") == 0:
            break
        ctx.traffic(specs, 2.0)
    ctx.traffic(specs, 3.0)
    end = ctx.recorder.now()
    recovered = ctx.recorder.between(t_back, end + 1)
    tail = [o for o in recovered if o.t >= end - 3]
    after = _breaker_stats(ctx.lab)

    def grew(stats: dict[str, int], key: str) -> int:
        return stats.get(key, 0) - before.get(key, 0)

    return [
        Check("the breaker opened when the primary failed",
              grew(opened, "transition.open") >= 1,
              f"{grew(opened, 'transition.open')} trips, state gauge {opened.get('state')}"),
        Check("the fallback model answered while the primary was down",
              failing["fallback"] > failing["error"] and failing["fallback"] > 0,
              f"fallback {failing['fallback']}, errors {failing['error']} "
              f"(the calls that tripped the circuit and failed probes)"),
        Check("the breaker closed once the primary recovered",
              grew(after, "transition.closed") >= 1 and after.get("state") == 0,
              f"{grew(after, 'transition.closed')} closes, state gauge {after.get('state')}"),
        Check("the primary serves everything again at the end",
              bool(tail) and all(o.outcome == "ok" for o in tail),
              f"last 3 s: {summarize(tail)['ok']} ok of {len(tail)}"),
    ]


CHAPTERS: list[Chapter] = [
    Chapter("normal-traffic", "Normal traffic",
            "Two tenants (acme, globex) send chat completions through Envoy, streaming "
            "and not; the primary backend's two zones answer everything.",
            normal_traffic),
    Chapter("token-quotas", "Token quotas",
            "acme bursts with large asks past its 20k tokens/min quota: each request's "
            "prompt and max_tokens are reserved before the upstream is called, so acme "
            "gets 429s with OpenAI's rate-limit headers while globex keeps flowing.",
            token_quotas),
    Chapter("circuit-breaker", "Circuit breaker and degradation",
            "Both primary zones start answering 500; after 3 failures in a row the breaker "
            "opens and requests are rewritten to sim-small on the fallback backend; when "
            "the primary recovers, two probes succeed and the breaker closes.",
            circuit_breaker),
    Chapter("outlier-detection", "Outlier detection",
            "One endpoint turns slow; it is ejected and traffic moves to the healthy one."),
    Chapter("retry-budget", "Retry budgets",
            "Errors are retried within a budget, so a bad upstream is not hit with a retry storm."),
    Chapter("zone-failover", "Zone failover",
            "zone-a dies; traffic fails over to zone-b and comes back when zone-a revives."),
]
