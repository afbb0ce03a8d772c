"""One method on a model already in memory, in the ecosystem's shape (torchao's
``quantize_(model, Int4WeightOnlyConfig(...))``, GPTQModel's ``quantize`` / ``save`` /
``load``), for notebooks::

    import quantlab
    cfg = quantlab.config("gptq", bits=4, group_size=64)
    quantlab.quantize(model, cfg, tokenizer=tok, calibration="pydoc")   # in place; returns model
    quantlab.save(model, "ckpt/gptq-w4-g64", tokenizer=tok)             # a checkpoint like a run's
    loaded = quantlab.load("ckpt/gptq-w4-g64", kernel="auto")           # reloaded from disk

The checkpoint is the one a recipe's run exports (same layouts, sidecar, manifest), so
``quantlab eval`` and every loader read it; what a run adds (scoring, speed, reports, resume)
stays with recipes.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError

#: model -> (the backend that quantized it, what its quantize returned): what ``save`` needs.
#: Held beside the model, not on it, and only as long as the model lives.
_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def config(backend: str, **options: Any):
    """The validated options of ``backend`` (``quantlab backends`` lists them), e.g.
    ``config("awq", bits=4, group_size=64)``; a wrong option is a :class:`RecipeError`
    naming it, as in a recipe."""
    from pydantic import ValidationError

    from quantlab import arguments
    from quantlab.recipe import RecipeError, _format_errors
    from quantlab.registry import get_backend

    cls = get_backend(arguments.text("backend", backend))
    try:
        cfg = cls.Config(**options)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, cls.Config, f"{backend} options")) from None
    if cfg.model_dump().get("skip") == "auto":
        raise QuantlabError(
            "skip: auto needs the sensitivity pass of a recipe run; give layer patterns here"
        )
    return cfg


def _backend_of(cfg) -> Any:
    from quantlab.registry import backend_names, get_backend

    for name in backend_names():
        cls = get_backend(name)
        if type(cfg) is cls.Config:
            return cls(cfg)
    raise QuantlabError(
        f"{type(cfg).__name__} is not the options of a quantlab backend; use quantlab.config(...)"
    )


def _calibration(calibration, tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token windows [samples, seq_len] from token ids, a list of texts or a text source."""
    from quantlab.data import Text, load_text, sample_calibration, tokenize

    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise QuantlabError(
                "calibration as a tensor must be token ids [samples, seq_len] (int64)"
            )
        if calibration.numel() == 0:
            shape = list(calibration.shape)
            raise QuantlabError(
                f"calibration holds no tokens (shape {shape}); give token ids "
                "[samples, seq_len] with samples >= 1 and seq_len >= 1"
            )
        return calibration.long()
    if tokenizer is None:
        raise QuantlabError(
            "calibration from text needs the tokenizer: quantize(model, cfg, tokenizer=tok, ...)"
        )
    _check_tokenizer(tokenizer)
    if isinstance(calibration, str):
        text = load_text(calibration, None, "calibration")
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        text = Text("texts", list(calibration))
    else:
        raise QuantlabError(
            "calibration must be a text source ('pydoc', a file, a directory), a list of "
            "strings, or token ids [samples, seq_len]"
        )
    return sample_calibration(tokenize(text, tokenizer), text, samples, seq_len, seed).ids


def _check_tokenizer(tokenizer) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise QuantlabError(
            f"tokenizer must be the model's transformers tokenizer "
            f"(AutoTokenizer.from_pretrained(...)), not {type(tokenizer).__name__}"
        )


def _check_model(model) -> torch.device:
    """The device of a model quantlab can work on (a torch module with weights)."""
    if not isinstance(model, nn.Module):
        raise QuantlabError(
            f"model must be a transformers causal LM (a torch nn.Module), not "
            f"{type(model).__name__}"
        )
    param = next(model.parameters(), None)
    if param is None:
        raise QuantlabError(
            f"model ({type(model).__name__}) has no parameters: nothing to quantize"
        )
    return param.device


def _check_ids(ids: torch.Tensor, model: nn.Module) -> None:
    """Token ids the model's embedding can look up: a wrong tokenizer, or ids made for another
    model, would otherwise fail deep inside torch (or, on CUDA, as a device assert)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        span = f"0 to {vocab - 1}" if vocab is not None else "0 or more"
        raise QuantlabError(
            f"calibration holds token id {bad}, outside this model's vocabulary "
            f"({span}); use ids from the model's own tokenizer"
        )


def quantize(
    model: nn.Module,
    cfg,
    *,
    tokenizer=None,
    calibration: Any = "pydoc",
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> nn.Module:
    """Quantize ``model`` (a transformers causal LM, float) with ``cfg`` (:func:`config`) in
    place and return it. ``calibration`` (methods that need it): a text source, a list of
    strings (``samples`` windows of ``seq_len`` tokens are drawn with ``seed``) or token ids.
    Every argument is checked first (:mod:`quantlab.arguments`)."""
    from quantlab import arguments

    device = _check_model(model)
    backend = _backend_of(cfg)
    samples, seq_len = arguments.count("samples", samples), arguments.count("seq_len", seq_len)
    seed = arguments.integer("seed", seed)
    if tokenizer is not None:
        _check_tokenizer(tokenizer)
    backend.check_dependencies()
    backend.check(model)
    calib = None
    if backend.needs_calibration:
        calib = _calibration(calibration, tokenizer, samples, seq_len, seed)
        _check_ids(calib, model)
        calib = calib.to(device)
    with torch.no_grad():
        done = backend.quantize(model.eval(), calib)
    _QUANTIZED[done.model] = (backend, done)  # for save(): nothing rides on the model
    return done.model


def save(model: nn.Module, path: str | Path, *, tokenizer, source: str | None = None) -> Path:
    """Export a model :func:`quantize` returned as a quantlab checkpoint at ``path``
    (atomically; an existing checkpoint there is replaced). ``source`` names the model it
    came from in the sidecar.

    The rule of every quantlab entry point (``quantlab.rundir.prepare_run_dir``): ``path`` is
    never inside a run, report, checkpoint or directory of runs (a run keeps the numbers of
    its own checkpoints; only the run itself exports into it), and an existing ``path`` is
    replaced only when it is a checkpoint quantlab wrote."""
    from quantlab import arguments
    from quantlab.checkpoint import export_checkpoint
    from quantlab.rundir import refuse_inside_output

    backend, done = _QUANTIZED.get(model, (None, None))
    if backend is None:
        raise QuantlabError(
            "this model was not quantized by quantlab.quantize (nothing says how to store it); "
            "quantize it first, or save a float model with transformers' save_pretrained"
        )
    path = arguments.path("path", path)
    source = arguments.text("source", source, optional=True)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise QuantlabError(
            f"save needs the model's tokenizer (tokenizer=tok, a transformers "
            f"tokenizer), not {type(tokenizer).__name__}: a checkpoint holds its "
            "tokenizer, and quantlab.load and quantlab eval read it from there"
        )
    refuse_inside_output(path, "checkpoint path")
    return export_checkpoint(
        done, tokenizer, backend, path, label=path.name, source={"source": source, "kind": "api"}
    )
