"""The demo's story, one chapter per capability.

A chapter is a title, the claim it shows, and a function that drives the lab
and returns checks (what was claimed, whether it held, what was seen). A
chapter whose function is ``None`` is listed as "not yet built": add a new
capability by writing its function and putting it in :data:`CHAPTERS`.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab import Lab, LlmSim

from .live import LiveView, endpoint_label
from .traffic import (Exchange, Outcome, Recorder, TrafficSpec, percentile, run_traffic,
                      summarize)


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

    def seconds(self, nominal: float, floor: float = 2.0) -> float:
        """``nominal`` seconds at this scale, never under ``floor``."""
        return max(floor, nominal * self.scale)

    def traffic(self, specs: list[TrafficSpec], seconds: float,
                on_tick: Callable[[], None] | None = None,
                until: Callable[[], bool] | None = None) -> None:
        """Runs the clients; each second the live view prints a line, then
        ``on_tick`` runs (a chapter's own watchers), then ``until``, which
        ends the traffic before ``seconds`` when it returns true."""
        def tick() -> None:
            self.live.tick()
            if on_tick is not None:
                on_tick()

        run_traffic(self.lab.base_url, specs, seconds, self.recorder, on_tick=tick, until=until)

    def mark(self, text: str) -> None:
        """Marks a moment in the record (the plot shows it) and in the live view."""
        self.recorder.mark(text)
        self.live.note(text)


@dataclass(frozen=True)
class EndpointPool:
    """A backend zone of several endpoints, as a chapter shows it."""

    backend: str
    zone: str
    #: The zone's first-token deadline (seconds), drawn on the chapter's plot.
    first_token_timeout: float | None = None


@dataclass(frozen=True)
class RetriedBackend:
    """A backend with ``[backend.retry]``, as a chapter shows it: its one zone
    (whose budget the live view reads) and the model that reaches it."""

    backend: str
    zone: str
    model: str
    #: The policy's ``max_retries`` and ``budget`` (the chapter's claims name
    #: them; envoy/tests/test_demo.py checks them against the policy).
    max_retries: int = 0
    budget: float = 0.0

    def series(self, what: str) -> str:
        """The name under which the chapter's watcher records ``what`` (the
        simulators' ``upstream`` request counter, the budget's ``balance``)."""
        return f"retry.{self.backend}.{what}"


@dataclass(frozen=True)
class ZonedBackend:
    """A backend with ``[backend.failover]``, as a chapter shows it: its
    zones in the policy's order (the preferred one first) with their
    regions, the model that reaches it, and its ``failback_after``
    (envoy/tests/test_demo.py checks them against the policy)."""

    backend: str
    model: str
    zones: tuple[str, ...]
    regions: tuple[str, ...]
    failback_after: float = 0.0  # seconds

    def series(self, zone: str, what: str) -> str:
        """The name under which the chapter's watcher records a zone's
        gauge (``share``)."""
        return f"failover.{self.backend}.{zone}.{what}"


@dataclass
class Chapter:
    key: str
    title: str
    story: str
    run: Callable[[DemoContext], list[Check]] | None = None
    # A backend zone whose endpoints the live view and a plot show one by one.
    endpoints: EndpointPool | None = None
    # A backend whose retries the chapter's plot shows (requests, attempts, budget).
    retries: RetriedBackend | None = None
    # A backend whose zones the chapter's plot shows (answers by zone, shares).
    zones: ZonedBackend | None = None
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


def sluice_stats(lab: Lab, family: str, scope: str) -> dict[str, int]:
    """sluice's stats of one family (``sluice_outlier``…) for one ``scope``
    (a backend, ``primary.sim-large``…) from Envoy, by short name."""
    prefix = f"{family}.{scope}."
    return {name.split(prefix, 1)[1]: value
            for name, value in lab.envoy.stats(family).items() if prefix in name}


def _breaker_stats(lab: Lab) -> dict[str, int]:
    """The primary circuit's stats from Envoy, by short name (``state``, ...)."""
    return sluice_stats(lab, "sluice_breaker", "primary.sim-large")


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


# The pool of chapter 4 (policies/demo.toml): one model, four endpoints in
# one zone, [backend.outlier] with a 1 s first-token deadline.
FIRST_TOKEN_TIMEOUT_S = 1.0
POOL = EndpointPool("pool", "zone-a", first_token_timeout=FIRST_TOKEN_TIMEOUT_S)
POOL_MODEL = "sim-pool"
RETRY_AFTER_S = 5


def stat_label(address: str) -> str:
    """An endpoint's ``ip:port`` as sluice's metrics name it (``127_0_0_1_8000``)."""
    return address.replace(".", "_").replace(":", "_")


def _outlier_stats(lab: Lab, backend: str) -> dict[str, int]:
    """A backend's outlier stats from Envoy, by short name (``served_by_fallback``,
    ``127_0_0_1_8000.ejections``…)."""
    return sluice_stats(lab, "sluice_outlier", backend)


@dataclass(frozen=True)
class OutlierEvent:
    t: float  # the record's time
    endpoint: str  # the live view's label (ep0…)
    what: str  # ejected, probing, returned or spared
    detail: str = ""  # for an ejection: "9.1s (slow-first-token)"


