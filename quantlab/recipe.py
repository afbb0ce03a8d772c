"""The recipe: a typed, validated description of one quantization run.

Every default lives here. Unknown keys are errors at every level (with a "did you mean"),
and backend options are validated by the backend's own ``Config`` when the recipe loads,
so a typo never reaches the expensive part of a run.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from quantlab.bench import speed
from quantlab.errors import RecipeError, did_you_mean
from quantlab.evalspec import ScoringSpec
from quantlab.layout import CONTAINER_ENTRIES, RUN_ENTRIES

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: labels name directories: well under any filesystem's 255-byte name limit
MAX_LABEL = 100
#: recipes are small documents; anything larger is refused before it is read
MAX_RECIPE_BYTES = 1 << 20
#: values a recipe may hold once YAML aliases are expanded (a real recipe has a few hundred)
MAX_RECIPE_NODES = 100_000
#: how deeply a recipe's sections and values may nest (a real recipe: about 6 levels)
MAX_RECIPE_DEPTH = 64
#: the longest input value echoed back in an error message
MAX_ECHO = 120
#: run-directory entries a method directory (named by its label) must not collide with, from
#: the layout's one home (quantlab.rundir); compared case-insensitively, for case-insensitive
#: filesystems
RESERVED_LABELS = frozenset(n.lower() for n in RUN_ENTRIES)
#: entries of a several-models run a model's directory must not collide with
RESERVED_MODEL_LABELS = frozenset(n.lower() for n in CONTAINER_ENTRIES)


class _Strict(BaseModel):
    """Unknown keys are errors, and types are strict: ``true`` is not the integer 1, "3" is
    not 3 (a recipe value of the wrong type is a mistake, not something to convert)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Strict):
    """Which model to quantize and how to hold it in memory."""

    source: str = Field(
        "smollm2-135m",
        description="Demo alias 'smollm2-135m', a Hugging Face Hub id, a local HF directory "
        "or a local .gguf file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute and export dtype of the unquantized tensors. 'auto': float32 on "
        "CPU, bfloat16 on CUDA when supported (else float16).",
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow code from the model repository to run."
    )
    streaming: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Quantize and export one decoder layer at a time, weights read lazily from the "
        "safetensors shards (docs/streaming.md): 'auto' streams the methods that can (rtn, gptq, "
        "awq, from a local model directory; the checkpoint is byte for byte the one quantizing the "
        "whole model writes), 'on' makes a method that cannot an error (the float baseline aside), "
        "'off' always quantizes the whole model in memory.",
    )
    label: str | None = Field(
        None,
        description="With several models (recipe key models): the model's "
        "sub-directory of the run; default: the source's last path component.",
    )

    @field_validator("streaming", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off as true/false: take them as the words they were
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and (not _LABEL_RE.match(v) or len(v) > MAX_LABEL):
            raise ValueError(
                f"model label {v!r} names a directory: letters, digits, '.', '_', '+' and '-', at "
                f"most {MAX_LABEL} characters"
            )
        return v

    def dir_label(self) -> str:
        """The model's sub-directory in a several-models run."""
        if self.label:
            return self.label
        stem = Path(self.source.rstrip("/")).name.removesuffix(".gguf") or "model"
        return re.sub(r"[^A-Za-z0-9._+-]", "_", stem)[:MAX_LABEL].lstrip("._-") or "model"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v


class TextSpec(_Strict):
    """A text source: 'pydoc' (embedded), 'wikitext2' (Hub, online), a .txt/.jsonl file, or a
    directory holding WikiText-style train.txt/valid.txt/test.txt."""

    source: str = Field("pydoc", description="Text source (see docs/recipes.md, 'Text sources').")
    split: str | None = Field(
        None,
        description="Which part of the source. pydoc: 'calibration' or 'evaluation'; a "
        "WikiText directory or wikitext2: 'train', 'valid'/'validation' or 'test'. Default: the "
        "calibration part for calibration, the held-out part for evaluation.",
    )
    text_field: str = Field("text", description="Field holding the text in a .jsonl file.")

    @model_validator(mode="after")
    def _text_field_for_jsonl(self) -> TextSpec:
        if self.text_field != "text" and not self.source.endswith(".jsonl"):
            raise ValueError(
                f"text_field applies to .jsonl sources, not {self.source!r}; remove it"
            )
        return self


class CalibrationSpec(TextSpec):
    """Calibration samples: random windows of `seq_len` tokens drawn with `seed`."""

    samples: int = Field(128, ge=1, le=100_000, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=8, le=1_000_000, description="Tokens per calibration window.")
    seed: int = Field(0, description="Seed of the window sampler.")


class SpeedSpec(_Strict):
    """Generation speed of each reloaded checkpoint: prefill, time to first token, greedy
    decode with a KV cache (end-of-sequence ignored), at batch 1 and at ``batch_size``."""

    enabled: bool = True
    prompt_tokens: int = Field(
        speed.PROMPT_TOKENS, ge=1, description="Prompt length (tokens of the evaluation text)."
    )
    new_tokens: int = Field(speed.NEW_TOKENS, ge=2, description="Tokens decoded per repeat.")
    batch_size: int = Field(
        speed.BATCH_SIZE,
        ge=1,
        description="A second batch size measured besides batch 1 "
        "(the prompt repeated); 1 measures batch 1 only.",
    )
    warmup: int = Field(speed.WARMUP, ge=0, description="Untimed repeats first.")
    repeats: int = Field(
        speed.REPEATS,
        ge=1,
        description="Timed repeats per measurement; medians, min and max are reported.",
    )
    rounds: int = Field(
        speed.ROUNDS,
        ge=1,
        le=50,
        description="Rounds of the speed phase: each measures every "
        'checkpoint once, alternating with the baseline (docs/results.md, "Speed and the bandwidth '
        'bound").',
    )
    mode: Literal["eager", "compiled"] = Field(
        "eager",
        description="'eager': a dynamic KV cache, every op dispatched from Python (what a plain "
        "transformers generate() does); 'compiled': a static KV cache and the decode step compiled "
        "with torch.compile (CUDA graphs on GPU), as gpt-fast and vLLM run; compilation is timed "
        "apart (compile_s, ~30 s per batch size per measurement on 2 CPU cores) and excluded from "
        "tokens/s.",
    )


class DivergenceSpec(_Strict):
    """KL divergence, top-1 agreement and Δp of each method against the unquantized model,
    on the first windows of the evaluation text. The base model's distributions are computed
    once per run and stored in the run directory (2 bytes per vocabulary entry per token)."""

    enabled: bool = True
    max_windows: int | None = Field(
        8,
        ge=1,
        description="Windows compared (None: all windows "
        "of the evaluation; storage grows with vocabulary x tokens).",
    )


class LlamaCppBenchSpec(_Strict):
    """``llama-bench`` of every GGUF row, in rounds: each round measures the float baseline's
    GGUF and every row once, in that order, so each ratio comes from neighbouring
    measurements (machine load cannot fake it)."""

    n_prompt: int = Field(
        512, ge=1, description="Prompt tokens of the prefill test (llama-bench -p)."
    )
    n_gen: int = Field(
        128, ge=1, description="Generated tokens of the decode test (llama-bench -n)."
    )
    rounds: int = Field(3, ge=1, le=50, description="Rounds (one repetition of every file each).")


class LlamaCppSpec(_Strict):
    """llama.cpp as a measuring engine (``eval.engines: [torch, llamacpp]``): for every method
    that exports GGUF (and the float baseline as an F32 GGUF), llama-perplexity's PPL, KL
    divergence from the baseline and same-top-token rate, the F32 export's PPL (the engine
    cross-check), and llama-bench's prefill/decode tokens/s."""

    ctx: int = Field(
        512, ge=8, description="llama-perplexity context (-c): BOS-led chunks, second half scored."
    )
    chunks: int | None = Field(
        None, ge=1, description="Chunks scored (--chunks; None: all of the text)."
    )
    float_type: Literal["F32", "F16", "Q8_0"] = Field(
        "Q8_0",
        description="GGUF type of the 2-D tensors a method leaves in float (embeddings, a tied "
        "output head), the same for every quantized row (llama.cpp's presets keep them in 8 bits "
        "or more).",
    )
    threads: int | None = Field(
        None, ge=1, description="Threads (-t; None: the recipe's threads, else the cores)."
    )
    bench: LlamaCppBenchSpec = LlamaCppBenchSpec()


class VllmSpec(_Strict):
    """vLLM as a measuring engine (``eval.engines: [torch, vllm]``; ``bash scripts/vllm.sh``
    builds its environment): vLLM's perplexity of every checkpoint it loads, on the run's own
    windows, beside quantlab's (docs/vllm.md)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Activation dtype vLLM scores in. auto: the run's dtype; bfloat16 for "
        "quantized rows of a float32 run (vLLM's GPTQ/AWQ paths take no float32).",
    )
    threads: int | None = Field(
        None, ge=1, description="Threads of the vLLM worker (None: the cores)."
    )


class ServingSpec(_Strict):
    """Serving benchmarks in a run (off unless ``eval.serving`` is set; docs/vllm.md): after
    the rows are scored, every row is served by each engine's OpenAI-compatible server
    (vLLM's for checkpoint directories, llama-server for the rows' GGUF files) and loaded by
    vLLM's load generator at each concurrency, in rounds interleaved with the float model."""

    engines: list[Literal["vllm", "llamacpp"]] | None = Field(
        None,
        min_length=1,
        description="Engines that serve: 'vllm' (checkpoint directories) and 'llamacpp' "
        "(llama-server, rows that export GGUF). None: those of eval.engines, else vllm.",
    )
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 8],
        min_length=1,
        description="Concurrent streaming clients; one load per number, each at least 1.",
    )
    requests: int = Field(
        16, ge=1, description="Requests per load (at least the concurrency; warm-up extra)."
    )
    input_tokens: int = Field(256, ge=1, description="Prompt tokens of each random request.")
    output_tokens: int = Field(
        128, ge=1, description="Tokens each request generates (ignore_eos: exactly these)."
    )
    rounds: int = Field(
        2, ge=1, le=20, description="Rounds: every server loaded once per concurrency in each."
    )
    float_dtypes: list[Literal["float32", "bfloat16", "float16"]] = Field(
        default_factory=lambda: ["float32", "bfloat16"],
        min_length=1,
        description="vLLM: dtypes the float model is served in; the fastest is the reference.",
    )
    dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16",
        description="vLLM: activation dtype of quantized rows (its GPTQ/AWQ paths take no "
        "float32).",
    )
    eager: bool = Field(
        False, description="vLLM: no torch.compile (faster start, not what a deployment runs)."
    )
    threads: int | None = Field(None, ge=1, description="Threads of each server (None: the cores).")

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if c < 1]
        if bad or len(set(v)) != len(v):
            raise ValueError(
                f"concurrency {v}: give each number of concurrent clients once, each at "
                "least 1 (e.g. [1, 8, 32])"
            )
        return v

    @field_validator("engines", "float_dtypes")
    @classmethod
    def _once(cls, v: list[str] | None, info) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} {v}: name each once")
        return v


