"""Client traffic for the demo: bounded loops of real openai SDK calls, and
the record of what each request came back as.

Every loop is bounded twice: by a deadline and by a request count. Each
request has its own timeout and the SDK's retries are off unless a chapter
turns them on (``TrafficSpec.sdk_max_retries``), so what the record shows is
what Envoy and sluice did, not what the client papered over. Every HTTP
request the SDK sends, retries included, is recorded as well (an httpx event
hook on its client): what came back and what Envoy said of it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import openai

OUTCOMES = ("ok", "429", "fallback", "error")
TENANT_HEADER = "x-tenant-id"


@dataclass(frozen=True)
class Outcome:
    """One finished request."""

    t: float  # seconds since the demo started
    tenant: str
    stream: bool
    outcome: str  # one of OUTCOMES
    tokens: int  # prompt + completion tokens billed (0 unless ok/fallback)
    zone: str = ""
    detail: str = ""
    instance: str = ""  # the llm-sim that answered (x-llm-sim-instance)
    pick: str = ""  # why sluice sent it there (x-sluice-endpoint's reason), if it picked
    ttft: float | None = None  # streams: seconds from the call to the first chunk
    sent: float | None = None  # when the call was made (the record's time)
    routed: str = ""  # x-sluice-zone as sent: the zone that served it and why
    http_requests: int = 1  # HTTP requests the SDK sent for this call (its retries too)
    exchanges: tuple["Exchange", ...] = ()  # their answers, in order

    @property
    def latency(self) -> float | None:
        """Seconds from the call to its end (its last chunk, for a stream)."""
        return None if self.sent is None else self.t - self.sent


@dataclass(frozen=True)
class Exchange:
    """One HTTP request the SDK sent and the answer's head (an SDK call
    that the SDK retries is several)."""

    t: float  # when the answer's headers came back
    tenant: str
    model: str
    status: int
    attempts: int  # x-envoy-attempt-count: upstream attempts Envoy made for it (0 if absent)
    should_retry: str  # x-should-retry as sent ("false" tells the SDK not to retry)

    @property
    def failed(self) -> bool:
        return self.status == 429 or self.status >= 500


@dataclass
class Recorder:
    """Thread-safe record of outcomes and chapter events."""

    start: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    # Values a chapter's watcher samples (counters, gauges), by name: (t, value).
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # Smaller events (an endpoint ejected…): shown on their chapter's own plot only.
    details: list[tuple[float, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def exchange(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def sample(self, name: str, value: float, at: float | None = None) -> None:
        with self._lock:
            self.samples.setdefault(name, []).append((self.now() if at is None else at, value))

    def mark(self, text: str) -> None:
        with self._lock:
            self.events.append((self.now(), text))

    def detail(self, text: str, at: float | None = None) -> None:
        with self._lock:
            self.details.append((self.now() if at is None else at, text))

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def between(self, t0: float, t1: float) -> list[Outcome]:
        return [o for o in self.snapshot() if t0 <= o.t < t1]

    def exchanges_between(self, t0: float, t1: float, model: str | None = None) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges
                    if t0 <= e.t < t1 and (model is None or e.model == model)]

    def series(self, name: str, t0: float = float("-inf"),
               t1: float = float("inf")) -> list[tuple[float, float]]:
        with self._lock:
            return [(t, v) for t, v in self.samples.get(name, []) if t0 <= t < t1]


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts by outcome and tokens by tenant."""
    by_outcome = Counter(o.outcome for o in outcomes)
    tokens: dict[str, int] = defaultdict(int)
    requests: dict[str, int] = defaultdict(int)
    for o in outcomes:
        tokens[o.tenant] += o.tokens
        requests[o.tenant] += 1
    return {
        "requests": len(outcomes),
        **{k: by_outcome.get(k, 0) for k in OUTCOMES},
        "tokens": dict(tokens),
        "tenant_requests": dict(requests),
        "zones": dict(Counter(o.zone for o in outcomes if o.zone)),
        "errors": dict(Counter(o.detail for o in outcomes if o.outcome == "error")),
    }


@dataclass(frozen=True)
class TrafficSpec:
    """One tenant's client loop."""

    tenant: str
    model: str = "sim-large"
    stream_every: int = 2  # every Nth request streams (1 = all, 0 = none)
    max_tokens: tuple[int, int] = (8, 24)
    pause: tuple[float, float] = (0.05, 0.25)  # seconds between requests
    workers: int = 2
    max_requests: int = 2000  # per worker: the count bound of the loop
    # The SDK's own retries (openai.DEFAULT_MAX_RETRIES is the SDK's default).
    sdk_max_retries: int = 0


def _answered_by(headers) -> dict[str, str]:
    """The simulator that answered, and why sluice sent the request there
    (``x-sluice-endpoint: 127.0.0.1:PORT; reason=p2c``, on backends whose
    endpoints sluice picks; ``x-sluice-zone``, on backends it fails over)."""
    return {"instance": headers.get("x-llm-sim-instance", ""),
            "pick": headers.get("x-sluice-endpoint", "").partition("reason=")[2].strip(),
            "routed": headers.get("x-sluice-zone", "")}


