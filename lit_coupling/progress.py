"""Progress of the steps that take minutes on a real model: a tqdm bar (with its ETA) on a terminal, and on
anything else (a log file, a CI job) one plain line per step, at most one every `every_s` seconds plus the last.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        unit: str = "it",
        every_s: float = 10.0,
        stream=None,
        initial: int = 0,
    ):
        """`initial`: steps already done (a resumed computation); the ETA counts only the steps done here."""
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.done = self.initial = initial
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.done >= self.total or now - self.last_line >= self.every_s:
            elapsed = now - self.start
            rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({elapsed:.0f}s, ETA {eta:.0f}s)",
                file=self.stream,
                flush=True,
            )
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def say(line: str, enabled: bool = True, stream=None) -> None:
    """A line that stays (one per finished edit), printed above any bar."""
    if enabled:
        tqdm.write(line, file=stream or sys.stderr)