class EvalSpec(ScoringSpec, TextSpec):
    """How each reloaded checkpoint is scored: the text, the scoring options shared with
    ``quantlab eval`` (:class:`quantlab.evalspec.ScoringSpec`: convention, windows, batch size,
    kernel, and the rules of which applies to which), divergence, speed, engines, tasks."""

    divergence: DivergenceSpec = DivergenceSpec()
    speed: SpeedSpec = SpeedSpec()
    engines: list[Literal["torch", "llamacpp", "vllm"]] = Field(
        default_factory=lambda: ["torch"],
        description="Engines that measure: 'torch' (every row, from the checkpoint reloaded by "
        "quantlab), 'llamacpp' (rows that export GGUF, see eval.llamacpp) and 'vllm' (every "
        "checkpoint directory vLLM loads, see eval.vllm and docs/vllm.md).",
    )
    llamacpp: LlamaCppSpec = LlamaCppSpec()
    vllm: VllmSpec = VllmSpec()
    serving: ServingSpec | None = Field(
        None,
        description="Serving benchmarks (vLLM / llama-server under load); None: off. See "
        "ServingSpec and docs/vllm.md.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks run on each "
        "checkpoint (needs the [eval] extra; offline: local task YAMLs).",
    )
    task_paths: list[str] = Field(
        default_factory=list,
        description="Directories of lm-eval task YAML files (e.g. tasks defined on local data).",
    )
    task_limit: int | None = Field(None, ge=1, description="Examples per task (None: all).")
    task_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples (None: the task's default)."
    )

    def serving_engines(self) -> list[str]:
        """The engines that serve (none when eval.serving is off)."""
        if self.serving is None:
            return []
        if self.serving.engines is not None:
            return list(self.serving.engines)
        return [e for e in self.engines if e in ("vllm", "llamacpp")] or ["vllm"]

    @model_validator(mode="after")
    def _task_keys(self) -> EvalSpec:
        unused = [k for k in ("task_limit", "task_fewshot") if getattr(self, k) is not None]
        if not self.tasks and (unused or self.task_paths):
            key = (unused or ["task_paths"])[0]
            raise ValueError(
                f"{key} applies to eval.tasks, which is empty; add tasks or remove {key}"
            )
        return self


