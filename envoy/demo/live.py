"""The live view: one line per second of what the clients saw."""

from __future__ import annotations

import sys
import textwrap
from collections import Counter, defaultdict
from typing import Protocol

from .traffic import Recorder, percentile

TENANTS = ("acme", "globex")


class Columns(Protocol):
    """A chapter's own columns, after the outcome counts (``LiveView.columns``)."""

    #: The columns' titles, as wide as the values ``row`` returns (an
    #: optional ``legend`` attribute is printed above them).
    title: str

    def row(self, t0: float, t1: float) -> str:
        """The values for the second from ``t0`` to ``t1`` (the record's time)."""


class LiveView:
    """Prints the last second's outcomes and each tenant's tokens so far.

    A chapter about one backend's endpoints (``header(..., endpoints=[...])``,
    the llm-sim instance names in the policy's order) sees instead which
    endpoint answered each request (``ep0``, ``ep1``… in that order) and
    the clients' time to first token (p50 and p99 of the second's streams).
    A chapter may instead bring columns of its own (``columns(...)``, before
    its first line: the header is printed with the first line).
    """

    def __init__(self, recorder: Recorder, out=sys.stdout):
        self.recorder = recorder
        self.out = out
        self.last = 0.0
        self.chapter_start = 0.0
        self.endpoints: list[str] = []
        self.extra: Columns | None = None
        self.pending_header = False

    def header(self, chapter_start: float, endpoints: list[str] | None = None) -> None:
        """Starts a chapter's view; its header is printed with its first line."""
        self.chapter_start = chapter_start
        self.last = chapter_start
        self.endpoints = list(endpoints or [])
        self.extra = None
        self.pending_header = True

    def columns(self, columns: Columns) -> None:
        """The chapter's own columns instead of the tokens per tenant."""
        self.extra = columns
        self.pending_header = True

    def _print_header(self) -> None:
        self.pending_header = False
        counts = f"  {'t(s)':>5} | {'req':>4} {'ok':>4} {'429':>4} {'fallbk':>6} {'errors':>6} | "
        if self.extra is not None:
            for line in textwrap.wrap(getattr(self.extra, "legend", ""), 96,
                                      break_on_hyphens=False):
                self._print(f"  {line}")
            self._print(f"{counts}{self.extra.title}")
            return
        if self.endpoints:
            for i, instance in enumerate(self.endpoints):
                self._print(f"  {endpoint_label(i)} = {instance}")
            labels = " ".join(f"{endpoint_label(i):>4}" for i in range(len(self.endpoints)))
            self._print(f"{counts}answered by {labels} | {'ttft p50':>8} {'p99':>5} (ms)")
            return
        tenants = " ".join(f"{t:>9}" for t in TENANTS)
        self._print(f"{counts}tokens {tenants}")

    def tick(self) -> None:
        now = self.recorder.now()
        window = self.recorder.between(self.last, now)
        last, self.last = self.last, now
        counts = Counter(o.outcome for o in window)
        line = (f"  {now - self.chapter_start:>5.0f} | {len(window):>4} {counts['ok']:>4} "
                f"{counts['429']:>4} {counts['fallback']:>6} {counts['error']:>6} | ")
        if self.extra is not None:
            self._print(f"{line}{self.extra.row(last, now)}")
            return
        if self.endpoints:
            answered = Counter(o.instance for o in window)
            per_endpoint = " ".join(f"{answered.get(e, 0):>4}" for e in self.endpoints)
            ttfts = [o.ttft * 1000 for o in window if o.ttft is not None]
            p50, p99 = percentile(ttfts, 0.5), percentile(ttfts, 0.99)
            latency = (f"{p50:>8.0f} {p99:>5.0f}" if p50 is not None and p99 is not None
                       else f"{'-':>8} {'-':>5}")
            self._print(f"{line}{'':12}{per_endpoint} | {latency}")
            return
        tokens: dict[str, int] = defaultdict(int)
        for o in self.recorder.between(self.chapter_start, now):
            tokens[o.tenant] += o.tokens
        per_tenant = " ".join(f"{tokens.get(t, 0):>9,}" for t in TENANTS)
        self._print(f"{line}       {per_tenant}")

    def note(self, text: str, at: float | None = None) -> None:
        """A line between the seconds: a fault injected, what Envoy logged
        (``at``: when it happened, in the record's time; default now)."""
        when = self.recorder.now() if at is None else at
        self._print(f"  {when - self.chapter_start:>5.1f} > {text}")

    def _print(self, line: str) -> None:
        if self.pending_header:
            self._print_header()
        print(line, file=self.out, flush=True)


def endpoint_label(index: int) -> str:
    """The short name of a backend's ``index``-th endpoint in the live view."""
    return f"ep{index}"
