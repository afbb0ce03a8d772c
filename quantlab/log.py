"""quantlab's progress lines on stderr, with the wall-clock time and the time since the
process started: a log captured without a terminal (CI, nohup, a Ray worker) still says when
each stage began and how long the silences between lines were."""

from __future__ import annotations

import datetime as _dt
import sys
import time

_T0 = time.monotonic()


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def log(msg: str) -> None:
    """One progress line: ``quantlab 18:22:05 +3m12s: msg``."""
    now = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"quantlab {now} +{_elapsed(time.monotonic() - _T0)}: {msg}", file=sys.stderr, flush=True)