class SensitivitySpec(_Strict):
    """The sensitivity pass (docs/methods.md, "Sensitivity and skip: auto"): each candidate (a
    linear layer, or a layer type) quantized alone with the method's backend, its KL
    divergence from the float model measured on calibration windows. With ``options.skip: auto`` the
    fewest candidates that keep the KL within ``kl_budget`` stay in float; with an explicit
    skip list the pass only measures (for the report)."""

    kl_budget: float = Field(
        0.02,
        gt=0,
        description="skip: auto: the largest mean KL(float || "
        "quantized) per token, in nats, on the sensitivity windows.",
    )
    granularity: Literal["layer", "type"] = Field(
        "layer",
        description="Candidates: every linear layer, or every layer type "
        "(e.g. all mlp.down_proj together; far fewer probes for calibration-heavy backends).",
    )
    windows: int = Field(4, ge=1, le=64, description="Calibration windows the KL is measured on.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per sensitivity window.")
    seed: int = Field(
        1,
        description="Seed of the window sampler (a different draw from the "
        "calibration windows by default).",
    )


class ResourcesSpec(_Strict):
    """What one method's task asks a Ray cluster for (executor: ray; the local executor runs
    methods one after another in its own process and ignores it)."""

    cpus: float = Field(
        1,
        gt=0,
        le=1024,
        description="CPU cores; the task's torch threads (unless the recipe sets threads).",
    )
    gpus: float | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs (fractions share one); default: 1 when the "
        "recipe's device is CUDA, else 0.",
    )


