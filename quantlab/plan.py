"""The run as data: :func:`prepare` computes once everything the methods of a run share and
writes it to the run directory; :class:`RunPlan` is what a method runner reads, in this
process or on another machine (:mod:`quantlab.executors`).

What the plan holds: the recipe as resolved, the device and dtype, the keys that decide
whether a result may be reused, the evaluation plan (token windows), the calibration
windows, the speed prompt, labels, the environment, and where the base model's reference
distributions lie. It is stored as JSON (``plan.json``) and tensors (``plan.safetensors``):
data only, nothing that runs code when read.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantlab import __version__
from quantlab.bench.perplexity import Segment, WindowPlan, model_context
from quantlab.data import Calibration, Text, load_spec_text, sample_calibration, tokenize
from quantlab.env import environment
from quantlab.errors import QuantlabError
from quantlab.models import LoadedModel, content_digest, load_model, resolve_device, resolve_dtype
from quantlab.recipe import Recipe, recipe_to_dict
from quantlab.records import (
    atomic_write_bytes,
    atomic_write_text,
    code_digest,
    read_record,
    stage_key,
    write_record,
)
from quantlab.registry import get_backend
from quantlab.rundir import RunDir, prepare_run_dir
from quantlab.scoring import (
    build_plan,
    compute_reference,
    floor_dtype,
    labels,
    noise_floor,
    plan_key,
)

PLAN_FORMAT = 1


@dataclass(frozen=True)
class TextRef:
    """What a result records of a text: its name and content hash."""

    name: str
    sha256: str


@dataclass
class RunPlan:
    recipe: Recipe
    run_dir: RunDir
    force: bool
    device: str
    dtype: str
    #: what determines results: ``shared`` (every row), ``export`` (checkpoints), ``calibration``
    keys: dict[str, Any]
    source_info: dict[str, Any]
    env: dict[str, Any]
    eval_text: TextRef
    eval_labels: dict[str, Any]
    eval_plan: WindowPlan
    reference_key: str | None
    prompt: torch.Tensor | None
    calibration: Calibration | None
    cal_ids: torch.Tensor | None
    cal_text: TextRef | None
    base_load_s: float
    session: str
    #: the float model's own KL in another dtype (quantlab.scoring.noise_floor), when divergence
    #: is measured: the smallest KL difference these tokens can tell apart
    noise_floor: dict[str, Any] | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def backend(self, method):
        return get_backend(method.backend)(method.config())

    def method_key(self, method, backend=None) -> tuple[str, str]:
        """(result key, checkpoint key) of one method: the shared keys plus the method's
        options as resolved (every default filled in), its config and layout versions."""
        backend = backend or self.backend(method)
        sens = method.sensitivity_spec()
        uses_cal = backend.needs_calibration or sens is not None
        cal = None
        if uses_cal:
            cal = dict(
                self.keys["calibration"],
                calibration_sha256=self.calibration.sha256 if backend.needs_calibration else None,
            )
        layout = backend.layout()
        spec = method.model_dump(mode="json", exclude={"resources"})  # where it runs: see threads
        what = {
            "calibration": cal,
            "backend_version": backend.Config.version,
            "layout": None if layout is None else [layout.name, layout.version],
            "threads": self.threads_for(method),
            "method": dict(spec, options=backend.config.model_dump(mode="json")),
        }
        return stage_key({"shared": self.keys["shared"], **what}), stage_key(
            {"export": self.keys["export"], **what}
        )

    def threads_for(self, method) -> int | None:
        """torch threads the method runs with: the recipe's ``threads``, else on Ray its task's
        CPUs, else (local) every core (None)."""
        if self.recipe.threads:
            return self.recipe.threads
        if self.recipe.executor.kind == "ray":
            return max(1, int(method.resources.cpus))
        return None

    def load_base(self) -> LoadedModel:
        """A fresh float model from the recipe's source, checked to be the one the plan was
        made from (a worker on another machine may see another file under the same path)."""
        m = self.recipe.model
        base = load_model(
            m.source,
            dtype=self.torch_dtype,
            device=self.torch_device,
            revision=m.revision,
            trust_remote_code=m.trust_remote_code,
        )
        want = self.source_info.get("content_sha256") or self.source_info.get("commit")
        got = base.info.get("content_sha256") or base.info.get("commit")
        if want != got:
            raise QuantlabError(
                f"model '{m.source}' here is not the model the run was planned with (content "
                f"{str(got)[:12]} vs {str(want)[:12]}); every machine of a run must see the same "
                "model"
            )
        return base

    # ------------------------------------------------------------------ storage
    def save(self) -> None:
        tensors, doc = _plan_tensors(self), _plan_doc(self)
        from safetensors.torch import save

        atomic_write_bytes(
            self.run_dir.plan_tensors, save(tensors, metadata={"format": str(PLAN_FORMAT)})
        )
        doc["tensors_sha256"] = _sha(self.run_dir.plan_tensors.read_bytes())
        atomic_write_text(self.run_dir.plan_json, json.dumps(doc, indent=1, default=str))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunPlan:
        """The plan a driver wrote into ``run_dir`` (a worker's view of the run)."""
        rd = RunDir(Path(run_dir))
        try:
            doc = json.loads(rd.plan_json.read_text(encoding="utf-8"))
            raw = rd.plan_tensors.read_bytes()
        except OSError as e:
            raise QuantlabError(
                f"cannot read the run plan in '{run_dir}' ({e.strerror or e}); on a cluster the "
                "run directory must be on storage every node mounts at the same path"
            ) from None
        if (
            doc.get("format") != PLAN_FORMAT
            or doc.get("quantlab") != __version__
            or doc.get("code") != code_digest()
        ):
            raise QuantlabError(
                f"the run plan in '{run_dir}' was written by another quantlab (version or code "
                "differs); every machine of a run needs the same quantlab"
            )
        if doc.get("tensors_sha256") != _sha(raw):
            raise QuantlabError(
                f"the run plan's tensors in '{run_dir}' do not match plan.json; run again"
            )
        from safetensors.torch import load

        return _plan_from(doc, load(raw), rd)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _plan_tensors(p: RunPlan) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for i, s in enumerate(p.eval_plan.segments):
        t[f"eval.{i}.input_ids"], t[f"eval.{i}.targets"] = (
            s.input_ids.contiguous(),
            s.targets.contiguous(),
        )
    if p.prompt is not None:
        t["prompt"] = p.prompt.contiguous()
    if p.calibration is not None:
        t["calibration"] = p.calibration.ids.contiguous()
    if p.cal_ids is not None:
        t["cal_ids"] = p.cal_ids.contiguous()
    return t


def _plan_doc(p: RunPlan) -> dict[str, Any]:
    ep = p.eval_plan
    cal = None
    if p.calibration is not None:
        c = p.calibration
        cal = {
            "source": c.source,
            "sha256": c.sha256,
            "text_tokens": c.text_tokens,
            "seed": c.seed,
            "starts": c.starts,
        }
    return {
        "format": PLAN_FORMAT,
        "quantlab": __version__,
        "code": code_digest(),
        "recipe": recipe_to_dict(p.recipe),
        "force": p.force,
        "device": p.device,
        "dtype": p.dtype,
        "keys": p.keys,
        "source_info": p.source_info,
        "env": p.env,
        "eval_text": vars(p.eval_text),
        "eval_labels": p.eval_labels,
        "eval_plan": {
            "convention": ep.convention,
            "params": ep.params,
            "text_tokens": ep.text_tokens,
            "docs": ep.docs,
            "segment_docs": [s.doc for s in ep.segments],
        },
        "reference_key": p.reference_key,
        "calibration": cal,
        "cal_text": vars(p.cal_text) if p.cal_text else None,
        "base_load_s": p.base_load_s,
        "session": p.session,
        "noise_floor": p.noise_floor,
    }


def _plan_from(doc: dict, t: dict[str, torch.Tensor], rd: RunDir) -> RunPlan:
    from quantlab.recipe import parse_recipe

    ep = doc["eval_plan"]
    segments = [
        Segment(t[f"eval.{i}.input_ids"], t[f"eval.{i}.targets"], d)
        for i, d in enumerate(ep["segment_docs"])
    ]
    cal = None
    if doc["calibration"] is not None:
        c = doc["calibration"]
        cal = Calibration(
            t["calibration"], c["source"], c["sha256"], c["text_tokens"], c["seed"], c["starts"]
        )
    return RunPlan(
        recipe=parse_recipe(doc["recipe"], origin=str(rd.plan_json)),
        run_dir=rd,
        force=doc["force"],
        device=doc["device"],
        dtype=doc["dtype"],
        keys=doc["keys"],
        source_info=doc["source_info"],
        env=doc["env"],
        eval_text=TextRef(**doc["eval_text"]),
        eval_labels=doc["eval_labels"],
        eval_plan=WindowPlan(
            ep["convention"], segments, ep["params"], ep["text_tokens"], ep["docs"]
        ),
        reference_key=doc["reference_key"],
        prompt=t.get("prompt"),
        calibration=cal,
        cal_ids=t.get("cal_ids"),
        cal_text=TextRef(**doc["cal_text"]) if doc["cal_text"] else None,
        base_load_s=doc["base_load_s"],
        session=doc["session"],
        noise_floor=doc.get("noise_floor"),
    )


# --------------------------------------------------------------------------- preparing a run


@dataclass
class Setup:
    """What is known before the model loads: checked sources, the texts, the run directory."""

    recipe: Recipe
    backends: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    eval_text: Text
    cal_text: Text | None
    run_dir: RunDir


def needs_calibration(recipe: Recipe, backends: dict) -> bool:
    return any(b.needs_calibration for b in backends.values()) or any(
        m.sensitivity_spec() for m in recipe.methods
    )


def setup(recipe: Recipe, out: str | Path | None, force: bool, check) -> Setup:
    """The cheap part, before the run directory is locked: backends built, everything checked
    that can be checked without the model (``check(recipe, backends, device)``: the pipeline's
    sources, llama.cpp and executor checks), texts read, the run directory created.

    Rule: every check that does not need the loaded model runs here, before the model is
    loaded and before the run directory is created or touched, so a mistake costs seconds
    and leaves an earlier run's directory as it was."""
    methods = recipe.all_methods()
    backends = {m.label: get_backend(m.backend)(m.config()) for m in methods}
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    check(recipe, backends, device)
    ev, cal = recipe.eval, recipe.calibration
    eval_text = load_spec_text(ev, "evaluation")
    cal_text = load_spec_text(cal, "calibration") if needs_calibration(recipe, backends) else None
    root = prepare_run_dir(Path(out) if out else recipe.output_dir(), kind="run")
    rd = RunDir(root)
    _refuse_foreign_run(rd, recipe, force)
    for (
        label
    ) in backends:  # a method directory of the wrong kind or a link: refused before any work
        rd.method(label, create=False)
    return Setup(recipe, backends, device, dtype, eval_text, cal_text, rd)


def _refuse_foreign_run(rd: RunDir, recipe: Recipe, force: bool) -> None:
    """Do not let another recipe's run replace this directory's results table."""
    import yaml

    previous = rd.recipe
    if force or not previous.is_file():
        return
    try:
        name = (yaml.safe_load(previous.read_text()) or {}).get("name")
    except (yaml.YAMLError, OSError, AttributeError):
        name = None
    if name != recipe.name:
        raise QuantlabError(
            f"'{rd.root}' holds the results of recipe '{name}', not '{recipe.name}'; choose "
            "another --out, or pass --force to replace them"
        )


def prepare(s: Setup, force: bool, log) -> tuple[RunPlan, LoadedModel]:
    """Load the base model, check every method against it, and compute what the methods
    share; the plan is written to the run directory. Returns the plan and the base model
    (the local executor quantizes it first instead of loading it again)."""
    recipe = s.recipe
    log(
        f"loading model '{recipe.model.source}' ({str(s.dtype).removeprefix('torch.')} on "
        f"{s.device})"
    )
    if recipe.model.trust_remote_code:
        log(
            "trust_remote_code is ON (recipe model.trust_remote_code): code from the model "
            "repository may run in this process; the report says so"
        )
    t0 = time.perf_counter()
    base = load_model(
        recipe.model.source,
        dtype=s.dtype,
        device=s.device,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    base_load_s = time.perf_counter() - t0
    _check_float(recipe, base)
    check_lengths(recipe, s.backends, model_context(base.model))
    ev = recipe.eval
    eval_plan = build_plan(ev, s.eval_text, base.tokenizer, base.model)
    check_methods(s.backends, base.model)
    plan = RunPlan(
        recipe=recipe,
        run_dir=s.run_dir,
        force=force,
        device=str(s.device),
        dtype=str(s.dtype).removeprefix("torch."),
        keys={},
        source_info=dict(base.info, dtype=str(s.dtype).removeprefix("torch.")),
        env={},
        eval_text=TextRef(s.eval_text.name, s.eval_text.sha256),
        eval_labels=labels(eval_plan, s.eval_text, base.tokenizer, base.model),
        eval_plan=eval_plan,
        reference_key=None,
        prompt=None,
        calibration=None,
        cal_ids=None,
        cal_text=TextRef(s.cal_text.name, s.cal_text.sha256) if s.cal_text else None,
        base_load_s=base_load_s,
        session=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    _inputs(plan, s, base)
    _environment_and_keys(plan, s, base)
    _reference(plan, base, log)
    plan.save()
    return plan, base


def _check_float(recipe: Recipe, base: LoadedModel) -> None:
    qc = getattr(base.model.config, "quantization_config", None)
    if qc:
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        )
        raise QuantlabError(
            f"model '{recipe.model.source}' is already quantized (quant_method "
            f"'{method}'); quantlab quantizes float models: give the unquantized one "
            "(score this one with `quantlab eval`)"
        )


def check_methods(backends: dict, model) -> None:
    for label, b in backends.items():
        try:
            b.check(model)
        except QuantlabError as e:  # same class, the method named
            e.args = (f"method '{label}' ({b.name}): {e}",)
            raise


def check_lengths(recipe: Recipe, backends: dict, max_pos: int | None) -> None:
    """Every window quantlab will run fits the model's context, each named by the key that
    sets it (checked before any work, so nothing runs past the model's positions)."""
    if not max_pos:
        return
    cal, speed = recipe.calibration, recipe.eval.speed
    if any(b.needs_calibration for b in backends.values()) and cal.seq_len > max_pos:
        raise QuantlabError(
            f"calibration.seq_len={cal.seq_len} is longer than the model's context ({max_pos} "
            "tokens)"
        )
    for i, m in enumerate(recipe.methods):
        spec = m.sensitivity_spec()
        if spec is not None and spec.seq_len > max_pos:
            raise QuantlabError(
                f"methods[{i}].sensitivity.seq_len={spec.seq_len} ({m.label}) is longer than the "
                f"model's context ({max_pos} tokens)"
            )
    if speed.enabled and speed.prompt_tokens + speed.new_tokens > max_pos:
        raise QuantlabError(
            f"eval.speed.prompt_tokens + eval.speed.new_tokens = {speed.prompt_tokens} + "
            f"{speed.new_tokens} tokens decode past the model's context ({max_pos} tokens); "
            "lower them"
        )


def _inputs(plan: RunPlan, s: Setup, base: LoadedModel) -> None:
    """The speed prompt (the first tokens of the evaluation text) and the calibration windows."""
    ev, cal = s.recipe.eval, s.recipe.calibration
    if ev.speed.enabled:
        plan.prompt = tokenize(s.eval_text, base.tokenizer)[: ev.speed.prompt_tokens]
    if s.cal_text is not None:
        plan.cal_ids = tokenize(s.cal_text, base.tokenizer)
        if any(b.needs_calibration for b in s.backends.values()):
            plan.calibration = sample_calibration(
                plan.cal_ids, s.cal_text, cal.samples, cal.seq_len, cal.seed
            )


def _environment_and_keys(plan: RunPlan, s: Setup, base: LoadedModel) -> None:
    from quantlab.bench.speed import memory_bandwidth

    ev = s.recipe.eval
    plan.env = environment(s.device, s.dtype)
    if ev.speed.enabled:
        plan.env["memory_bandwidth_bytes_per_s"] = memory_bandwidth(s.device)
    resolved = recipe_to_dict(s.recipe)
    # what determines every method's results; the calibration set joins the keys of only
    # the methods that use it, so adding a GPTQ method does not invalidate finished RTN rows
    shared = {
        k: v
        for k, v in resolved.items()
        if k not in ("methods", "output", "name", "description", "calibration", "executor")
    }
    # the code and library versions that compute results, the model by content, where it ran
    shared.update(
        quantlab=__version__,
        code=code_digest(),
        versions=backend_versions(s.backends),
        runtime={"device": str(s.device), "dtype": str(s.dtype)},
        eval_sha256=s.eval_text.sha256,
        model_info={k: v for k, v in base.info.items() if k != "path"},
        task_files={p: content_digest(Path(p)) for p in ev.task_paths if Path(p).is_dir()},
    )
    # what determines a checkpoint (not the evaluation settings: changing those re-scores the
    # checkpoints already exported instead of quantizing again)
    export = {
        "model": resolved["model"],
        "model_info": shared["model_info"],
        "quantlab": __version__,
        "code": shared["code"],
        "versions": shared["versions"],
        "runtime": shared["runtime"],
    }
    calibration = {
        "calibration": resolved["calibration"],
        "calibration_text_sha256": s.cal_text.sha256 if s.cal_text else None,
    }
    plan.keys = {"shared": shared, "export": export, "calibration": calibration}


def _reference(plan: RunPlan, base: LoadedModel, log) -> None:
    """The base model's distributions for divergence, computed once into the run directory."""
    ev = plan.recipe.eval
    if not ev.divergence.enabled:
        return
    part = plan.eval_plan.head(ev.divergence.max_windows)
    shared = plan.keys["shared"]
    key = plan_key(
        part,
        plan.eval_text,
        {
            "model": shared["model_info"],
            "runtime": shared["runtime"],
            "code": shared["code"],
            "versions": shared["versions"],
        },
    )
    log(
        f"base model distributions on {part.scored_tokens} tokens ({len(part.segments)} windows) "
        "for divergence"
    )
    ref = compute_reference(base.model, part, plan.run_dir.reference(), ev.batch_size, key)
    plan.reference_key = key
    plan.keys["shared"]["reference_key"] = key
    plan.noise_floor = _noise_floor(plan, base, part, ref, log)


def _noise_floor(plan: RunPlan, base: LoadedModel, part, ref, log) -> dict:
    """The float model's KL from its own reference in the other dtype, computed once per
    reference and dtype (a digest-checked record beside it) and reused while both hold."""
    dtype = floor_dtype(plan.torch_dtype)
    key = f"{plan.reference_key}:{dtype}"
    path = plan.run_dir.noise_floor()
    if (found := read_record(path, key)) is not None:
        return found["floor"]
    name = str(dtype).removeprefix("torch.")
    log(f"noise floor: the float model in {name} against its {plan.dtype} distributions")
    floor = noise_floor(base.model, part, ref, plan.recipe.eval.batch_size, dtype)
    log(
        f"noise floor: KL {floor['kld_mean']:.6f} (p99 {floor['kld_p99']:.5f}), top-1 "
        f"{floor['top1_agreement']:.4f} on {floor['kld_tokens']} tokens: smaller KL differences "
        "between rows are not a method's"
    )
    write_record(path, {"key": key, "floor": floor})
    return floor


def backend_versions(backends: dict) -> dict:
    """Versions of everything that computes a result: torch, transformers, and the libraries
    the backends use (their pip extras' packages, where installed)."""
    env = environment()["packages"]
    keep = ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "numpy")
    return {k: env.get(k) for k in keep} | {
        f"extra:{b.extra}": _extra_versions(b.extra) for b in backends.values() if b.extra
    }


def _extra_versions(extra: str) -> dict:
    import importlib.metadata

    from quantlab.env import extra_packages

    out = {}
    for name in extra_packages(extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