class EnvoyLog:
    """sluice's lines about one backend in Envoy's log, read as it grows:
    each new line that ``LINE`` matches (group 1 its time stamp, group 2 the
    backend) is handed to ``line`` with its time in the record's time."""

    LINE: re.Pattern[str]

    def __init__(self, log_path: Path, backend: str, recorder: Recorder, live: LiveView):
        self.path = log_path
        self.backend = backend
        self.recorder = recorder
        self.live = live
        self.offset = log_path.stat().st_size if log_path.exists() else 0

    def poll(self) -> None:
        """Reads the lines written since the last poll."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].decode(errors="replace").splitlines():
            match = self.LINE.match(line)
            if match and match.group(2) == self.backend:
                self.line(self._when(match.group(1)), match)

    def line(self, t: float, match: re.Match[str]) -> None:
        """One matching line, logged at ``t``."""
        raise NotImplementedError

    def _when(self, stamp: str) -> float:
        """Envoy's local-time stamp in the record's time (now if it is off)."""
        now = self.recorder.now()
        try:
            wall = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            return now
        t = now - (time.time() - wall)
        return t if abs(t - now) < 60 else now


class OutlierLog(EnvoyLog):
    """sluice's outlier events for one backend, read from Envoy's log as it
    grows (ejections are logged at warn, probing and returns at info)."""

    LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\].*sluice outlier: "
                      r"backend (\S+): endpoint (\S+) (.*)$")

    def __init__(self, log_path: Path, backend: str, labels: dict[str, str],
                 recorder: Recorder, live: LiveView,
                 notes: tuple[str, ...] = ("ejected", "probing", "returned", "spared"),
                 details: bool = True):
        """``notes``: the events the live view prints; ``details``: whether
        ejections and returns are marked on the chapter's plot."""
        super().__init__(log_path, backend, recorder, live)
        self.labels = labels  # ip:port -> ep0…
        self.notes = notes
        self.details = details
        self.events: list[OutlierEvent] = []

    def line(self, t: float, match: re.Match[str]) -> None:
        text = match.group(4)
        if text.startswith("ejected for "):
            what, detail = "ejected", text.removeprefix("ejected for ")
        elif "probing" in text:
            what, detail = "probing", ""
        elif "back in rotation" in text:
            what, detail = "returned", ""
        elif "looks sick" in text:
            what, detail = "spared", text
        else:
            return
        endpoint = self.labels.get(match.group(3), match.group(3))
        event = OutlierEvent(t, endpoint, what, detail)
        self.events.append(event)
        if self.details and what in ("ejected", "returned"):
            self.recorder.detail(f"{endpoint} {'ejected' if what == 'ejected' else 'back'}",
                                 at=event.t)
        words = {"ejected": f"ejected for {detail}",
                 "probing": "ejection over, probing it",
                 "returned": "back in rotation",
                 "spared": "looks sick, but max_ejection keeps it"}[what]
        if what in self.notes:
            self.live.note(f"Envoy: {endpoint} {words}", at=event.t)

    def first(self, endpoint: str, what: str, t0: float, t1: float) -> OutlierEvent | None:
        return next((e for e in self.events
                     if e.endpoint == endpoint and e.what == what and t0 <= e.t < t1), None)


class Arrivals:
    """When requests reach one simulator: its request and 429 counters,
    sampled every ``period`` seconds by a thread of its own (bounded)."""

    def __init__(self, sim: LlmSim, recorder: Recorder, period: float = 0.1,
                 limit: float = 180.0):
        import httpx

        self.client = httpx.Client(base_url=f"http://{sim.control}", timeout=2.0,
                                   trust_env=False)
        self.recorder = recorder
        self.period = period
        self.limit = limit
        self.samples: list[tuple[float, int, int]] = []  # (t, requests, 429s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="arrivals")

    def start(self) -> "Arrivals":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.client.close()

    def _sample(self) -> None:
        import httpx

        try:
            stats = self.client.get("/_sim/stats").json()
        except (httpx.HTTPError, ValueError):
            return
        self.samples.append((self.recorder.now(), int(stats.get("requests", 0)),
                             int(stats.get("by_status", {}).get("429", 0))))

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.wait(self.period) and time.monotonic() < deadline:
            self._sample()

    def bursts(self, within: float = 0.5) -> list[tuple[float, int, int]]:
        """Arrivals grouped when they come within ``within`` s of a group's
        first: ``(t, requests, 429s)`` per group (two Envoy workers may both
        send one before either has seen the other's 429)."""
        groups: list[list] = []
        for (_, r0, n0), (t, r1, n1) in zip(self.samples, self.samples[1:]):
            if r1 == r0:
                continue
            if groups and t - groups[-1][0] <= within:
                groups[-1][1] += r1 - r0
                groups[-1][2] += n1 - n0
            else:
                groups.append([t, r1 - r0, n1 - n0])
        return [(t, r, n) for t, r, n in groups]


