"""External tools under quantlab.procs' rule (issue 26, class 6): a tool that never returns is
stopped at its time limit, a tool that exits 0 without writing is named as such, Ctrl-C stops
the tool with the run, and no process or temporary file outlives either. The tools here are
small shell scripts standing in for llama.cpp's (one that sleeps, one that writes nothing);
everything around them runs for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from quantlab.errors import QuantlabError
from quantlab.procs import TIMEOUT_ENV, ToolError, run_tool, scratch_dir, timeout_for

TESTS = Path(__file__).resolve().parent


def _alive(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie waiting for its reaper does not)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _gone(pids: list[int], within_s: float = 10) -> list[int]:
    """The pids still running after ``within_s`` (a SIGKILLed process takes a moment to go,
    longer on a loaded machine: the kill is sent before the call returns, not completed)."""
    deadline = time.monotonic() + within_s
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _pids(path: Path, n: int = 2, wait_s: float = 120) -> list[int]:
    """The pids a fake tool wrote into ``path`` (its own and its child's), once it wrote them."""
    deadline = time.monotonic() + wait_s
    while not (path.is_file() and len(lines := path.read_text().split()) >= n):
        if time.monotonic() > deadline:
            raise AssertionError(f"the fake tool never wrote its pids into {path}")
        time.sleep(0.1)
    return [int(x) for x in lines[:n]]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


#: a tool that starts a child and waits for it for ever (as far as any test is concerned)
_HANGS = """
    echo $$ >> "$PIDS"
    sleep 120 &
    echo $! >> "$PIDS"
    wait
"""


# --------------------------------------------------------------------------- run_tool itself


def test_a_tool_past_its_limit_is_stopped_with_its_children(tmp_path, monkeypatch):
    tool = _script(tmp_path / "hangs", _HANGS)
    monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    t0 = time.monotonic()
    with pytest.raises(ToolError) as e:
        run_tool([tool], what="the hanging tool", timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert str(e.value) == (
        f"the hanging tool did not finish within 2 s and was stopped; if this machine is "
        f"just slow, raise the limit with {TIMEOUT_ENV}=SECONDS"
    )
    assert _gone(_pids(tmp_path / "pids")) == []  # the shell and its sleep: the whole group


def test_ctrl_c_during_a_tool_stops_it_and_is_raised(tmp_path, monkeypatch):
    tool = _script(tmp_path / "hangs", _HANGS)
    pids = tmp_path / "pids"
    monkeypatch.setenv("PIDS", str(pids))

    def interrupt():
        _pids(pids)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while run_tool waits

    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tool([tool], what="the hanging tool", timeout_s=300)
    finally:
        thread.join()
    assert _gone(_pids(pids)) == []


def test_a_tool_dies_with_a_quantlab_killed_outright(tmp_path):
    """SIGKILL runs no cleanup in quantlab: the tool itself is killed by the kernel when its
    parent goes (PR_SET_PDEATHSIG), so it cannot run on for hours unseen."""
    tool = _script(tmp_path / "hangs", _HANGS)
    pids = tmp_path / "pids"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from quantlab.procs import run_tool; run_tool([{str(tool)!r}], what='t', "
            "timeout_s=300)",
        ],
        env=dict(os.environ, PIDS=str(pids)),
    )
    try:
        shell = _pids(pids)[0]  # the tool quantlab started (its sleep is the shell's child)
        parent.kill()
        parent.wait()
        assert _gone([shell]) == []
    finally:
        parent.kill()
        for pid in _alive(_pids(pids, wait_s=0)):
            os.kill(pid, signal.SIGKILL)


def test_exit_0_without_the_promised_file_is_a_named_failure(tmp_path):
    tool = _script(tmp_path / "lazy", "echo 'all done'\n")
    with pytest.raises(
        ToolError,
        match=r"^the lazy tool exited without an error but did not write "
        rf"{tmp_path}/out.gguf; its output ended: all done$",
    ):
        run_tool([tool], what="the lazy tool", timeout_s=30, outputs=[tmp_path / "out.gguf"])


def test_the_limit_variable_overrides_every_default_and_is_checked(monkeypatch):
    assert timeout_for(50) == 50
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert timeout_for(50) == 7.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(
            QuantlabError, match=rf"{TIMEOUT_ENV}='{bad}' is not a positive number of seconds"
        ):
            timeout_for(50)


def test_default_limits_scale_with_the_model_and_the_tokens():
    from quantlab.engines.llamacpp import TOOL_BASE_S, tool_timeout

    assert tool_timeout(0) == TOOL_BASE_S
    small, large = (
        tool_timeout(500_000_000, eval_tokens=65_536),
        tool_timeout(14_000_000_000, eval_tokens=65_536),
    )
    assert TOOL_BASE_S < small < large
    assert tool_timeout(10**9, decode_tokens=1000) > tool_timeout(
        10**9, eval_tokens=1000
    )  # one token at a time


# --------------------------------------------------------------------------- scratch directories


def test_a_scratch_directory_goes_on_every_exit_path(tmp_path):
    with pytest.raises(RuntimeError), scratch_dir("quantlab-test-", inside=tmp_path) as work:
        (work / "f32.gguf").write_bytes(b"x" * 1000)
        raise RuntimeError("a failed tool")
    assert list(tmp_path.iterdir()) == []


_KILLED_WHILE_WORKING = """
import os, signal, sys
from pathlib import Path
from quantlab.procs import scratch_dir
with scratch_dir("quantlab-test-", inside=Path(sys.argv[1])) as work:
    (work / "f32.gguf").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs: the directory stays behind
"""

_HOLDS = """
import sys, time
from pathlib import Path
from quantlab.procs import scratch_dir
with scratch_dir("quantlab-test-", inside=Path(sys.argv[1])) as work:
    print(work, flush=True)
    time.sleep(120)
"""


def test_a_directory_left_by_a_killed_process_is_removed_by_the_next_one_a_live_one_is_not(
    tmp_path,
):
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_WORKING, str(tmp_path)], timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    (abandoned,) = tmp_path.iterdir()
    live = subprocess.Popen(
        [sys.executable, "-c", _HOLDS, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        held = Path(live.stdout.readline().strip())
        foreign = tmp_path / "quantlab-test-not-ours"  # no lock file: not a scratch directory
        foreign.mkdir()
        with scratch_dir("quantlab-test-", inside=tmp_path) as mine:
            assert not abandoned.exists()
            assert held.is_dir() and foreign.is_dir() and mine.is_dir()
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- llama.cpp in a run

_FAKE_PERPLEXITY = """
    [ "$1" = "--version" ] && echo "version: 0 (fake)" && exit 0
    exit 1
"""


def _fake_llamacpp(where: Path, quantize_body: str) -> Path:
    """A tools directory: llama-quantize runs ``quantize_body`` (its ``--help`` lists nothing),
    llama-perplexity answers ``--version``, the others fail."""
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    _script(bin_dir / "llama-perplexity", _FAKE_PERPLEXITY)
    for name in ("llama-bench", "llama-imatrix"):
        _script(bin_dir / name, "exit 1\n")
    _script(
        bin_dir / "llama-quantize",
        '[ "$1" = "--help" ] && exit 0\n' + textwrap.dedent(quantize_body),
    )
    return bin_dir


def _llamacpp_run(tmp_path: Path, tiny_gguf: Path, quantize_body: str, timeout_s: str | None):
    """``quantlab run`` of a llama.cpp row on the tiny GGUF model, started (not waited for),
    its temporary directory, the tool's pid file and the run directory."""
    bin_dir = _fake_llamacpp(tmp_path / "llamacpp", quantize_body)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_gguf}"}}
baseline: false
methods: [{{label: q4, backend: llamacpp, options: {{type: Q4_0}}}}]
eval: {{seq_len: 64, max_windows: 2, speed: {{enabled: false}}, divergence: {{enabled: false}}}}
output: {{dir: "{tmp_path / "run"}"}}
""")
    env = dict(
        os.environ,
        QUANTLAB_LLAMACPP=str(bin_dir),
        QUANTLAB_CACHE=str(tmp_path / "cache"),
        TMPDIR=str(tmp),
        PIDS=str(tmp_path / "pids"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop(TIMEOUT_ENV, None)
    if timeout_s is not None:
        env[TIMEOUT_ENV] = timeout_s
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "run", str(recipe)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return proc, tmp, tmp_path / "pids", tmp_path / "run"


def _scratch(tmp: Path, run: Path) -> list[Path]:
    """llama.cpp's scratch directories: in the method's directory (a run gives the backend
    one), never in $TMPDIR."""
    return [
        p
        for where in (tmp, *run.glob("*"))
        if where.is_dir()
        for p in where.iterdir()
        if p.name.startswith("quantlab-llamacpp-")
    ]


def _left_behind(tmp: Path, run: Path) -> list[str]:
    return [str(p) for p in _scratch(tmp, run)] + [
        str(p) for p in run.rglob("*") if ".tmp-" in p.name
    ]


def test_a_llama_quantize_that_never_returns_is_one_error_and_leaves_nothing(tmp_path, tiny_gguf):
    """It blocked the run for ever, and any failure left /tmp/quantlab-llamacpp-*/f32.gguf (an
    F32 copy of the model) behind."""
    proc, tmp, pids, run = _llamacpp_run(tmp_path, tiny_gguf, _HANGS, timeout_s="20")
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: llama-quantize to Q4_0 did not finish within 20 s and was stopped; if this "
        f"machine is just slow, raise the limit with {TIMEOUT_ENV}=SECONDS"
    ], err[-3000:]
    assert _gone(_pids(pids, wait_s=0)) == []
    assert _left_behind(tmp, run) == []


def test_a_llama_quantize_that_writes_nothing_is_named(tmp_path, tiny_gguf):
    """It was a FileNotFoundError (a traceback) from reading the file it never wrote."""
    proc, tmp, _, run = _llamacpp_run(
        tmp_path, tiny_gguf, "echo 'main: quantize time = 0 ms'\nexit 0\n", None
    )
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert error.startswith(
        "error: llama-quantize to Q4_0 exited without an error but did not write "
    )
    assert error.endswith("/model.gguf; its output ended: main: quantize time = 0 ms")
    assert _left_behind(tmp, run) == []


def test_ctrl_c_while_llama_quantize_runs_stops_it_and_leaves_nothing(tmp_path, tiny_gguf):
    proc, tmp, pids, run = _llamacpp_run(tmp_path, tiny_gguf, _HANGS, timeout_s=None)
    try:
        tool = _pids(pids, wait_s=300)
        (scratch,) = _scratch(tmp, run)
        assert scratch.parent == run / "q4"  # inside the run, counted against its own disk
        proc.send_signal(
            signal.SIGINT
        )  # what a terminal's Ctrl-C sends quantlab (not the tool's group)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err
    assert _gone(tool) == []
    assert _left_behind(tmp, run) == []


# ---------------------------------------------------------------- GGUF files and templates


def test_stale_gguf_temporaries_are_removed_when_the_step_starts(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """A ``.model.gguf.tmp-PID`` of a killed writer survived resume and --force."""
    import torch

    from quantlab.engines.phase import export_method_gguf
    from quantlab.models import load_model
    from quantlab.quantizers.rtn import RTN

    model = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu")).model
    model = RTN(RTN.Config(bits=4, group_size=32)).quantize(model, None).model
    mdir = tmp_path / "rtn"
    mdir.mkdir()
    stale = [mdir / ".model.gguf.tmp-999999", mdir / ".model-f32.gguf.tmp-1"]
    for path in stale:
        path.write_bytes(b"GGUF half-written")
    keep = mdir / "notes.tmp-1"  # not one of quantlab's temporaries: left alone
    keep.write_text("mine")
    export_method_gguf(
        model, mdir, tiny_gguf, float_type="Q8_0", baseline=False, key="k", log=lambda _: None
    )
    assert not any(p.exists() for p in stale) and keep.is_file()
    assert (mdir / "model.gguf").is_file() and (mdir / "model-f32.gguf").is_file()


_CONVERTER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import write_tiny_gguf  # the GGUF the real converter writes for the tiny model
args = sys.argv[1:]
write_tiny_gguf(Path(args[0]), Path(args[args.index("--outfile") + 1]))
"""


def _converter_tools(where: Path, body: str):
    """llama.cpp's tools at ``where`` with a converter script of ``body`` beside them."""
    from quantlab.engines.llamacpp import LlamaCpp

    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    (where / "convert_hf_to_gguf.py").write_text(body)
    return LlamaCpp(bin_dir, "fake")


def test_a_foreign_file_in_the_template_cache_is_rebuilt_not_exported_from(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A file at the template's cache path was used as it was: the export said "written" and
    the file could not be loaded. The template is now a verified cache entry."""
    import gguf

    from quantlab.formats.gguf import template_for
    from quantlab.models import content_digest

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    tools = _converter_tools(tmp_path / "llamacpp", _CONVERTER.format(tests=str(TESTS)))
    info = {"content_sha256": content_digest(tiny_model_dir)}
    first = template_for(info, tiny_model_dir, tools)
    tensors = len(gguf.GGUFReader(str(first)).tensors)
    assert template_for(info, tiny_model_dir, tools) == first  # verified and reused
    root = tmp_path / "cache" / "gguf-templates"
    (root / f"{info['content_sha256'][:16]}.gguf").write_bytes(b"GGUF")  # where it was looked for
    for path in root.rglob("*.gguf"):
        path.write_bytes(b"GGUF")  # a foreign or truncated file under every name
    capsys.readouterr()
    again = template_for(info, tiny_model_dir, tools)
    assert len(gguf.GGUFReader(str(again)).tensors) == tensors
    assert "GGUF template at" in capsys.readouterr().err  # said: discarded and recomputed


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import time\ntime.sleep(120)\n", r"did not finish within 3 s and was stopped"),
        (
            "print('nothing to do')\n",
            r"exited without an error but did not write .*; its output ended: nothing to do",
        ),
    ],
)
def test_a_converter_that_hangs_or_writes_nothing_is_one_error(
    body, message, tiny_model_dir, tmp_path, monkeypatch
):
    from quantlab.formats.gguf import template_for

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(TIMEOUT_ENV, "3")
    tools = _converter_tools(tmp_path / "llamacpp", body)
    with pytest.raises(
        ToolError, match=r"^llama.cpp's converter of .* \(for GGUF metadata\) " + message
    ):
        template_for({"content_sha256": "ab" * 32}, tiny_model_dir, tools)
    assert [
        p.name
        for p in (tmp_path / "cache" / "gguf-templates").iterdir()
        if not p.name.endswith(".lock")
    ] == []