class ExecutorSpec(_Strict):
    """Where the methods run (docs/runs.md, "Runs as jobs")."""

    kind: Literal["local", "ray"] = Field(
        "local",
        description="'local': one after another in this process; "
        "'ray': each method a Ray task (the [ray] extra).",
    )
    address: str | None = Field(
        None,
        description="Ray: the cluster to join ('auto', 'ray://host:10001', "
        "'host:6379'); default: a local cluster of this machine's cores.",
    )
    max_retries: int = Field(
        2, ge=0, le=100, description="Ray: times a task whose worker died is run again."
    )


class MethodSpec(_Strict):
    """One quantization method: a backend and its options."""

    label: str = Field(
        description="Unique name of the method in this run (a directory name). Default: the "
        "backend and its bits/group_size/type (gptq-w4-g128); an --set override of an option "
        'renames the row (docs/runs.md, "Sweeps").'
    )
    backend: str = Field(description="Backend name; see `quantlab backends`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend options.")
    sensitivity: SensitivitySpec | None = Field(
        None, description="Run the sensitivity pass (implied by options.skip: auto)."
    )
    resources: ResourcesSpec = ResourcesSpec()
    export: list[Literal["native", "gguf"]] = Field(
        default_factory=lambda: ["native"],
        description="Formats written: 'native' (the method's ecosystem checkpoint, always) and "
        "'gguf' (llama.cpp blocks holding the same codes and scales; see docs/llamacpp.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _gguf_rows_export_gguf(cls, data: Any) -> Any:
        """Rows whose checkpoint is a GGUF file (llama.cpp's quantizers, run by llama.cpp or by
        quantlab) export GGUF unless told otherwise."""
        from quantlab.registry import BACKENDS, get_backend

        name = data.get("backend") if isinstance(data, dict) else None
        if isinstance(name, str) and name in BACKENDS and "export" not in data:
            if get_backend(name).gguf_checkpoint:
                data = dict(data, export=["native", "gguf"])
        return data

    @field_validator("export")
    @classmethod
    def _export(cls, v: list[str]) -> list[str]:
        if "native" not in v:
            raise ValueError(
                "export must include 'native' (the checkpoint every row is scored from)"
            )
        return list(dict.fromkeys(v))

    def auto_skip(self) -> bool:
        return self.options.get("skip") == "auto"

    def sensitivity_spec(self) -> SensitivitySpec | None:
        """The pass to run before quantizing, if any."""
        if self.sensitivity is not None:
            return self.sensitivity
        return SensitivitySpec() if self.auto_skip() else None

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if len(v) > MAX_LABEL:
            raise ValueError(
                f"label '{v[:40]}…' is {len(v)} characters long; labels name directories: "
                f"at most {MAX_LABEL}"
            )
        if not _LABEL_RE.match(v):
            raise ValueError(
                f"label {v!r} must start with a letter or digit and use only letters, digits, "
                "'.', '_', '+' and '-'"
            )
        if v.lower() in RESERVED_LABELS:
            raise ValueError(
                f"label {v!r} is the name of a file or directory quantlab writes into the run "
                f"directory; choose another (reserved: {', '.join(sorted(RESERVED_LABELS))})"
            )
        return v

    def config(self):
        """The backend's validated, frozen option object."""
        from quantlab.registry import get_backend

        return get_backend(self.backend).Config(**self.options)


#: the most methods one sweep may expand into (a typo like group_size: [32, 64, ...] x 10 keys)
MAX_SWEEP = 256
#: the most methods a recipe runs, sweeps expanded, times its models (each model runs them all)
MAX_METHODS = 512
#: how a swept option shows in a label: bits 4 -> w4, group_size 32 -> g32 (-1 -> gch)
_LABEL_PARTS = {"bits": "w{}", "group_size": "g{}"}


def _label_part(key: str, value: Any) -> str:
    """A swept or overridden option as a label part, cut past a label's length (the label's
    check then refuses it), so a long value never makes 256 long labels."""
    if key == "group_size" and value == -1:
        return "gch"
    if key in _LABEL_PARTS:
        return _LABEL_PARTS[key].format(value)[: MAX_LABEL + 1]
    text = (str(value).lower() if isinstance(value, bool) else str(value))[: MAX_LABEL + 1]
    return (
        re.sub(r"[^A-Za-z0-9.+]", "", key.replace("_", ""))
        + "-"
        + re.sub(r"[^A-Za-z0-9._+-]", "_", text)
    )


def default_label(method: dict) -> str:
    """The label of a method written without one: its backend and the options that name a
    quantization (``gptq-w4-g128``, ``llamacpp-q4_k_m``)."""
    options = method.get("options") if isinstance(method.get("options"), dict) else {}
    parts = [str(method.get("backend", "method"))]
    if options.get("bits") == "auto":  # an allocation is named after its budget
        parts.append(f"auto{options.get('bits_budget', '')}")
    parts += [
        _label_part(k, options[k])
        for k in ("bits", "group_size")
        if k in options and options[k] != "auto"
    ]
    if "type" in options:
        parts.append(str(options["type"]).lower())
    return "-".join(re.sub(r"[^A-Za-z0-9._+-]", "_", p) for p in parts)


def relabel(label: str, key: str, old: Any, new: Any) -> str:
    """``label`` after an override changed a method's ``key`` from ``old`` to ``new``: the part
    that named the old value is replaced (``rtn-w4-g64`` with group_size 128 -> ``rtn-w4-g128``),
    an option the label does not name is appended as a sweep would name it."""
    if old == new:
        return label
    if key == "backend":
        old_s = str(old)
        rest = (
            label[len(old_s) :]
            if old is not None and (label == old_s or label.startswith(old_s + "-"))
            else f"-{label}"
        )
        return f"{new}{rest}"
    tokens = label.split("-")
    if old is not None and key in _LABEL_PARTS and _label_part(key, old) in tokens:
        tokens[tokens.index(_label_part(key, old))] = _label_part(key, new)
        return "-".join(tokens)
    if old is not None and _label_part(key, old) in label:
        return label.replace(_label_part(key, old), _label_part(key, new))
    return f"{label}-{_label_part(key, new)}"


def sweep_size(method: Any, where: str) -> int:
    """How many methods ``method`` expands into (1 without a sweep), from the lengths of its
    lists alone: checked against MAX_SWEEP before any combination is built (a 300-byte
    sweep of 12 keys x 10 values is 10**12 combinations)."""
    if not isinstance(method, dict) or method.get("sweep") is None:
        return 1
    sweep, options = method["sweep"], method.get("options") or {}
    if (
        not isinstance(sweep, dict)
        or not sweep
        or not all(isinstance(v, list) and v for v in sweep.values())
    ):
        raise RecipeError(
            f"{where}.sweep must map option names to non-empty lists of values, e.g. "
            "sweep: {bits: [3, 4], group_size: [32, 64]}"
        )
    both = sorted(set(sweep) & set(options)) if isinstance(options, dict) else []
    if both:
        raise RecipeError(
            f"{where}: {', '.join(both)} is both in options and in sweep; keep it in one"
        )
    size = math.prod(len(v) for v in sweep.values())
    if size > MAX_SWEEP:
        lengths = [len(v) for v in sweep.values()]
        lists = (
            f"its lists hold {' x '.join(map(str, lengths))} values"
            if len(lengths) <= 8
            else f"its {len(lengths)} lists hold up to {max(lengths)} values each"
        )
        raise RecipeError(f"{where}.sweep expands to {size} methods; at most {MAX_SWEEP} ({lists})")
    return size


def expand_sweep(method: Any, where: str) -> list[Any]:
    """A method with ``sweep: {key: [values]}`` as one method per combination (keys in the
    order written), labelled ``LABEL-PART-PART`` (see :func:`_label_part`); others as they are."""
    return [m for m, _ in _expand_one(method, where)]


def _expand_one(method: Any, where: str) -> list[tuple[Any, dict[str, int]]]:
    """(method, {swept key: index of its value}) per combination of ``method``'s sweep."""
    sweep_size(method, where)
    if not isinstance(method, dict) or "sweep" not in method:
        return [(method, {})]
    rest = {k: v for k, v in method.items() if k != "sweep"}
    if method["sweep"] is None:  # written out as the default
        return [(rest, {})]
    sweep, options = method["sweep"], method.get("options") or {}
    out = []
    for picks in itertools.product(*(range(len(v)) for v in sweep.values())):
        chosen = {k: sweep[k][i] for k, i in zip(sweep, picks)}
        parts = [_label_part(k, v) for k, v in chosen.items()]
        label = "-".join([str(method.get("label", "method")), *parts])
        method_k = dict(rest, label=label, options=dict(options, **chosen))
        out.append((method_k, dict(zip(sweep, picks))))
    return out


def _check_size(data: dict) -> None:
    """Methods after sweeps times models within MAX_METHODS, counted before anything expands."""
    methods = data.get("methods") if isinstance(data.get("methods"), list) else []
    models = data.get("models") if isinstance(data.get("models"), list) else []
    n_methods = sum(sweep_size(m, f"methods[{i}]") for i, m in enumerate(methods))
    if max(n_methods, 1) * max(len(models), 1) > MAX_METHODS:
        what = f"{n_methods} methods" + (" (after sweeps)" if n_methods > len(methods) else "")
        if models:
            what += f" x {len(models)} models"
        raise RecipeError(
            f"the recipe asks for {what}; a recipe runs at most {MAX_METHODS} "
            "(methods x models): split it into several recipes"
        )


class OutputSpec(_Strict):
    dir: str = Field("runs/{name}", description="Run directory; '{name}' is the recipe name.")
    report: bool = Field(
        True,
        description="Write report.html (plots, table, details) and results.md into "
        "the run directory when the run ends; `quantlab report RUN_DIR` regenerates them.",
    )


class Recipe(_Strict):
    """A whole run. Load with :func:`load_recipe`."""

    name: str = Field(description="Run name (default: the recipe file's stem).")
    description: str = ""
    quick: bool = Field(
        False,
        description="Made with `quantlab run --quick` (a preset of small "
        "settings): the report and summary mark the figures indicative.",
    )
    model: ModelSpec = ModelSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    baseline: bool = Field(
        True,
        description="Add the unquantized model as a 'baseline' method when no method uses "
        "backend 'none', so every table has a reference row.",
    )
    methods: list[MethodSpec] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    output: OutputSpec = OutputSpec()
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch threads (default: all cores)."
    )
    executor: ExecutorSpec = ExecutorSpec()
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Several models, each run with every "
        "method and compared with its own baseline (instead of model); docs/runs.md, "
        '"Several models".',
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _LABEL_RE.match(v):
            raise ValueError(f"name {v!r} must use only letters, digits, '.', '_', '+' and '-'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _expand_sweeps(cls, data: Any, info: ValidationInfo) -> Any:
        """Methods with a ``sweep`` become one method per combination (docs/runs.md, "Sweeps"),
        counted before any is built. Where each came from goes into the validation context
        (``origins``), so that errors name what the user wrote, not the expanded list."""
        if not isinstance(data, dict):
            return data
        _check_size(data)
        if isinstance(data.get("methods"), list):
            named = [
                dict(m, label=default_label(m))
                if isinstance(m, dict) and m.get("label") is None
                else m
                for m in data["methods"]
            ]
            expanded = [
                (x, (i, picks))
                for i, m in enumerate(named)
                for x, picks in _expand_one(m, f"methods[{i}]")
            ]
            if isinstance(info.context, dict):
                info.context["origins"] = [origin for _, origin in expanded]
            data = dict(data, methods=[x for x, _ in expanded])
        return data

    @model_validator(mode="after")
    def _methods(self, info: ValidationInfo) -> Recipe:
        from quantlab.registry import get_backend

        labels = [m.label for m in self.methods]
        dup = sorted(x for x, n in Counter(labels).items() if n > 1)
        if dup:
            raise ValueError(f"method labels must be unique; repeated: {', '.join(dup)}")
        if "llamacpp" in self.eval.engines and not any("gguf" in m.export for m in self.methods):
            raise ValueError(
                "eval.engines has 'llamacpp' but no method exports GGUF; add export: [native, "
                "gguf] to the methods llama.cpp should measure"
            )
        if "llamacpp" in self.eval.serving_engines() and not any(
            "gguf" in m.export for m in self.methods
        ):
            raise ValueError(
                "eval.serving serves with 'llamacpp' (llama-server) but no method exports GGUF; "
                "add export: [native, gguf] to the methods llama-server should serve"
            )
        if len(self.all_methods()) > len(self.methods) and "baseline" in labels:
            raise ValueError(
                "a method is labelled 'baseline', the name of the float baseline that 'baseline: "
                "true' adds; rename the method, or set 'baseline: false' (or give it backend "
                "'none')"
            )
        origins = _origins(info, len(self.methods))
        for i, m in enumerate(self.methods):
            backend = get_backend(m.backend, where=_where(("methods", i, "backend"), origins))
            try:
                backend.Config(**m.options)
            except ValidationError as e:
                raise RecipeError(
                    _format_errors(e, backend.Config, at=("methods", i, "options"), origins=origins)
                ) from None
            if m.sensitivity is not None and "skip" not in backend.Config.model_fields:
                where = _where(("methods", i, "sensitivity"), origins)
                raise RecipeError(
                    f"{where}: backend '{m.backend}' quantizes no individual layers "
                    "(it has no 'skip' option); remove the block"
                )
        return self

    @model_validator(mode="after")
    def _models(self) -> Recipe:
        if self.models and "model" in self.model_fields_set:
            raise RecipeError("give either model (one) or models (several), not both")
        labels = [m.dir_label() for m in self.models]
        dup = sorted(x for x, n in Counter(labels).items() if n > 1)
        if dup:
            raise RecipeError(
                f"models share the directory label {', '.join(dup)}; give each a label"
            )
        for i, label in enumerate(labels):
            if label.lower() in RESERVED_MODEL_LABELS:
                how = "its label" if self.models[i].label else "the label its source gives it"
                reserved = ", ".join(sorted(RESERVED_MODEL_LABELS))
                raise RecipeError(
                    f"models[{i}]: {how}, {label!r}, is the name of an entry quantlab writes into "
                    f"a several-models run (reserved: {reserved}); give the model another label"
                )
        return self

    def per_model(self) -> list[tuple[str, Recipe]]:
        """With ``models``: (label, the recipe for that model alone) for each model."""
        return [
            (m.dir_label(), self.model_copy(update={"model": m, "models": []})) for m in self.models
        ]

    def all_methods(self) -> list[MethodSpec]:
        """Methods to run, with the implicit baseline first when `baseline` is on."""
        if self.baseline and not any(m.backend == "none" for m in self.methods):
            gguf = (
                ["native", "gguf"] if any("gguf" in m.export for m in self.methods) else ["native"]
            )
            return [MethodSpec(label="baseline", backend="none", export=gguf), *self.methods]
        return list(self.methods)

    def output_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))