def _by_endpoint(outcomes: list[Outcome]) -> Counter:
    return Counter(o.instance for o in outcomes if o.instance)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def outlier_detection(ctx: DemoContext) -> list[Check]:
    """Four endpoints serve sim-pool; one turns slow, one goes silent, one
    answers 429, one after the other; clients stream throughout.

    sluice picks each request's endpoint (the cheaper of two by recent time
    to first token × load) and names fallbacks for the router's retries;
    the pool's [backend.outlier] (policies/demo.toml) ejects an endpoint
    after three slow first tokens or three failed attempts in a row, for
    10 s, cuts a stream with no first token after 1 s to retry it
    elsewhere, and benches an endpoint that answers 429 until its
    retry-after. Every client streams, so every request has the deadline.
    """
    lab = ctx.lab
    sims = lab.endpoint_sims(POOL.backend, POOL.zone)
    label = {sim.instance: endpoint_label(i) for i, sim in enumerate(sims)}
    slow, silent, limited = sims[0], sims[1], sims[2]
    log = OutlierLog(lab.envoy.log_path, POOL.backend,
                     {sim.listen: endpoint_label(i) for i, sim in enumerate(sims)},
                     ctx.recorder, ctx.live)
    specs = [TrafficSpec(tenant="globex", model=POOL_MODEL, stream_every=1, workers=6,
                         pause=(0.02, 0.1))]

    def run(seconds: float) -> tuple[float, float]:
        t0 = ctx.recorder.now()
        ctx.traffic(specs, seconds, on_tick=log.poll)
        log.poll()
        return t0, ctx.recorder.now()

    def between(t0: float, t1: float) -> list[Outcome]:
        return ctx.recorder.between(t0, t1)

    before = _outlier_stats(lab, POOL.backend)
    breaker_before = lab.envoy.stats("sluice_breaker")
    chapter_t0 = ctx.recorder.now()

    # All four healthy.
    warm = between(*run(ctx.seconds(5, floor=3)))

    # One endpoint's first token comes 5x later.
    slow.set_faults(added_latency_ms=200)
    ctx.mark("ep0 5x slower to first token")
    t_slow, t_slow_end = run(ctx.seconds(8, floor=8))
    slow_after = between(t_slow + 2, t_slow_end)

    # One endpoint reads requests and never answers.
    slow.set_faults()
    silent.set_faults(blackhole=True)
    ctx.mark("ep0 healthy; ep1 blackholed")
    mid = _outlier_stats(lab, POOL.backend)
    t_hole, t_hole_end = run(ctx.seconds(8, floor=6))
    after_hole = _outlier_stats(lab, POOL.backend)

    # One endpoint answers 429 with a retry-after.
    silent.set_faults()
    arrivals = Arrivals(limited, ctx.recorder).start()
    try:
        limited.set_faults(fixed_status=429, retry_after_s=RETRY_AFTER_S)
        ctx.mark(f"ep1 healthy; ep2 429s, retry-after {RETRY_AFTER_S}")
        run(ctx.seconds(12, floor=7))

        # Every fault cleared: ejections end, probes succeed, all four return.
        limited.set_faults()
        ctx.mark("ep2 healthy")
        run(ctx.seconds(5, floor=3))
        everyone = set(label)
        for _ in range(10):
            now = ctx.recorder.now()
            if set(_by_endpoint(between(now - 2, now + 1))) >= everyone:
                break
            run(2.0)
        _, end = run(3.0)
    finally:
        arrivals.stop()
    after = _outlier_stats(lab, POOL.backend)
    breaker_after = lab.envoy.stats("sluice_breaker")
    chapter = between(chapter_t0, end + 1)
    tail = between(end - 3, end + 1)
    totals = summarize(chapter)

    def grew(stats: dict[str, int], key: str, since: dict[str, int] = before) -> int:
        return stats.get(key, 0) - since.get(key, 0)

    def ejection(sim: LlmSim, t0: float, t1: float, since: str) -> tuple[bool, str]:
        event = log.first(label[sim.instance], "ejected", t0, t1)
        count = grew(after, f"{stat_label(sim.listen)}.ejections")
        if event is None:
            return count > 0, f"ejections counter +{count}, no ejection logged in time"
        return True, f"ejected {event.t - t0:.1f} s after {since}, for {event.detail}"

    # 1. Healthy: shared.
    warm_by = _by_endpoint(warm)
    shared = all(warm_by.get(i, 0) >= 0.05 * len(warm) for i in label)

    # 2. Slow: shunned, then ejected.
    slow_share = _by_endpoint(slow_after).get(slow.instance, 0)
    slow_ttft = percentile([o.ttft for o in slow_after if o.ttft is not None], 0.99)
    slow_ejected, slow_seen = ejection(slow, t_slow, t_slow_end, "it slowed")

    # 3. Silent: cut at the deadline, retried, ejected.
    held = silent.stats().get("blackholed", 0)
    rescued = grew(after_hole, "served_by_fallback", mid)
    hole_ejected, hole_seen = ejection(silent, t_hole, t_hole_end, "it went silent")
    ttfts = [o.ttft for o in chapter if o.ttft is not None]
    longest = max(ttfts, default=0.0)
    waited = sum(1 for t in ttfts if t >= FIRST_TOKEN_TIMEOUT_S)
    bound = FIRST_TOKEN_TIMEOUT_S + 1.0

    # 4. Throttled: benched for its retry-after after each 429.
    bursts = arrivals.bursts()
    quiet = [(t, nxt[0] - t) for (t, _, n429), nxt in zip(bursts, bursts[1:]) if n429]
    throttled = grew(after, f"{stat_label(limited.listen)}.throttled")
    benched = bool(quiet) and all(gap >= RETRY_AFTER_S - 0.5 for _, gap in quiet)
    sent_429 = sum(n for _, _, n in bursts)

    def trips(stats: dict[str, int]) -> int:
        return sum(v for k, v in stats.items()
                   if f"sluice_breaker.{POOL.backend}." in k and k.endswith(".transition.open"))

    opened = trips(breaker_after) - trips(breaker_before)
    tail_by = _by_endpoint(tail)

    return [
        Check("while healthy, the four endpoints shared the traffic",
              shared and len(warm) >= 10,
              ", ".join(f"{label[i]} {_pct(warm_by.get(i, 0), len(warm))}" for i in label)
              + f" of {len(warm)} answers"),
        Check("traffic moved away from the slow ep0 within 2 s (≤ 10% of answers, fair is 25%)",
              bool(slow_after) and slow_share <= 0.10 * len(slow_after),
              f"ep0 answered {slow_share} of {len(slow_after)} ({_pct(slow_share, len(slow_after))}) "
              f"from 2 s after it slowed; clients' first token p99 "
              + (f"{slow_ttft * 1000:.0f} ms" if slow_ttft is not None else "-")),
        Check("the slow ep0 was ejected", slow_ejected, slow_seen),
        Check("streams the silent ep1 held were cut at the 1 s first-token deadline and "
              "retried elsewhere; ep1 was ejected",
              held > 0 and rescued > 0 and hole_ejected,
              f"ep1 held {held} attempts; {rescued} answers came from a fallback endpoint; "
              f"{hole_seen}"),
        Check(f"no client waited more than {bound:.0f} s for its first token "
              f"(the {FIRST_TOKEN_TIMEOUT_S:.0f} s deadline + a healthy first token)",
              bool(ttfts) and longest <= bound,
              f"longest {longest * 1000:.0f} ms of {len(ttfts)} streams; "
              f"{waited} waited past the deadline, then got their first token from another "
              "endpoint"),
        Check(f"ep2 got no request for {RETRY_AFTER_S} s after each 429 (its retry-after)",
              benched and throttled > 0,
              (f"{sent_429} requests answered 429 ({throttled} benched it); the next came "
               + ", ".join(f"{gap:.1f} s" for _, gap in quiet) + " after each")
              if quiet else f"{sent_429} requests answered 429; no later arrival seen"),
        Check("no client saw a 429, an error or the fallback model; the pool's circuit stayed closed",
              totals["429"] == 0 and totals["error"] == 0 and totals["fallback"] == 0
              and opened == 0 and totals["ok"] > 0,
              f"ok {totals['ok']}, 429 {totals['429']}, fallback {totals['fallback']}, "
              f"errors {totals['error']}" + (f" {totals['errors']}" if totals["errors"] else "")
              + "".join(f" ({n} from {label.get(i, i or '?')}, pick {p or '-'})"
                        for (i, p), n in Counter((o.instance, o.pick) for o in chapter
                                                 if o.outcome != "ok").items())
              + f"; circuit opened {opened} times"),
        Check("with every fault cleared, all four endpoints answer again",
              set(tail_by) >= set(label),
              "last 3 s: " + ", ".join(f"{label[i]} {tail_by.get(i, 0)}" for i in label)),
    ]


# The retried backend of chapter 5 (policies/demo.toml): one model, three
# replicas in one zone, [backend.retry] with up to 2 retries per request
# within 20% of the requests (+2 a second) of the last 10 s, no circuit.
FLAKY = RetriedBackend("flaky", "zone-a", "sim-flaky", max_retries=2, budget=0.20)
FLAKY_ERROR_RATE = 0.15


