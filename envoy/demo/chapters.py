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


CHAPTERS: list[Chapter] = [
    Chapter("normal-traffic", "Normal traffic",
            "Two tenants (acme, globex) send chat completions through Envoy, streaming "
            "and not; the primary backend's two zones answer everything.",
            normal_traffic),
    Chapter("token-quotas", "Token quotas",
            "acme exceeds its 20k tokens/min quota and gets 429s with retry-after; "
            "globex keeps flowing."),
    Chapter("circuit-breaker", "Circuit breaker and degradation",
            "The primary backend starts failing; the breaker opens after 5 failures and "
            "requests degrade to sim-small on the fallback backend, then recover."),
    Chapter("outlier-detection", "Outlier detection",
            "One endpoint turns slow; it is ejected and traffic moves to the healthy one."),
    Chapter("retry-budget", "Retry budgets",
            "Errors are retried within a budget, so a bad upstream is not hit with a retry storm."),
    Chapter("zone-failover", "Zone failover",
            "zone-a dies; traffic fails over to zone-b and comes back when zone-a revives."),
]