# --------------------------------------------------------------------------- loading


def _set_path(doc: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise RecipeError(
                    f"--set {dotted}: '{where}' is not an index of a list of {len(node)} (the "
                    f"next index, {len(node)}, adds an entry)"
                )
            idx = int(part)
            if idx == len(node):  # one past the end adds an entry (a method, a model)
                node.append(value if last else _container_for(parts[i + 1]))
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = _container_for(parts[i + 1])
                node = node[part]
        else:
            raise RecipeError(f"--set {dotted}: '{'.'.join(parts[:i])}' is a value, not a section")


def _container_for(next_part: str) -> Any:
    return [] if next_part.isdigit() else {}


_METHOD_KEY = re.compile(r"^methods\.(\d+)\.(?:options\.(\w+)|(backend))$")


def _get_path(doc: Any, dotted: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a recipe document. An
    override of a method's option or backend renames the method (:func:`relabel`) unless the
    same command sets its label: a row is never named after options it was not run with."""
    renames: list[tuple[int, str, Any, Any]] = []
    labelled: set[int] = set()
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set expects KEY=VALUE, e.g. calibration.samples=32 (got {item!r})"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"--set expects KEY=VALUE (got {item!r})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise RecipeError(
                f"--set {key}: the value is nested too deeply to be a recipe value"
            ) from None
        # counted before anything reads it: a label made from it would expand its aliases
        _refuse_expanding(value, f"--set {key}", what="the value")
        if (m := _METHOD_KEY.match(key)) and isinstance(
            _get_path(doc, f"methods.{m.group(1)}.label"), str
        ):
            renames.append((int(m.group(1)), m.group(2) or "backend", _get_path(doc, key), value))
        if lm := re.match(r"^methods\.(\d+)\.label$", key):
            labelled.add(int(lm.group(1)))
        _set_path(doc, key, value)
    for idx, opt, old, new in renames:
        if idx not in labelled:
            method = doc["methods"][idx]
            method["label"] = relabel(method["label"], opt, old, new)
    return doc


def _model_at(cls: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """Follow a pydantic error location through nested models."""
    for part in loc:
        if cls is None or isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        cls = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return cls


def _echo(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to MAX_ECHO characters."""
    text = repr(value)  # bounded: documents are refused past MAX_RECIPE_NODES values
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "…"


def _origins(info: ValidationInfo, n_methods: int) -> list | None:
    """Where each expanded method came from, as :meth:`Recipe._expand_sweeps` recorded it."""
    origins = info.context.get("origins") if isinstance(info.context, dict) else None
    return origins if isinstance(origins, list) and len(origins) == n_methods else None


def _where(loc: tuple, origins: list | None, prefix: str = "", *, key: bool = False) -> str:
    """Where an error at ``loc`` of the expanded recipe is in the recipe as the user wrote it:
    ``methods[k]`` of the expanded list is ``methods[i]`` of the recipe, and a swept option's
    value is ``methods[i].sweep.KEY[j]`` (not ``options.KEY``, which the user did not write);
    ``key``: the error is about the key itself (unknown), not one of its values."""
    if origins is None or len(loc) < 2 or loc[0] != "methods" or not isinstance(loc[1], int):
        return _path(loc, prefix)
    i, picks = origins[loc[1]]
    rest = loc[2:]
    if rest[:1] == ("options",) and len(rest) > 1 and rest[1] in picks:
        value = () if key and len(rest) == 2 else (picks[rest[1]],)
        return _path(("methods", i, "sweep", rest[1], *value, *rest[2:]), prefix)
    if rest == ("options",) and picks:  # an error of one combination as a whole
        combination = ", ".join(f"{k}[{j}]" for k, j in picks.items())
        return _path(("methods", i, "sweep"), prefix) + f" (the combination {combination})"
    return _path(("methods", i, *rest), prefix)


def _path(loc: tuple, prefix: str = "") -> str:
    """``methods[0].options.bits`` from ``("methods", 0, "options", "bits")``."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _format_errors(
    exc: ValidationError,
    root: type[BaseModel],
    prefix: str = "",
    *,
    at: tuple = (),
    origins: list | None = None,
) -> str:
    """One line per error of ``exc`` (raised validating ``root``), each naming where: ``prefix``,
    then ``at`` and the error's location, as the user wrote it (see :func:`_where`)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic reports errors raised in validators under an unnamed location
        path = _where(at + loc, origins, prefix, key=err["type"] == "extra_forbidden")
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            known = list(parent.model_fields) if parent else []
            hint = did_you_mean(str(loc[-1]), known)
            lines.append(f"{path}: unknown key{hint}; known keys: {', '.join(known)}")
            continue
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if (
            err["type"] in {"literal_error"}
            or err["type"].endswith("_type")
            or "greater" in err["type"]
            or "less" in err["type"]
        ):
            msg += f" (got {_echo(err.get('input'))})"
        lines.append(f"{path or 'recipe'}: {msg}")
    return "\n".join(lines)


def parse_recipe(doc: Any, *, default_name: str = "run", origin: str = "recipe") -> Recipe:
    """Validate a recipe document (a dict) and return a :class:`Recipe`."""
    if doc is None:
        raise RecipeError(f"{origin}: the recipe is empty; it needs at least a 'methods' list")
    if not isinstance(doc, dict):
        raise RecipeError(
            f"{origin}: a recipe is a mapping of keys (model, calibration, methods, "
            f"eval, output), not a {type(doc).__name__}"
        )
    _refuse_expanding(doc, origin)  # --set values and documents built in Python were never counted
    doc = dict(doc)
    doc.setdefault("name", default_name)
    context: dict[str, Any] = {}
    try:
        return Recipe.model_validate(doc, context=context)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None
    except ValidationError as e:
        text = _format_errors(e, Recipe, origins=context.get("origins"))
        raise RecipeError("\n".join(f"{origin}: {line}" for line in text.splitlines())) from None


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one would
    silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an odd key (a list...): the schema rejects it with a clearer message
            if (type(key), key) in seen:
                mark = key_node.start_mark
                raise RecipeError(
                    f"key '{key}' is given twice in the same section (line {mark.line + 1}); "
                    "keep one"
                )
            seen.add((type(key), key))
        return super().construct_mapping(node, deep=deep)


def _count_nodes(doc: Any, limit: int) -> tuple[int, int]:
    """Values in ``doc`` with aliases expanded, and how deeply they nest; counting stops past
    ``limit`` values (so a "billion laughs" document costs microseconds, not minutes)."""
    count, deepest, stack = 0, 0, [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        count, deepest = count + 1, max(deepest, depth)
        if count > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return count, deepest


def read_recipe_document(path: Path) -> Any:
    """The YAML document of a recipe file, refused when it is too large, not UTF-8, not
    YAML, has duplicate keys, or expands (through aliases) past MAX_RECIPE_NODES values."""
    if path.is_dir():
        raise RecipeError(
            f"'{path}' is a directory; give a recipe file (.yaml), e.g. recipes/rtn_int4.yaml"
        )
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: {size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES} bytes); "
            "is it the right file?"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    try:
        doc = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    except RecursionError:
        raise RecipeError(f"{path}: the document is nested too deeply to be a recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    _refuse_expanding(doc, str(path))
    return doc


def _refuse_expanding(doc: Any, origin: str, what: str = "the recipe") -> None:
    """Refuse a document (or a --set value) past MAX_RECIPE_NODES values or MAX_RECIPE_DEPTH
    levels, before anything walks it recursively (validation, error messages, labels)."""
    count, depth = _count_nodes(doc, MAX_RECIPE_NODES)
    if count > MAX_RECIPE_NODES:
        raise RecipeError(
            f"{origin}: {what} expands to more than {MAX_RECIPE_NODES} values "
            "(YAML aliases repeated inside each other?); write it out plainly"
        )
    if depth > MAX_RECIPE_DEPTH:
        raise RecipeError(
            f"{origin}: {what} nests {depth} levels deep; a recipe nests at most {MAX_RECIPE_DEPTH}"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides and validate it."""
    path = Path(path)
    doc = read_recipe_document(path)
    if overrides:
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys, not a {type(doc).__name__}")
        doc = apply_overrides(doc, overrides)
    return parse_recipe(doc, default_name=path.stem, origin=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain, YAML-ready dict of the resolved recipe: every default filled in, the methods'
    options too (what the backend's config resolved them to), so a changed default shows in
    ``recipe.yaml`` as it does in the result keys."""
    doc = recipe.model_dump(mode="json")
    for m, spec in zip(doc["methods"], recipe.methods):
        m["options"] = spec.config().model_dump(mode="json")
    return doc