class RetryWatch:
    """The retried backend seen each second (the live view's columns): the
    HTTP requests the clients' SDK sent and what came back, the attempts the
    simulators received (their request counters), and the budget's balance
    (sluice's ``sluice_retry.<backend>.<zone>.balance`` gauge)."""

    legend = ("req … errors: the clients' SDK calls, each after the SDK's own retries; "
              "http: the HTTP requests the SDK sent; 5xx: those that failed; "
              "told: failures with x-should-retry: false; upstream: attempts the replicas "
              "received (their counters); amp: attempts per answer (x-envoy-attempt-count); "
              "balance: retries the budget holds")
    title = (f"{'http':>4} {'5xx':>4} {'told':>4} | {'upstream':>8} {'amp':>5} | "
             f"{'balance':>7}")

    def __init__(self, lab: Lab, recorder: Recorder, retried: RetriedBackend):
        self.lab = lab
        self.recorder = recorder
        self.retried = retried
        self.sims = lab.endpoint_sims(retried.backend, retried.zone)
        self.last = self.poll()

    def counters(self) -> dict[str, int]:
        """The replicas' summed counters: ``requests`` and ``failed`` (5xx)."""
        requests = failed = 0
        for sim in self.sims:
            stats = sim.stats()
            requests += int(stats.get("requests", 0))
            failed += sum(int(n) for status, n in stats.get("by_status", {}).items()
                          if status.startswith("5"))
        return {"requests": requests, "failed": failed}

    def budget(self) -> dict[str, int]:
        """The backend's retry stats by short name (``retries``, ``refused``,
        ``zone-a.balance``)."""
        return sluice_stats(self.lab, "sluice_retry", self.retried.backend)

    def poll(self) -> tuple[int, int | None]:
        """Samples the upstream attempts so far and the balance; returns both."""
        upstream = self.counters()["requests"]
        balance = self.budget().get(f"{self.retried.zone}.balance")
        now = self.recorder.now()
        self.recorder.sample(self.retried.series("upstream"), upstream, at=now)
        if balance is not None:
            self.recorder.sample(self.retried.series("balance"), balance, at=now)
        return upstream, balance

    def row(self, t0: float, t1: float) -> str:
        upstream, balance = self.poll()
        attempts = upstream - self.last[0]
        self.last = (upstream, balance)
        sent = self.recorder.exchanges_between(t0, t1, self.retried.model)
        failed = sum(1 for e in sent if e.failed)
        told = sum(1 for e in sent if e.failed and e.should_retry == "false")
        amp = (f"{sum(e.attempts for e in sent) / len(sent):>5.2f}" if sent
               else f"{'-':>5}")
        shown = f"{balance:>7}" if balance is not None else f"{'-':>7}"
        return (f"{len(sent):>4} {failed:>4} {told:>4} | {attempts:>8} {amp} | {shown}")


@dataclass
class Phase:
    """One stretch of a chapter: its record and the replicas' counters."""

    t0: float
    t1: float
    calls: list[Outcome]
    sent: list[Exchange]
    upstream: int  # attempts the replicas received
    upstream_failed: int  # of which they answered 5xx
    budget: dict[str, int]  # the backend's retry stats grown over the stretch

    @property
    def amplification(self) -> float:
        return self.upstream / len(self.sent) if self.sent else 0.0

    @property
    def failed(self) -> list[Exchange]:
        return [e for e in self.sent if e.failed]

    @property
    def told(self) -> list[Exchange]:
        return [e for e in self.failed if e.should_retry == "false"]

    @property
    def calls_failed(self) -> int:
        return sum(1 for c in self.calls if c.outcome != "ok")

    def describe(self) -> str:
        return (f"{len(self.calls)} calls, {len(self.sent)} HTTP requests, "
                f"{self.upstream} upstream attempts ({self.amplification:.2f}×)")


