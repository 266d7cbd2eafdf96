"""Drill traffic: real SDK clients against a lab, with faults on a timeline.

A drill runs ``clients`` threads, each sending streamed chat completions
through the ``openai`` SDK until ``seconds`` have passed, while a timer
thread applies ``events`` (a fault set on a simulator, a stats snapshot) at
their offsets. By default the SDK does not retry, so what a client sees is
counted; ``sdk_retries=2`` is the SDK's own default, for drills about what
clients add on top. Every SDK call is a :class:`Sample`, with each HTTP
response the SDK received for it (:class:`Try`: its own retries included);
the helpers below turn samples into the numbers the drills report (p99 time
to first token per window, worst wait, failures).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import openai

MESSAGES = [{"role": "user", "content": "Say something short."}]


@dataclass
class Try:
    """One HTTP response the SDK received during a call."""

    status: int
    should_retry: str | None    # x-should-retry
    attempts: int | None        # x-envoy-attempt-count: upstream attempts behind it


@dataclass
class Sample:
    start: float            # seconds since the drill began
    ttft: float | None      # seconds to the first streamed chunk
    total: float            # seconds to the end (or the error)
    status: int             # HTTP status (0: no answer at all)
    endpoint: str | None    # x-sluice-endpoint's address, else the simulator's instance
    error: str | None = None
    sent: int = 0           # HTTP requests the SDK sent for this call
    tries: list[Try] = field(default_factory=list)   # the responses it got, in order


@dataclass
class Drill:
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, object] = field(default_factory=dict)


def run(base_url: str, *, seconds: float, clients: int = 8, model: str = "sim-large",
        max_tokens: int = 8, events: list[tuple[float, Callable[[], object]]] | None = None,
        tenant: str = "drill", sdk_retries: int = 0) -> Drill:
    """Runs the drill; each event's return value is kept in ``marks`` under
    its offset (``"t=3.0"``). ``sdk_retries`` is the SDK's ``max_retries``
    (its default is 2)."""
    drill = Drill()
    lock = threading.Lock()
    begin = time.monotonic()
    deadline = begin + seconds

    def client_loop() -> None:
        sent = [0]
        tries: list[Try] = []

        def on_request(_request) -> None:
            sent[0] += 1

        def on_response(response) -> None:
            attempts = response.headers.get("x-envoy-attempt-count")
            tries.append(Try(response.status_code, response.headers.get("x-should-retry"),
                             int(attempts) if attempts and attempts.isdigit() else None))

        http = openai.DefaultHttpxClient(
            trust_env=False, event_hooks={"request": [on_request], "response": [on_response]})
        c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-drill",
                          max_retries=sdk_retries, timeout=30.0, http_client=http,
                          default_headers={"x-tenant-id": tenant})
        try:
            while time.monotonic() < deadline:
                sent[0] = 0
                tries.clear()
                drill_sample = one(c, begin, model, max_tokens)
                drill_sample.sent = sent[0]
                drill_sample.tries = list(tries)
                with lock:
                    drill.samples.append(drill_sample)
        finally:
            c.close()
            http.close()

    def timeline() -> None:
        for offset, action in sorted(events or [], key=lambda e: e[0]):
            wait = begin + offset - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            drill.marks[f"t={offset}"] = action()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    threads.append(threading.Thread(target=timeline, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    drill.samples.sort(key=lambda s: s.start)
    return drill


def one(c: openai.OpenAI, begin: float, model: str, max_tokens: int) -> Sample:
    start = time.monotonic()
    ttft = None
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True)
        served = raw.headers.get("x-sluice-endpoint")
        endpoint = served.split(";")[0] if served else raw.headers.get("x-llm-sim-instance")
        for _chunk in raw.parse():
            if ttft is None:
                ttft = time.monotonic() - start
        return Sample(start - begin, ttft, time.monotonic() - start, raw.status_code, endpoint)
    except openai.APIStatusError as err:
        return Sample(start - begin, ttft, time.monotonic() - start, err.status_code,
                      err.response.headers.get("x-sluice-endpoint"), type(err).__name__)
    except openai.APIError as err:
        return Sample(start - begin, ttft, time.monotonic() - start, 0, None, type(err).__name__)


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]


def ttfts(samples: list[Sample], start: float, end: float) -> list[float]:
    return [s.ttft for s in samples if start <= s.start < end and s.ttft is not None]


def recovery(samples: list[Sample], fault_at: float, end: float, bound: float,
             bin_s: float = 0.5) -> float | None:
    """Seconds after ``fault_at`` from which every ``bin_s`` window's p99
    time to first token stays within ``bound``; ``None`` if it never does."""
    last_bad = None
    t = fault_at
    while t < end:
        value = p99(ttfts(samples, t, t + bin_s))
        if value is not None and value > bound:
            last_bad = t + bin_s
        t += bin_s
    if last_bad is None:
        return 0.0
    return None if last_bad >= end else last_bad - fault_at
