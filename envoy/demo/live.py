"""The live view: one line per second of what the clients saw."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

from .traffic import Recorder

TENANTS = ("acme", "globex")


class LiveView:
    """Prints the last second's outcomes and each tenant's tokens so far."""

    def __init__(self, recorder: Recorder, out=sys.stdout):
        self.recorder = recorder
        self.out = out
        self.last = 0.0
        self.chapter_start = 0.0

    def header(self, chapter_start: float) -> None:
        self.chapter_start = chapter_start
        self.last = chapter_start
        tenants = " ".join(f"{t:>9}" for t in TENANTS)
        self._print(f"  {'t(s)':>5} | {'req':>4} {'ok':>4} {'429':>4} {'fallbk':>6} "
                    f"{'errors':>6} | tokens {tenants}")

    def tick(self) -> None:
        now = self.recorder.now()
        window = self.recorder.between(self.last, now)
        self.last = now
        counts = Counter(o.outcome for o in window)
        tokens: dict[str, int] = defaultdict(int)
        for o in self.recorder.between(self.chapter_start, now):
            tokens[o.tenant] += o.tokens
        per_tenant = " ".join(f"{tokens.get(t, 0):>9,}" for t in TENANTS)
        self._print(f"  {now - self.chapter_start:>5.0f} | {len(window):>4} {counts['ok']:>4} "
                    f"{counts['429']:>4} {counts['fallback']:>6} {counts['error']:>6} | "
                    f"       {per_tenant}")

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