def retry_budgets(ctx: DemoContext) -> list[Check]:
    """Three replicas serve sim-flaky; clients use the openai SDK with its
    default retries (2). The replicas fail 15% of attempts, then all of
    them, then recover.

    sluice gives each request Envoy's retries (x-envoy-max-retries, up to
    2, each on a replica not tried yet) while the flaky backend's budget
    (policies/demo.toml) holds: retries within 20% of the requests of the
    last 10 s, plus 2 a second. A blip is retried away before the client
    sees it; in an outage the budget is soon spent, requests get no retry,
    and their failures say ``x-should-retry: false``, so the SDK's own
    retries stop too. Without the budget, each call would be 3 attempts by
    Envoy times 3 by the SDK: 9 on a backend that is down.
    """
    import openai

    lab = ctx.lab
    retried = FLAKY
    sims = lab.endpoint_sims(retried.backend, retried.zone)
    watch = RetryWatch(lab, ctx.recorder, retried)
    ctx.live.columns(watch)
    specs = [TrafficSpec(tenant="globex", model=retried.model, stream_every=3, workers=8,
                         pause=(0.05, 0.2), sdk_max_retries=openai.DEFAULT_MAX_RETRIES)]

    def run(seconds: float) -> Phase:
        t0 = ctx.recorder.now()
        before = watch.counters()
        budget_before = watch.budget()
        ctx.traffic(specs, seconds)
        after = watch.counters()
        budget_after = watch.budget()
        t1 = ctx.recorder.now()
        return Phase(t0, t1, ctx.recorder.between(t0, t1 + 1e-9),
                     ctx.recorder.exchanges_between(t0, t1 + 1e-9, retried.model),
                     after["requests"] - before["requests"], after["failed"] - before["failed"],
                     {k: v - budget_before.get(k, 0) for k, v in budget_after.items()
                      if not k.endswith(".balance")})

    def set_faults(**faults) -> None:
        for sim in sims:
            sim.set_faults(**faults)

    def cluster() -> dict[str, int]:
        """Envoy's own count of the backend cluster's attempts and retries."""
        prefix = f"cluster.{retried.backend}."
        stats = lab.envoy.stats(f"{prefix}upstream_rq_")
        return {k: stats.get(f"{prefix}upstream_rq_{k}", 0) for k in ("total", "retry")}

    envoy_before = cluster()

    # Healthy: one attempt per request; the budget fills.
    healthy = run(ctx.seconds(4, floor=2))

    # A blip: 15% of attempts fail, on every replica.
    set_faults(error_rate=FLAKY_ERROR_RATE)
    ctx.mark(f"{FLAKY_ERROR_RATE:.0%} of attempts answer 503")
    flaky = run(ctx.seconds(12, floor=4))

    # An outage: every attempt fails.
    set_faults(fixed_status=503)
    ctx.mark("every replica answers 503")
    down = run(ctx.seconds(8, floor=4))

    # Recovery.
    set_faults()
    ctx.mark("replicas healthy")
    back = run(ctx.seconds(10, floor=4))
    everything = [healthy, flaky, down, back]
    balance = watch.budget().get(f"{retried.zone}.balance", 0)
    envoy_after = cluster()
    envoy_attempts = envoy_after["total"] - envoy_before["total"]
    envoy_retries = envoy_after["retry"] - envoy_before["retry"]
    charged = sum(phase.budget.get("retries", 0) for phase in everything)
    end = ctx.recorder.now()
    tail = ctx.recorder.between(end - 3, end + 1)
    tail_sent = ctx.recorder.exchanges_between(end - 3, end + 1, retried.model)

    sent = [e for phase in everything for e in phase.sent]
    counted = sum(e.attempts for e in sent)
    upstream = sum(phase.upstream for phase in everything)
    unmarked = sum(1 for e in sent if e.attempts < 1)
    unbudgeted = 1 + retried.max_retries
    # The outage once the budget was spent: from its first failure that told
    # its client not to retry.
    spent_at = min((e.t for e in down.told), default=down.t1)
    spent = [e for e in down.sent if e.t >= spent_at]
    spent_amp = sum(e.attempts for e in spent) / len(spent) if spent else 0.0
    # Calls the SDK sent again after an answer that said x-should-retry: false.
    resent = sum(1 for call in down.calls
                 if any(e.should_retry == "false" for e in call.exchanges[:-1]))
    per_call = down.upstream / len(down.calls) if down.calls else 0.0

    def share(part: int, whole: int) -> str:
        return f"{part} of {whole} ({_pct(part, whole)})"

    return [
        Check("while healthy, every call succeeded at one attempt",
              bool(healthy.calls) and healthy.calls_failed == 0
              and healthy.upstream == len(healthy.sent),
              healthy.describe()),
        Check(f"with {FLAKY_ERROR_RATE:.0%} of attempts failing, retries rescued them: "
              "≤ 5% of HTTP answers failed, ≤ 2% of calls",
              len(flaky.sent) >= 20 and flaky.upstream_failed >= 0.08 * flaky.upstream
              and len(flaky.failed) <= 0.05 * len(flaky.sent)
              and flaky.calls_failed <= 0.02 * len(flaky.calls),
              f"the replicas failed {share(flaky.upstream_failed, flaky.upstream)} attempts; "
              f"clients saw {share(len(flaky.failed), len(flaky.sent))} HTTP answers fail "
              f"and {share(flaky.calls_failed, len(flaky.calls))} calls"),
        Check("those retries cost ≤ 1.4 attempts per request",
              flaky.budget.get("retries", 0) > 0 and 1.05 <= flaky.amplification <= 1.4,
              f"{flaky.describe()}; sluice counted {flaky.budget.get('retries', 0)} retries, "
              f"refused {flaky.budget.get('refused', 0)}"),
        Check(f"in the outage, the budget held attempts to ≤ 1.3× the requests once spent "
              f"(1 + its {retried.budget:.0%} + the floor), ≤ 1.45× overall "
              f"(max_retries alone: {unbudgeted}×)",
              len(spent) >= 20 and spent_amp <= 1.3 and down.amplification <= 1.45
              and down.budget.get("refused", 0) > 0,
              f"spent {spent_at - down.t0:.1f} s in: {spent_amp:.2f}× over the next "
              f"{len(spent)} requests; overall {down.describe()}; "
              f"{down.budget.get('refused', 0)} requests refused a retry"),
        Check("its failures told clients not to retry (x-should-retry: false), and the SDK "
              "re-sent none of those: ≥ 60% of failures told",
              bool(down.failed) and len(down.told) >= 0.6 * len(down.failed) and resent == 0,
              f"{share(len(down.told), len(down.failed))} failures told, {resent} re-sent; "
              f"{len(down.sent)} HTTP requests for {len(down.calls)} calls; the replicas got "
              f"{per_call:.2f} attempts per call (without budget and header: up to "
              f"{unbudgeted * (1 + specs[0].sdk_max_retries)})"),
        Check("once the replicas recovered, every call of the last 3 s succeeded at one "
              "attempt, and the budget refilled",
              bool(tail) and all(o.outcome == "ok" for o in tail)
              and all(e.attempts == 1 and not e.failed for e in tail_sent)
              and balance >= 5,
              f"last 3 s: {summarize(tail)['ok']} ok of {len(tail)} calls, "
              f"{sum(e.attempts for e in tail_sent)} attempts for {len(tail_sent)} requests; "
              f"balance {balance}; recovery: {back.describe()}"),
        Check("every answer said how many attempts it took (x-envoy-attempt-count); they "
              "add up to what the replicas received, and the budget was charged every retry "
              "Envoy made (±2%)",
              bool(sent) and unmarked == 0 and abs(counted - upstream) <= 0.02 * upstream + 2
              and abs(charged - envoy_retries) <= 0.02 * envoy_retries + 2,
              f"{counted} attempts in {len(sent)} answers' headers "
              f"({unmarked} without one); the replicas counted {upstream}, Envoy's cluster "
              f"{envoy_attempts} with {envoy_retries} retries; sluice charged {charged}"),
    ]


# The failover backend of chapter 6 (policies/demo.toml): one model served
# by two endpoints in each of zone-a and zone-b (region lab-1) and zone-c
# (region lab-2), zone-a preferred; failback_after 10 s.
REGIONAL = ZonedBackend("regional", "sim-regional", zones=("zone-a", "zone-b", "zone-c"),
                        regions=("lab-1", "lab-1", "lab-2"), failback_after=10.0)
# How soon new calls must leave a zone that answers 503. The issue's
# target is 0.1 s: the zone is drained once outlier detection has ejected
# its endpoints (three failures each) or after ten failures in a row,
# which at the chapter's ~35 calls a second is about that, but more when
# the 2-core machine is loaded (the calls that fail come slower): the
# chapter prints what it measured against the target and asserts this
# looser bound.
MOVE_TARGET_S = 0.1
MOVE_BOUND_S = 1.0
# How soon a slow zone and a lost region must be left (the target).
LEAVE_BOUND_S = 2.0
# The slow zone: p99 latency of the calls from LEAVE_BOUND_S on against
# the healthy phase's (the target), and what the chapter asserts:
# a healthy call takes ~200 ms, so the target leaves 40 ms of noise to
# Python clients sharing 2 cores with Envoy and sixteen simulators. The
# probes of the slow zone are left out: each is a call that pays its
# 500 ms (about one a second, 2-3% of the chapter's calls, so they would be
# the p99 by themselves); the chapter counts them apart.
P99_TARGET = 1.2
P99_BOUND = 1.4


@dataclass(frozen=True)
class Route:
    """Where sluice sent a call and why: its ``x-sluice-zone`` header
    (``zone-b; reason=retry; first=zone-a/preferred``)."""

    zone: str = ""  # the zone that served it
    reason: str = ""  # preferred, spill, probe, panic or retry
    first: str = ""  # the zone chosen first (the served one unless retried)
    why: str = ""  # why that zone was chosen

    @classmethod
    def of(cls, outcome: Outcome) -> "Route":
        zone, _, rest = outcome.routed.partition(";")
        fields = dict(part.strip().partition("=")[::2] for part in rest.split(";"))
        reason = fields.get("reason", "")
        first, _, why = fields.get("first", "").partition("/")
        return cls(zone.strip(), reason, first or zone.strip(), why or reason)

    @property
    def probe(self) -> bool:
        return self.why == "probe"


