"""llama.cpp as a measuring engine: its own perplexity / KL divergence (``llama-perplexity``)
and speed (``llama-bench``) of GGUF files, run as the real command-line tools; ``llama-server``
serves them under load (quantlab.engines.serving).

The tools are built by ``scripts/llamacpp.sh`` from the llama.cpp sources vendored in the
llama-cpp-python sdist (a pinned version) into quantlab's cache; ``QUANTLAB_LLAMACPP`` (or a
``path`` argument) points at another directory holding them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.procs import ToolError, run_tool

#: the llama-cpp-python sdist whose vendored llama.cpp scripts/llamacpp.sh builds
LLAMACPP_PACKAGE_VERSION = "0.3.36"
#: what every llama.cpp feature needs; llama-server only the serving benchmark asks for
#: (:meth:`LlamaCpp.server`), so a build without it still runs everything else
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-imatrix")
SERVER = "llama-server"
#: the build's directory name (scripts/llamacpp.sh's prefix): "-flush" for llama-perplexity's
#: log flush, "-server" since llama-server is built; the build before it is still found
BUILD_NAME = f"llama-cpp-python-{LLAMACPP_PACKAGE_VERSION}-flush-server"
OLD_BUILD_NAME = f"llama-cpp-python-{LLAMACPP_PACKAGE_VERSION}-flush"
_HOW = (
    "build them once with `bash scripts/llamacpp.sh` (from the llama.cpp sources in PyPI's "
    f"llama-cpp-python {LLAMACPP_PACKAGE_VERSION} sdist; 10-15 minutes on 2 cores), or set "
    "QUANTLAB_LLAMACPP to a directory holding " + ", ".join(TOOLS)
)


def default_bin_dir() -> Path:
    from quantlab.models import cache_dir

    new = cache_dir() / "llamacpp" / BUILD_NAME / "bin"
    old = cache_dir() / "llamacpp" / OLD_BUILD_NAME / "bin"
    return old if not new.is_dir() and old.is_dir() else new


@dataclass(frozen=True)
class LlamaCpp:
    """The llama.cpp tools quantlab runs, and the build they come from."""

    bin_dir: Path
    version: str

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    def server(self) -> Path:
        """llama-server, or one error saying how to get it (builds before quantlab served
        GGUF files lack it)."""
        path = self.tool(SERVER)
        if not os.access(path, os.X_OK):
            raise QuantlabError(
                f"llama-server is not in '{self.bin_dir}' (a build from before quantlab served "
                "GGUF files); run `bash scripts/llamacpp.sh` again to build it (~14 minutes on 2 "
                "cores), or set QUANTLAB_LLAMACPP to a build that has it"
            )
        return path

    @property
    def converter(self) -> Path | None:
        """llama.cpp's convert_hf_to_gguf.py, where the build script kept it."""
        path = self.bin_dir.parent / "convert_hf_to_gguf.py"
        return path if path.is_file() else None


def find_llamacpp(path: str | Path | None = None) -> LlamaCpp:
    """The llama.cpp tools at ``path``, $QUANTLAB_LLAMACPP or quantlab's cache, checked to run;
    without them, one error saying how to get them."""
    where = Path(path or os.environ.get("QUANTLAB_LLAMACPP") or default_bin_dir()).expanduser()
    missing = [t for t in TOOLS if not os.access(where / t, os.X_OK)]
    if missing:
        raise QuantlabError(
            f"llama.cpp's tools are not found in '{where}' (missing {', '.join(missing)}); {_HOW}"
        )
    probe = where / "llama-perplexity"
    try:
        proc = run_tool(
            [probe, "--version"],
            what=f"'{probe} --version'",
            timeout_s=PROBE_TIMEOUT_S,
            check=False,
        )
    except ToolError as e:
        raise QuantlabError(f"{e}; {_HOW}") from None
    found = re.search(r"^version:\s*(.+)$", proc.stdout + proc.stderr, re.M)
    if proc.returncode != 0 or not found:
        raise QuantlabError(f"'{probe} --version' failed (exit {proc.returncode}); {_HOW}")
    sdist = f"llama-cpp-python {LLAMACPP_PACKAGE_VERSION} sdist"
    return LlamaCpp(where, f"llama.cpp {found.group(1).strip()} ({sdist})")


#: time limits of llama.cpp's tools (``$QUANTLAB_TOOL_TIMEOUT_S`` replaces every one): a fixed
#: allowance (start-up, loading), plus time per GB of model for each 1000 tokens it evaluates
#: (perplexity, imatrix, prefill) or generates, plus time per GB for the tools that only
#: rewrite a model. Measured with the demo model's 0.54 GB F32 file on this 2-core VM: ~35 s per
#: GB per 1000 tokens evaluated (other jobs running), ~42 s generated, ~2 s per GB rewritten;
#: the limits are about ten times that (docs/llamacpp.md, "Time limits"): a hung tool is
#: stopped, a slow machine is not.
TOOL_BASE_S = 300.0
EVAL_S_PER_GB_KTOKEN = 300.0
DECODE_S_PER_GB_KTOKEN = 600.0
REWRITE_S_PER_GB = 120.0
#: ``--version`` / ``--help``
PROBE_TIMEOUT_S = 60.0


def tool_timeout(
    model_bytes: int, *, eval_tokens: int = 0, decode_tokens: int = 0, rewrite: bool = False
) -> float:
    """The default time limit of one tool run on a model file of ``model_bytes``."""
    gb = model_bytes / 1e9
    per_gb = (
        EVAL_S_PER_GB_KTOKEN * eval_tokens / 1000
        + DECODE_S_PER_GB_KTOKEN * decode_tokens / 1000
        + (REWRITE_S_PER_GB if rewrite else 0.0)
    )
    return TOOL_BASE_S + gb * per_gb


