"""Drill traffic: real SDK clients against a lab, with faults on a timeline.

A drill runs ``clients`` threads, each sending chat completions through the
``openai`` SDK (or messages through the ``anthropic`` SDK, ``sdk=
"anthropic"``) until ``seconds`` have passed, streamed, not streamed, or
alternating (``stream=None``), while a timer thread applies ``events`` (a
fault set on a simulator, a stats snapshot) at their offsets. By default the
SDK does not retry, so what a client sees is counted; ``sdk_retries=2`` is
the SDK's own default, for drills about what clients add on top. Every SDK
call is a :class:`Sample`, with each HTTP response the SDK received for it
(:class:`Try`: its own retries included) and the zone that answered; the
helpers below turn samples into the numbers the drills report (p99 time to
first token per window, worst wait, failures).

What a client cannot see, the attempts Envoy made for it (retries, probes),
Envoy's own logs can: :func:`with_upstream_log` adds the router's log of
every upstream attempt (and, optionally, an access log of every request),
and :func:`flushed` reads a log once Envoy stopped writing to it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anthropic
import openai
import yaml

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
    streamed: bool = True
    zone: str | None = None     # x-llm-sim-zone: the zone whose simulator answered
    reason: str | None = None   # x-sluice-zone's reason (preferred, spill, probe, …)

    @property
    def wait(self) -> float:
        """Time to the first token, or to the whole answer when not
        streamed (or when no token came): what a user waits for."""
        return self.ttft if self.ttft is not None else self.total


@dataclass
class Drill:
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, object] = field(default_factory=dict)


def run(base_url: str, *, seconds: float, clients: int = 8, model: str = "sim-large",
        max_tokens: int = 8, events: list[tuple[float, Callable[[], object]]] | None = None,
        tenant: str = "drill", sdk_retries: int = 0, stream: bool | None = True,
        sdk: str = "openai") -> Drill:
    """Runs the drill; each event's return value is kept in ``marks`` under
    its offset (``"t=3.0"``). ``sdk_retries`` is the SDK's ``max_retries``
    (its default is 2). ``stream=None`` alternates streamed and whole
    answers, each client starting with the other kind than its neighbour.
    ``sdk`` is ``"openai"`` (chat completions) or ``"anthropic"`` (messages)."""
    if sdk not in ("openai", "anthropic"):
        raise ValueError(f"sdk must be openai or anthropic, got {sdk!r}")
    drill = Drill()
    lock = threading.Lock()
    begin = time.monotonic()
    deadline = begin + seconds

    def client_loop(index: int) -> None:
        sent = [0]
        tries: list[Try] = []

        def on_request(_request) -> None:
            sent[0] += 1

        def on_response(response) -> None:
            attempts = response.headers.get("x-envoy-attempt-count")
            tries.append(Try(response.status_code, response.headers.get("x-should-retry"),
                             int(attempts) if attempts and attempts.isdigit() else None))

        hooks = {"request": [on_request], "response": [on_response]}
        c: Any
        if sdk == "anthropic":
            http = anthropic.DefaultHttpxClient(trust_env=False, event_hooks=hooks)
            c = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-drill",
                                    max_retries=sdk_retries, timeout=30.0, http_client=http,
                                    default_headers={"x-tenant-id": tenant})
            call = one_anthropic
        else:
            http = openai.DefaultHttpxClient(trust_env=False, event_hooks=hooks)
            c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-drill",
                              max_retries=sdk_retries, timeout=30.0, http_client=http,
                              default_headers={"x-tenant-id": tenant})
            call = one
        calls = 0
        try:
            while time.monotonic() < deadline:
                sent[0] = 0
                tries.clear()
                streamed = stream if stream is not None else (index + calls) % 2 == 0
                calls += 1
                drill_sample = call(c, begin, model, max_tokens, streamed)
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

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(clients)]
    threads.append(threading.Thread(target=timeline, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    drill.samples.sort(key=lambda s: s.start)
    return drill


def _zone_headers(headers: Any) -> dict[str, Any]:
    """What the answer's headers say about where it was served:
    ``x-sluice-endpoint``'s address (else the simulator's instance),
    ``x-llm-sim-zone``, and ``x-sluice-zone``'s reason."""
    served = headers.get("x-sluice-endpoint")
    zone_header = headers.get("x-sluice-zone") or ""
    reason = None
    for part in zone_header.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "reason":
            reason = value
    return {"endpoint": served.split(";")[0] if served else headers.get("x-llm-sim-instance"),
            "zone": headers.get("x-llm-sim-zone"), "reason": reason}