@dataclass(frozen=True)
class FailoverEvent:
    t: float  # the record's time
    zone: str  # "" for panic
    what: str  # drained, back, spilling, panic or calm (panic over)
    detail: str = ""  # drained: its cause; back: "0% → 100%"


class FailoverLog(EnvoyLog):
    """sluice's failover events for one backend, read from Envoy's log as it
    grows: a zone drained (warn), spilling or failed back, panic."""

    LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\].*sluice failover: "
                      r"backend (\S+): (.*)$")
    # What each line says: its pattern (the zone first), the event, its detail.
    EVENTS = ((re.compile(r"zone (\S+) drained \((\w+)\)"), "drained", "{1}"),
              (re.compile(r"zone (\S+) back from (\d+)% to (\d+)%"), "back", "{1}% → {2}%"),
              (re.compile(r"zone (\S+) at (\d+)% health \((\w+)\)"), "spilling", "{1}% ({2})"),
              (re.compile(r"every zone drained()"), "panic", ""),
              (re.compile(r"panic over()"), "calm", ""))

    def __init__(self, log_path: Path, backend: str, recorder: Recorder, live: LiveView):
        super().__init__(log_path, backend, recorder, live)
        self.events: list[FailoverEvent] = []

    def line(self, t: float, match: re.Match[str]) -> None:
        text = match.group(3)
        for pattern, what, detail in self.EVENTS:
            found = pattern.match(text)
            if found:
                break
        else:
            return
        event = FailoverEvent(t, found.group(1), what, detail.format(*found.groups()))
        self.events.append(event)
        if what in ("drained", "back", "panic"):
            self.recorder.detail(f"{event.zone or 'every zone'} {what}", at=t)
        self.live.note(f"Envoy: {text}", at=t)

    def of(self, zone: str, what: str, t0: float,
           t1: float = float("inf")) -> list[FailoverEvent]:
        return [e for e in self.events if e.zone == zone and e.what == what and t0 <= e.t < t1]


class FailoverWatch:
    """The failover backend seen each second (the live view's columns): the
    answers each zone served, the probes and retried calls among them, the
    second's p99 latency, and each zone's share of new requests (sluice's
    ``sluice_failover.<backend>.<zone>.share`` gauge, sampled into the
    record for the plot)."""

    def __init__(self, lab: Lab, recorder: Recorder, zoned: ZonedBackend):
        self.lab = lab
        self.recorder = recorder
        self.zoned = zoned
        zones = " ".join(f"{z:>6}" for z in zoned.zones)
        self.legend = (f"{', '.join(zoned.zones)}: answers each zone served (x-sluice-zone); "
                       "probe: probes of a drained zone; retry: calls the router retried "
                       "in another zone; p99: the calls' latency (ms); share: each zone's "
                       "share of new requests (%, sluice's gauge)")
        self.title = (f"{zones} | {'probe':>5} {'retry':>5} | {'p99':>5} | "
                      f"share {' '.join(f'{z[-1]:>3}' for z in zoned.zones)}")

    def stats(self) -> dict[str, int]:
        """The backend's failover stats by short name (``zone-a.share``, ``probes``)."""
        return sluice_stats(self.lab, "sluice_failover", self.zoned.backend)

    def row(self, t0: float, t1: float) -> str:
        stats = self.stats()
        now = self.recorder.now()
        for zone in self.zoned.zones:
            share = stats.get(f"{zone}.share")
            if share is not None:
                self.recorder.sample(self.zoned.series(zone, "share"), share, at=now)
        window = self.recorder.between(t0, t1)
        routes = [Route.of(o) for o in window]
        served = Counter(r.zone for r in routes)
        p99 = percentile([o.latency * 1000 for o in window if o.latency is not None], 0.99)
        shares = " ".join(f"{stats.get(f'{z}.share', 0) / 10:>3.0f}" for z in self.zoned.zones)
        return (" ".join(f"{served.get(z, 0):>6}" for z in self.zoned.zones)
                + f" | {sum(r.probe for r in routes):>5} "
                f"{sum(r.reason == 'retry' for r in routes):>5} | "
                + (f"{p99:>5.0f}" if p99 is not None else f"{'-':>5}") + f" |       {shares}")


