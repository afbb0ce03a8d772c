"""Progress of a long loop as log lines, with or without a terminal.

tqdm's bars are off where stderr is not a terminal (CI, nohup, a Ray worker), and a stage of
a 7B model runs for many minutes: :class:`Progress` writes a timestamped line (through
:func:`quantlab.log.log`) at every tenth of the work or every minute, whichever comes first,
with the rate so far and an estimate of the time left, and one line at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``p = Progress(32, "gptq: layers")``; ``p.step()`` after each unit; ``p.done()``.

    A line is written when the share done passes the next tenth (``every_fraction``) or
    ``every_s`` seconds after the last line; ``clock`` and ``log`` are injectable (tests)."""

    def __init__(
        self,
        total: int,
        what: str,
        *,
        unit: str = "layers",
        log: Callable[[str], None] | None = None,
        every_fraction: float = 0.1,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if log is None:
            from quantlab.log import log
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        self.log, self.every_fraction, self.every_s, self.clock = (
            log,
            every_fraction,
            every_s,
            clock,
        )
        self.count = 0
        self.t0 = self._last = clock()
        self._next_fraction = every_fraction

    def step(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        frac = self.count / self.total if self.total else 1.0
        if self.count >= self.total:
            return  # the last line is done()'s
        if frac + 1e-12 >= self._next_fraction or now - self._last >= self.every_s:
            while self._next_fraction <= frac + 1e-12:
                self._next_fraction += self.every_fraction
            self._last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        pct = 100.0 * self.count / self.total if self.total else 100.0
        text = (
            f"{self.what}: {self.count}/{self.total} {self.unit} ({pct:.0f}%), {duration(elapsed)}"
        )
        if 0 < self.count < self.total:
            left = elapsed / self.count * (self.total - self.count)
            text += f", about {duration(left)} left"
        return text

    def done(self) -> float:
        """Write the closing line; return the seconds since the start."""
        now = self.clock()
        elapsed = now - self.t0
        self.log(f"{self.what}: {self.count}/{self.total} {self.unit} done in {duration(elapsed)}")
        return elapsed