def one(c: openai.OpenAI, begin: float, model: str, max_tokens: int,
        stream: bool = True) -> Sample:
    """One chat completion through the ``openai`` SDK."""
    start = time.monotonic()
    ttft = None
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=stream)
        where = _zone_headers(raw.headers)
        if stream:
            for _chunk in raw.parse():
                if ttft is None:
                    ttft = time.monotonic() - start
        else:
            raw.parse()
        return Sample(start - begin, ttft, time.monotonic() - start, raw.status_code,
                      streamed=stream, **where)
    except openai.APIStatusError as err:
        where = _zone_headers(err.response.headers)
        where["endpoint"] = err.response.headers.get("x-sluice-endpoint")
        return Sample(start - begin, ttft, time.monotonic() - start, err.status_code,
                      error=type(err).__name__, streamed=stream, **where)
    except openai.APIError as err:
        return Sample(start - begin, ttft, time.monotonic() - start, 0, None, type(err).__name__,
                      streamed=stream)


def one_anthropic(c: anthropic.Anthropic, begin: float, model: str, max_tokens: int,
                  stream: bool = True) -> Sample:
    """One message through the ``anthropic`` SDK."""
    start = time.monotonic()
    ttft = None
    try:
        raw = c.messages.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=stream)
        where = _zone_headers(raw.headers)
        if stream:
            for event in raw.parse():
                if ttft is None and event.type == "content_block_delta":
                    ttft = time.monotonic() - start
        else:
            raw.parse()
        return Sample(start - begin, ttft, time.monotonic() - start, raw.status_code,
                      streamed=stream, **where)
    except anthropic.APIStatusError as err:
        where = _zone_headers(err.response.headers)
        return Sample(start - begin, ttft, time.monotonic() - start, err.status_code,
                      error=type(err).__name__, streamed=stream, **where)
    except anthropic.APIError as err:
        return Sample(start - begin, ttft, time.monotonic() - start, 0, None, type(err).__name__,
                      streamed=stream)


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


# -- what Envoy saw ---------------------------------------------------------

#: The router's line per upstream attempt: request id, host, status.
UPSTREAM_LOG_FORMAT = "%REQ(X-REQUEST-ID)% %UPSTREAM_HOST% %RESPONSE_CODE%\n"


def with_upstream_log(path: Path, log_format: str = UPSTREAM_LOG_FORMAT, *,
                      access_log: Path | None = None, access_format: str = ""):
    """A bootstrap hook: Envoy's router logs every upstream attempt (retries
    included) to ``path`` as ``log_format`` says (by default the request's
    id, the host and the status); with ``access_log``, the connection manager
    also logs every request there as ``access_format`` says (once, when it
    ends, with the response headers sluice set)."""
    def file_log(to: Path, fmt: str) -> dict:
        return {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(to),
                "log_format": {"text_format_source": {"inline_string": fmt}},
            },
        }

    def hook(bootstrap: str) -> str:
        doc = yaml.safe_load(bootstrap)
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        for f in hcm["typed_config"]["http_filters"]:
            if f["name"] == "envoy.filters.http.router":
                f["typed_config"]["upstream_log"] = [file_log(path, log_format)]
        if access_log is not None:
            hcm["typed_config"]["access_log"] = [file_log(access_log, access_format)]
        return yaml.safe_dump(doc, sort_keys=False)
    return hook


def flushed(log: Path, quiet: float = 0.5, most: float = 10.0) -> str:
    """The log once Envoy stopped adding to it (the lab's Envoy flushes
    files every 100 ms)."""
    deadline = time.monotonic() + most
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = log.stat().st_size if log.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.1)
    return log.read_text() if log.exists() else ""