def zone_failover(ctx: DemoContext) -> list[Check]:
    """Clients stream and not from sim-regional, served from three zones:
    zone-a (preferred) and zone-b in region lab-1, zone-c in lab-2.

    sluice picks each call's zone by its health (endpoints in rotation ×
    recent successes × quota × latency against the other zones) and names
    its endpoints to Envoy's override_host, with the next zone's best
    endpoint as the first fallback: a call that fails in its zone is retried
    in the next one before the client sees anything. A zone under 10% health
    is drained (at most one probe a second, with fallbacks behind it);
    healthy again for failback_after (10 s here), it gets its traffic back,
    once.
    """
    lab = ctx.lab
    zoned = REGIONAL
    local, near, far = zoned.zones
    sims = {zone: lab.endpoint_sims(zoned.backend, zone) for zone in zoned.zones}
    log = FailoverLog(lab.envoy.log_path, zoned.backend, ctx.recorder, ctx.live)
    # The ejections behind a zone's health, in the live view only.
    ejections = OutlierLog(lab.envoy.log_path, zoned.backend,
                           {sim.listen: sim.instance for zone in zoned.zones
                            for sim in sims[zone]},
                           ctx.recorder, ctx.live, notes=("ejected", "returned"), details=False)
    watch = FailoverWatch(lab, ctx.recorder, zoned)
    ctx.live.columns(watch)
    # Eight clients, every other call streamed, each asking for 8 tokens
    # (~200 ms a call): about 35 calls a second, latency that varies little.
    specs = [TrafficSpec(tenant="globex", model=zoned.model, stream_every=2, workers=8,
                         max_tokens=(8, 8), pause=(0.0, 0.05))]

    def poll() -> None:
        ejections.poll()
        log.poll()

    def run(seconds: float, until: Callable[[], bool] | None = None) -> float:
        ctx.traffic(specs, seconds, on_tick=poll, until=until)
        poll()
        return ctx.recorder.now()

    def fault(text: str, zones: tuple[str, ...], **faults) -> float:
        t = ctx.recorder.now()
        ctx.mark(text)
        for zone in zones:
            for sim in sims[zone]:
                sim.set_faults(**faults)
        return t

    def calls(t0: float, t1: float) -> list[Outcome]:
        """The calls made from ``t0`` to ``t1`` (whenever they ended)."""
        return [o for o in ctx.recorder.snapshot() if o.sent is not None and t0 <= o.sent < t1]

    def left(t_fault: float, t_end: float, zones: tuple[str, ...]) -> float:
        """Seconds from the fault to the last call (not a probe) first sent
        to one of ``zones``: when new calls stopped going there."""
        sent = [o.sent for o in calls(t_fault, t_end)
                if Route.of(o).first in zones and not Route.of(o).probe]
        return max(sent) - t_fault if sent else 0.0

    def failed(outcomes: list[Outcome]) -> int:
        return sum(1 for o in outcomes if o.outcome != "ok")

    def p99(outcomes: list[Outcome]) -> float:
        return percentile([o.latency for o in outcomes if o.latency is not None], 0.99) or 0.0

    def heal(text: str, zones: tuple[str, ...]) -> tuple[float, float]:
        """Clears the faults, runs until zone-a has failed back (bounded),
        then a little more to show it serving; returns the heal time and the
        end."""
        t = fault(text, zones)
        run(zoned.failback_after + 15.0, until=lambda: bool(log.of(local, "back", t)))
        return t, run(ctx.seconds(3, floor=2))

    stats_before = watch.stats()
    # 1. Healthy: zone-a serves everything.
    t_start = ctx.recorder.now()
    t_down = run(ctx.seconds(5, floor=3))
    healthy = calls(t_start, t_down)
    # The latency baseline leaves out the first second (new connections).
    baseline = calls(t_start + 1, t_down)

    # 2. zone-a answers 503 to every inference; /health stays green.
    t_down = fault(f"{local} answers 503 (its /health stays up)", (local,), fixed_status=503)
    t_heal = run(ctx.seconds(6, floor=3))
    down = calls(t_down, t_heal)

    # 3. zone-a healed: still drained, probed, then back after failback_after.
    t_heal, t_slow = heal(f"{local} healed", (local,))

    # 4. zone-a answers 500 ms later (no timeout would fire).
    t_slow = fault(f"{local} +500 ms per request", (local,), added_latency_ms=500)
    t_region = run(ctx.seconds(8, floor=4))
    slow = calls(t_slow, t_region)
    # Calls end a phase up to a second before the next starts (run_traffic
    # ends on a tick): the calls before the slowdown are those of its last 2 s.
    was_serving = calls(t_slow - 2, t_slow)

    # 5. Region lab-1 lost: zone-a and zone-b answer 503.
    t_region = fault(f"region {zoned.regions[0]} lost: {local} and {near} answer 503",
                     (local, near), fixed_status=503)
    t_back = run(ctx.seconds(6, floor=3))
    region = calls(t_region, t_back)

    # 6. Everything healed: zone-a fails back.
    t_back, end = heal(f"region {zoned.regions[0]} healed", (local, near))
    stats_after = watch.stats()
    t_stats = ctx.recorder.now()
    # Envoy writes its log every 100 ms: read what it logged up to the stats.
    time.sleep(0.5)
    poll()
    chapter = calls(t_start, end)

    def grew(key: str) -> int:
        return stats_after.get(key, 0) - stats_before.get(key, 0)

    def routes(outcomes: list[Outcome]) -> str:
        counted = Counter(o.routed.split("; first=")[0] or "(none)" for o in outcomes)
        return ", ".join(f"{n} {route}" for route, n in counted.most_common())

    # 2: how the 503 zone was left.
    moved = left(t_down, t_heal, (local,))
    rescued = sum(1 for o in down if Route.of(o).first == local and Route.of(o).reason == "retry")
    drains = log.of(local, "drained", t_down, t_heal)
    drained_at = drains[0].t if drains else t_heal

    # 2-3: probes while zone-a was drained.
    backs = log.of(local, "back", t_heal, t_slow)
    back_at = backs[0].t if backs else t_slow
    # A call reaches Envoy a little after the client made it: leave out the
    # calls made within 0.2 s of the drain and of the fail-back.
    span = calls(drained_at + 0.2, back_at - 0.2)
    probes = [o for o in span if Route.of(o).first == local and Route.of(o).probe]
    planned = [o for o in span if Route.of(o).first == local and not Route.of(o).probe]
    rate = len(probes) / (back_at - drained_at) if back_at > drained_at else 0.0

    def failback(t_healed: float, t_end: float) -> tuple[bool, str]:
        """zone-a failed back once, failback_after or more after it healed,
        and served most calls of the last 2 s."""
        events = log.of(local, "back", t_healed, t_end)
        tail = calls(t_end - 2, t_end)
        on_local = sum(1 for o in tail if Route.of(o).zone == local)
        waited = events[0].t - t_healed if events else 0.0
        held = (len(events) == 1 and waited >= zoned.failback_after
                and on_local > 0.5 * len(tail) > 0)
        spills = log.of(local, "spilling", events[0].t, t_end) if events else []
        seen = (f"{len(events)} fail-back(s) of {local}"
                + (f", {waited:.1f} s after it healed ({events[0].detail})" if events else "")
                + "".join(f"; {e.t - events[0].t:.1f} s later it fell to {e.detail} health "
                          "and spilled" for e in spills)
                + f"; last 2 s: {on_local} of {len(tail)} calls on {local}")
        return held, seen

    def span(outcomes: list[Outcome]) -> float:
        sent = [o.sent if o.sent is not None else o.t for o in outcomes]
        return max(sent) - min(sent) if sent else 0.0

    # 4: the slow zone.
    slow_moved = left(t_slow, t_region, (local,))
    serving = sum(1 for o in was_serving if o.routed == f"{local}; reason=preferred")
    after = [o for o in slow if o.sent >= t_slow + LEAVE_BOUND_S]
    settled = [o for o in after if not Route.of(o).probe]
    slow_probes = [o for o in after if Route.of(o).probe]
    base_p99, slow_p99, all_p99 = p99(baseline), p99(settled), p99(after)
    slow_drains = log.of(local, "drained", t_slow, t_region)

    # 5: the lost region.
    region_moved = left(t_region, t_back, (local, near))
    on_far = sum(1 for o in region if o.sent >= t_region + LEAVE_BOUND_S
                 and Route.of(o).zone == far)
    late = sum(1 for o in region if o.sent >= t_region + LEAVE_BOUND_S)

    # Counters against the log.
    counted = {(zone, what): grew(f"{zone}.{what}s")
               for zone in zoned.zones for what in ("drain", "failback")}
    logged = {(zone, what): len(log.of(zone, {"drain": "drained", "failback": "back"}[what],
                                       t_start, t_stats))
              for zone in zoned.zones for what in ("drain", "failback")}
    totals = summarize(chapter)
    failback_held, failback_seen = failback(t_heal, t_slow)
    final_held, final_seen = failback(t_back, end)

    return [
        Check(f"while healthy, {local} served every call as the preferred zone but the "
              "other zones' probes (at most one a second each: the latency it is judged against)",
              bool(healthy) and failed(healthy) == 0
              and all(o.routed == f"{local}; reason=preferred" or
                      (Route.of(o).probe and Route.of(o).zone != local) for o in healthy)
              and sum(Route.of(o).probe for o in healthy)
              <= (len(zoned.zones) - 1) * (span(healthy) + 2),
              f"{len(healthy)} calls: {routes(healthy)}"),
        Check(f"{local} answering 503: no client saw a failure, and new calls left it within "
              f"{MOVE_BOUND_S:g} s (the issue's target: {MOVE_TARGET_S:g} s, loosened for a "
              "loaded 2-core machine)",
              bool(down) and failed(down) == 0 and moved <= MOVE_BOUND_S and bool(drains),
              f"the last call first sent to {local} left {moved * 1000:.0f} ms after the fault; "
              f"{rescued} calls got a 503 there and were retried in another zone within the "
              f"request; {failed(down)} of {len(down)} calls failed; "
              + (f"drained {drains[0].t - t_down:.2f} s after the fault ({drains[0].detail})"
                 if drains else "no drain logged")),
        Check(f"drained, {local} got probes only, at most about one a second "
              "(probe_interval), and no probe failed its client",
              len(probes) >= 2 and not planned and rate <= 1.2 and failed(probes) == 0,
              f"{len(probes)} probes in {back_at - drained_at:.1f} s ({rate:.2f}/s; "
              f"{sum(1 for o in probes if Route.of(o).zone == local)} answered by {local}, the "
              f"others by a fallback zone), {len(planned)} other calls sent there"
              + "".join(f" ({o.routed}, made {o.sent - drained_at:.2f} s after the drain)"
                        for o in planned[:3]) + "; "
              f"{failed(probes)} probes failed; probes counter +{grew('probes')}"),
        Check(f"healed, {local} failed back once, no sooner than failback_after "
              f"({zoned.failback_after:g} s), and served most calls again",
              failback_held, failback_seen),
        Check(f"{local} 500 ms slower: new calls left it within {LEAVE_BOUND_S:g} s with no "
              f"timeout, and the p99 latency of the calls (not probes) from then on was "
              f"within {P99_BOUND:g}× the healthy phase's (the issue's target: {P99_TARGET:g}×)",
              bool(settled) and serving > 0.5 * len(was_serving) > 0
              and slow_moved <= LEAVE_BOUND_S and failed(slow) == 0
              and slow_p99 <= P99_BOUND * base_p99,
              f"{serving} of {len(was_serving)} calls of the 2 s before preferred {local}; the "
              f"last call first sent there left {slow_moved:.2f} s after the slowdown"
              + (f", drained ({slow_drains[0].detail}) {slow_drains[0].t - t_slow:.2f} s after"
                 if slow_drains else "")
              + f"; p99 {slow_p99 * 1000:.0f} ms over {len(settled)} calls vs "
              f"{base_p99 * 1000:.0f} ms healthy ({slow_p99 / base_p99 if base_p99 else 0:.2f}×); "
              f"with its {len(slow_probes)} probes {all_p99 * 1000:.0f} ms; "
              f"{failed(slow)} failed"),
        Check(f"region {zoned.regions[0]} lost: calls moved to {far} within "
              f"{LEAVE_BOUND_S:g} s, and no client saw a failure",
              bool(region) and region_moved <= LEAVE_BOUND_S and failed(region) == 0
              and on_far == late > 0,
              f"the last call first sent to {local} or {near} left {region_moved * 1000:.0f} ms "
              f"after the fault; from {LEAVE_BOUND_S:g} s on, {on_far} of {late} calls "
              f"answered by {far}; {failed(region)} of {len(region)} calls failed"),
        Check(f"{zoned.regions[0]} healed: traffic came back to {local} once, no sooner than "
              "failback_after, and it served most calls again", final_held, final_seen),
        Check("the drains and failbacks counters agree with Envoy's log, and no client saw an "
              "error, a 429 or the fallback model in the whole chapter",
              counted == logged and totals["ok"] == totals["requests"] > 0,
              "; ".join(f"{zone}: drains +{counted[zone, 'drain']} (logged "
                        f"{logged[zone, 'drain']}), failbacks +{counted[zone, 'failback']} "
                        f"(logged {logged[zone, 'failback']})" for zone in zoned.zones)
              + f"; ok {totals['ok']} of {totals['requests']}, 429 {totals['429']}, fallback "
              f"{totals['fallback']}, errors {totals['error']}"
              + (f" {totals['errors']}" if totals["errors"] else "")),
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
            "Four endpoints serve sim-pool to streaming clients. One turns 5x slower to its "
            "first token: sluice's picks shun it within seconds and it is ejected. One "
            "blackholes: streams it holds are cut at the 1 s first-token deadline and retried "
            "on another endpoint before the client sees anything, and it is ejected. One "
            "answers 429 with retry-after 5: it is benched for 5 s after each, and no client "
            "sees a 429. Cleared, all four serve again.",
            outlier_detection, endpoints=POOL),
    Chapter("retry-budget", "Retry budgets",
            "Three replicas serve sim-flaky to clients using the openai SDK with its default "
            "2 retries. 15% of attempts fail: Envoy retries them on another replica within "
            "sluice's budget (20% of requests + 2/s), and clients barely notice. Then every "
            "replica fails: the budget is spent within a second or two, requests get no retry "
            "(about 1.2 attempts each, not max_retries' 3), and their failures carry "
            "x-should-retry: false, so the SDK does not send them again (its 2 retries would "
            "make 9 attempts per call). Recovered, every call takes one attempt again and the "
            "budget refills.",
            retry_budgets, retries=FLAKY),
    Chapter("zone-failover", "Zone failover",
            "Clients call sim-regional, served from zone-a (preferred) and zone-b in region "
            "lab-1 and zone-c in lab-2. zone-a answers 503 to every call while its /health "
            "stays green: the calls that hit it are retried in zone-b before the client sees "
            "anything, sluice drains it within a fraction of a second and probes it (at most "
            "one call a second). Healed, it gets its traffic back once it has been healthy "
            "for failback_after (10 s here). Then zone-a turns 500 ms slower: traffic leaves "
            "it within 2 s with no timeout. Then region lab-1 is lost: traffic moves to "
            "zone-c, and comes back to zone-a when lab-1 heals.",
            zone_failover, zones=REGIONAL),
]
