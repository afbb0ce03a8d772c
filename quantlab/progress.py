"""Progress of a long loop as log lines, with or without a terminal.

tqdm's bars are off where stderr is not a terminal (CI, nohup, a Ray worker), and a stage of
a 7B model runs for many minutes: :class:`Progress` writes a timestamped line (through
:func:`quantlab.log.log`) at every tenth of the work or every minute, whichever comes first,
with the rate so far and an estimate of the time left, and one line at the end. Used as a
context manager it also writes the minute's line while one unit runs for longer (a 7B layer of
GPTQ takes minutes): a log is never silent for more than ``every_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``with Progress(32, "gptq: quantize") as p:`` ... ``p.step()`` after each unit; the
    closing line when the block ends (or ``p.done()`` without ``with``).

    A line is written when the share done passes the next tenth (``every_fraction``) or
    ``every_s`` seconds after the last line (inside ``with``: even while a unit runs);
    ``clock`` and ``log`` are injectable (tests)."""

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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if exc[0] is None:
            self.done()

    def _heartbeat(self) -> None:
        """The minute's line while a unit runs long (no step() to write it)."""
        while not self._stop.wait(min(5.0, self.every_s / 4)):
            with self._lock:
                now = self.clock()
                if now - self._last >= self.every_s and self.count < self.total:
                    self._last = now
                    self.log(
                        self.line(now)
                        + f"; {self.unit.removesuffix('s')} {self.count + 1} under way"
                    )

    def step(self, n: int = 1) -> None:
        with self._lock:
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
