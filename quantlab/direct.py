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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError

#: the attribute ``quantize`` leaves on a model: the backend that quantized it (``save`` needs it)
_ATTR = "_quantlab_backend"


def config(backend: str, **options: Any):
    """The validated options of ``backend`` (``quantlab backends`` lists them), e.g.
    ``config("awq", bits=4, group_size=64)``; a wrong option is a :class:`RecipeError`
    naming it, as in a recipe."""
    from pydantic import ValidationError

    from quantlab.recipe import RecipeError, _format_errors
    from quantlab.registry import get_backend

    cls = get_backend(backend)
    try:
        cfg = cls.Config(**options)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, cls.Config, f"{backend} options")) from None
    if cfg.model_dump().get("skip") == "auto":
        raise QuantlabError("skip: auto needs the sensitivity pass of a recipe run; give layer patterns here")
    return cfg


def _backend_of(cfg) -> Any:
    from quantlab.registry import backend_names, get_backend

    for name in backend_names():
        cls = get_backend(name)
        if type(cfg) is cls.Config:
            return cls(cfg)
    raise QuantlabError(f"{type(cfg).__name__} is not the options of a quantlab backend; use quantlab.config(...)")


def _calibration(calibration, tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token windows [samples, seq_len] from token ids, a list of texts or a text source."""
    from quantlab.data import Text, load_text, sample_calibration, tokenize

    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise QuantlabError("calibration as a tensor must be token ids [samples, seq_len] (int64)")
        return calibration.long()
    if tokenizer is None:
        raise QuantlabError("calibration from text needs the tokenizer: quantize(model, cfg, tokenizer=tok, ...)")
    if isinstance(calibration, str):
        text = load_text(calibration, None, "calibration")
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        text = Text("texts", list(calibration))
    else:
        raise QuantlabError("calibration must be a text source ('pydoc', a file, a directory), a list of "
                            "strings, or token ids [samples, seq_len]")
    return sample_calibration(tokenize(text, tokenizer), text, samples, seq_len, seed).ids


def quantize(model: nn.Module, cfg, *, tokenizer=None, calibration: Any = "pydoc", samples: int = 128,
             seq_len: int = 512, seed: int = 0) -> nn.Module:
    """Quantize ``model`` (a transformers causal LM, float) with ``cfg`` (:func:`config`) in
    place and return it. ``calibration`` (methods that need it): a text source, a list of
    strings (``samples`` windows of ``seq_len`` tokens are drawn with ``seed``) or token ids."""
    backend = _backend_of(cfg)
    backend.check_dependencies()
    backend.check(model)
    device = next(model.parameters()).device
    calib = None
    if backend.needs_calibration:
        calib = _calibration(calibration, tokenizer, samples, seq_len, seed).to(device)
    with torch.no_grad():
        out = backend.quantize(model.eval(), calib)
    setattr(out, _ATTR, backend)
    return out


def save(model: nn.Module, path: str | Path, *, tokenizer, source: str | None = None) -> Path:
    """Export a model :func:`quantize` returned as a quantlab checkpoint at ``path``
    (atomically; an existing checkpoint there is replaced). ``source`` names the model it
    came from in the sidecar."""
    from quantlab.checkpoint import export_checkpoint

    backend = getattr(model, _ATTR, None)
    if backend is None:
        raise QuantlabError("this model was not quantized by quantlab.quantize (nothing says how to store it); "
                            "quantize it first, or save a float model with transformers' save_pretrained")
    label = Path(path).name
    return export_checkpoint(model, tokenizer, backend, Path(path), source={"source": source, "kind": "api"},
                             label=label)