class _Sent(threading.local):
    """HTTP requests the SDK sent from this thread for its current call, and
    the answers it got."""

    def __init__(self) -> None:
        self.count = 0
        self.answers: list[Exchange] = []


def _one_request(client: openai.OpenAI, spec: TrafficSpec, stream: bool, rng: random.Random,
                 recorder: Recorder, sent: _Sent) -> Outcome:
    sent.count, sent.answers = 0, []
    outcome = _call(client, spec, stream, rng, recorder)
    return dataclasses.replace(outcome, http_requests=sent.count,
                               exchanges=tuple(sent.answers))


def _call(client: openai.OpenAI, spec: TrafficSpec, stream: bool, rng: random.Random,
          recorder: Recorder) -> Outcome:
    max_tokens = rng.randint(*spec.max_tokens)
    messages = [{"role": "user", "content": f"Say something about sluice, {spec.tenant}."}]
    ttft = None
    called = recorder.now()
    try:
        if stream:
            sent = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(
                model=spec.model, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True})
            model, usage = "", None
            with raw.parse() as chunks:
                for chunk in chunks:
                    if ttft is None:
                        ttft = time.monotonic() - sent
                    model = chunk.model or model
                    usage = chunk.usage or usage
            tokens = usage.total_tokens if usage else 0
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=spec.model, messages=messages, max_tokens=max_tokens)
            completion = raw.parse()
            model = completion.model
            tokens = completion.usage.total_tokens if completion.usage else 0
        zone = raw.headers.get("x-llm-sim-zone", "")
        answered = _answered_by(raw.headers)
        fell_back = model != spec.model or answered["instance"].startswith("fallback")
        return Outcome(recorder.now(), spec.tenant, stream,
                       "fallback" if fell_back else "ok", tokens, zone, ttft=ttft, sent=called,
                       **answered)
    except openai.RateLimitError as err:
        return Outcome(recorder.now(), spec.tenant, stream, "429", 0, sent=called,
                       **_answered_by(err.response.headers))
    except openai.APIStatusError as err:
        return Outcome(recorder.now(), spec.tenant, stream, "error", 0,
                       detail=f"HTTP {err.status_code}", sent=called,
                       **_answered_by(err.response.headers))
    except openai.APIError as err:
        return Outcome(recorder.now(), spec.tenant, stream, "error", 0,
                       detail=type(err).__name__, sent=called)


def run_traffic(base_url: str, specs: list[TrafficSpec], seconds: float,
                recorder: Recorder, on_tick: Callable[[], None] | None = None,
                seed: int = 7, until: Callable[[], bool] | None = None) -> None:
    """Runs every spec's workers for ``seconds``; ``on_tick`` runs each second,
    then ``until``, which ends the traffic early when it returns true.

    Ctrl-C (KeyboardInterrupt in this, the main thread) stops the workers too.
    """
    deadline = time.monotonic() + seconds
    done = threading.Event()
    sent = _Sent()

    def client_for(spec: TrafficSpec) -> openai.OpenAI:
        def on_request(request) -> None:
            sent.count += 1

        def on_response(response) -> None:
            headers = response.headers
            try:
                attempts = int(headers.get("x-envoy-attempt-count", "0"))
            except ValueError:
                attempts = 0
            exchange = Exchange(recorder.now(), spec.tenant, spec.model, response.status_code,
                                attempts, headers.get("x-should-retry", ""))
            sent.answers.append(exchange)
            recorder.exchange(exchange)

        http = openai.DefaultHttpxClient(
            trust_env=False, event_hooks={"request": [on_request], "response": [on_response]})
        return openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-demo",
                             max_retries=spec.sdk_max_retries, timeout=15.0,
                             default_headers={TENANT_HEADER: spec.tenant}, http_client=http)

    clients = [client_for(spec) for spec in specs]

    def worker(number: int, spec: TrafficSpec, index: int) -> None:
        rng = random.Random(f"{seed}-{spec.tenant}-{index}")
        client = clients[number]
        for n in range(spec.max_requests):
            if done.is_set() or time.monotonic() >= deadline:
                return
            stream = spec.stream_every > 0 and (n + index) % spec.stream_every == 0
            recorder.add(_one_request(client, spec, stream, rng, recorder, sent))
            done.wait(rng.uniform(*spec.pause))

    threads = [threading.Thread(target=worker, args=(number, spec, i), daemon=True,
                                name=f"traffic-{spec.tenant}-{number}-{i}")
               for number, spec in enumerate(specs) for i in range(spec.workers)]
    for thread in threads:
        thread.start()
    try:
        # A request times out after 15 s, so the workers end by deadline + 15 s.
        hard_stop = deadline + 20.0
        next_tick = time.monotonic() + 1.0
        while any(t.is_alive() for t in threads) and time.monotonic() < hard_stop:
            time.sleep(max(0.0, min(next_tick, hard_stop) - time.monotonic()))
            if time.monotonic() >= next_tick:
                next_tick += 1.0
                if on_tick is not None:
                    on_tick()
                if until is not None and until():
                    break
    finally:
        done.set()
        for thread in threads:
            thread.join(20.0)
        for client in clients:
            client.close()


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0–1) of ``values`` by nearest rank; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]