def _run(cmd: list, what: str, timeout: float) -> str:
    proc = run_tool(cmd, what=what, timeout_s=timeout)
    return proc.stdout + proc.stderr


_FLOAT = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def _grab(pattern: str, text: str, what: str, model: Path) -> tuple[float, ...]:
    found = re.search(pattern, text)
    if not found:
        raise QuantlabError(
            f"llama-perplexity printed no {what} for '{model}'; its output ended: "
            f"{text.strip()[-300:]}"
        )
    return tuple(float(g) for g in found.groups())


#: llama.cpp's logger thread is never joined at exit (common/log.cpp), so a run can lose its last
#: lines; scripts/llamacpp.sh adds a flush to llama-perplexity, and a run whose figures are still
#: missing (tools built elsewhere) is repeated, up to this many times in all
ATTEMPTS = 3


def perplexity(
    tools: LlamaCpp,
    model: Path,
    text_file: Path,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int,
    kld_base: Path | None = None,
    kld: bool = False,
    timeout: float | None = None,
) -> dict:
    """llama-perplexity of ``model`` on ``text_file``: its PPL ± stderr (BOS-led chunks of
    ``ctx`` tokens, second half scored). ``kld_base`` without ``kld``: also save the model's
    logits there (the base of later comparisons); with ``kld``: compare with that file and
    return llama.cpp's KL divergence and same-top-token figures too. ``timeout``: seconds
    (default: :func:`tool_timeout` of the model and the tokens scored; without ``chunks``, the
    text's bytes bound its tokens)."""
    if timeout is None:
        tokens = ctx * chunks if chunks else Path(text_file).stat().st_size
        timeout = tool_timeout(Path(model).stat().st_size, eval_tokens=tokens)
    cmd = [
        str(tools.tool("llama-perplexity")),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        "-t",
        str(threads),
        "--no-warmup",
    ]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if kld_base is not None:
        cmd += ["--kl-divergence-base", str(kld_base)] + (["--kl-divergence"] if kld else [])
    last = "Same top p:" if kld else "Final estimate: PPL"
    for _ in range(ATTEMPTS):
        out = _run(cmd, f"llama-perplexity on '{model.name}'", timeout)
        if last in out:
            break
    return _kld_figures(out, model) if kld else _ppl_figures(out, model)


def _ppl_figures(out: str, model: Path) -> dict:
    ppl, ppl_err = _grab(
        r"Final estimate: PPL = " + _FLOAT + r" \+/- " + _FLOAT, out, "final PPL estimate", model
    )
    return {"ppl": ppl, "ppl_stderr": ppl_err}


def _kld_figures(out: str, model: Path) -> dict:
    ppl, ppl_err = _grab(
        r"Mean PPL\(Q\)\s*:\s*" + _FLOAT + r"\s*±\s*" + _FLOAT, out, "Mean PPL(Q)", model
    )
    kld_mean, kld_err = _grab(
        r"Mean\s+KLD:\s*" + _FLOAT + r"\s*±\s*" + _FLOAT, out, "mean KLD", model
    )
    (p99,) = _grab(r"99\.0%\s+KLD:\s*" + _FLOAT, out, "KLD p99", model)
    top, top_err = _grab(
        r"Same top p:\s*" + _FLOAT + r"\s*±\s*" + _FLOAT, out, "same-top-token rate", model
    )
    return {
        "ppl": ppl,
        "ppl_stderr": ppl_err,
        "kld_mean": kld_mean,
        "kld_stderr": kld_err,
        "kld_p99": p99,
        "top1_agreement": top / 100,
        "top1_agreement_stderr": top_err / 100,
    }


def bench(
    tools: LlamaCpp,
    models: list[Path],
    *,
    threads: int,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    timeout: float | None = None,
) -> list[dict]:
    """``llama-bench`` of each model (in the order given, each test ``repetitions`` times):
    one record per model and test, with tokens/s mean, stddev and every sample. ``timeout``:
    seconds (default: :func:`tool_timeout` of all the files and tokens; warm-up runs count)."""
    if timeout is None:
        size = sum(Path(m).stat().st_size for m in models)
        runs = repetitions + 1  # llama-bench warms up once per test
        timeout = tool_timeout(size, eval_tokens=n_prompt * runs, decode_tokens=n_gen * runs)
    cmd = [
        str(tools.tool("llama-bench")),
        "-o",
        "json",
        "-t",
        str(threads),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-r",
        str(repetitions),
    ]
    for m in models:
        cmd += ["-m", str(m)]
    out = _run(cmd, "llama-bench", timeout)
    start = out.find("[")
    try:
        records = json.loads(out[start : out.rfind("]") + 1])
    except (ValueError, json.JSONDecodeError):
        raise QuantlabError(
            f"llama-bench printed no JSON; its output ended: {out.strip()[-300:]}"
        ) from None
    return [
        {
            "model": r.get("model_filename"),
            "test": "prefill" if r.get("n_gen", 0) == 0 else "decode",
            "n_prompt": r.get("n_prompt"),
            "n_gen": r.get("n_gen"),
            "threads": r.get("n_threads"),
            "tokens_per_s": r.get("avg_ts"),
            "tokens_per_s_stddev": r.get("stddev_ts"),
            "samples_tokens_per_s": r.get("samples_ts"),
            "build": f"{r.get('build_number')} ({r.get('build_commit')})",
            "cpu": r.get("cpu_info"),
            "type": r.get("model_type"),
        }
        for r in records
    ]
