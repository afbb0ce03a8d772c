"""External processes quantlab starts (llama.cpp's tools, llama.cpp's converter, pip).

The rule, for every one of them:

- it runs with a **timeout** (``timeout_s``; the caller's default scales with the work, and
  ``$QUANTLAB_TOOL_TIMEOUT_S`` overrides every default, for machines much slower than the
  defaults assume); past it the process is killed and the run gets one error naming the tool,
  the limit and the variable that raises it;
- it runs in **its own process group** (a new session), and the whole group is killed when it
  times out, when quantlab is interrupted (Ctrl-C, SIGTERM turned into an exception) or when
  any other exception passes through the wait: no tool outlives the run that started it;
- a tool that exits 0 without writing what it promised (``outputs``) is a failure, named as
  such, not a ``FileNotFoundError`` later;
- its temporary files live inside the run directory, or in a directory from
  :func:`scratch_dir`, which is removed on every exit path.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from quantlab.errors import QuantlabError

TIMEOUT_ENV = "QUANTLAB_TOOL_TIMEOUT_S"


class ToolError(QuantlabError):
    """An external tool failed, timed out, or did not write what it promised."""


def timeout_for(default_s: float) -> float:
    """``default_s``, unless ``$QUANTLAB_TOOL_TIMEOUT_S`` sets every tool's limit."""
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return default_s
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise QuantlabError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def _prctl():
    """libc's prctl, looked up in quantlab's process (the child between fork and exec should
    do as little as it can), or None where there is none (not Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _prctl()


def die_with_parent() -> Callable[[], None] | None:
    """What a child runs before exec: SIGKILL it when the thread that started it ends (Linux's
    PR_SET_PDEATHSIG). quantlab killed with SIGKILL runs no cleanup, so its tools and servers
    must not outlive it; a server's own children are stopped with its group on every other
    exit path. None where prctl does not exist."""
    if _PRCTL is None:
        return None
    prctl = _PRCTL
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole group (its children too), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.communicate(timeout=10)


def _tail(text: str, lines: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def run_tool(
    cmd: Sequence[str | os.PathLike],
    *,
    what: str,
    timeout_s: float,
    outputs: Sequence[Path] = (),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` under the module's rule and return its completed process (text output).
    ``what`` names the tool in errors ("llama-quantize of 'x.gguf' to Q4_0"); ``check``: a
    non-zero exit is a :class:`ToolError` (with the last lines of its output)."""
    limit = timeout_for(timeout_s)
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    except OSError as e:
        raise ToolError(f"{what}: '{argv[0]}' cannot run ({e.strerror or e})") from None
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ToolError(
            f"{what} did not finish within {limit:.0f} s and was stopped; if this machine "
            f"is just slow, raise the limit with {TIMEOUT_ENV}=SECONDS"
        ) from None
    except BaseException:
        _kill_group(proc)  # Ctrl-C or an error in this process: the tool goes with it
        raise
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise ToolError(f"{what} failed (exit {proc.returncode}): {_tail(err or out)}")
    missing = [str(p) for p in outputs if not Path(p).is_file()]
    if check and missing:
        raise ToolError(
            f"{what} exited without an error but did not write {', '.join(missing)}; "
            f"its output ended: {_tail(err or out)}"
        )
    return done


#: the file a live scratch directory's owner holds locked (the kernel drops the lock when the
#: owner dies, however it dies: a SIGKILL or the OOM killer leave a directory but no lock)
_SCRATCH_LOCK = ".quantlab-scratch.lock"


@contextlib.contextmanager
def scratch_dir(prefix: str, *, inside: Path | None = None) -> Iterator[Path]:
    """A temporary directory for a tool's files, removed on every exit path (an error, Ctrl-C).
    ``inside``: create it there (a run directory) rather than in the system's temporary
    directory, so that large files count against the run's own disk. Directories of the same
    ``prefix`` left there by a process that was killed outright (nothing can remove its own
    directory then) are removed first: their owner's lock is free."""
    parent = Path(inside) if inside is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        # locked under another name first: the lock file appears already held
        with _held(path / f"{_SCRATCH_LOCK}.new", wait=True):
            os.replace(path / f"{_SCRATCH_LOCK}.new", path / _SCRATCH_LOCK)
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove ``parent/prefix*`` scratch directories whose owner is gone (lock free). One
    without a lock file is being created right now, or is not ours: it is left alone."""
    for old in parent.glob(f"{glob.escape(prefix)}*"):
        lock = old / _SCRATCH_LOCK
        if old.is_symlink() or not old.is_dir() or not lock.is_file():
            continue
        with contextlib.suppress(OSError), _held(lock, wait=False) as mine:
            if mine:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _held(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on ``path`` (created) for the block; False when ``wait`` is off and
    another process holds it. Without flock (not POSIX) nothing is ever taken for abandoned."""
    try:
        import fcntl
    except ImportError:
        yield wait
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
