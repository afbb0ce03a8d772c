"""``quanto``: optimum-quanto weight-only quantization (int8, int4, int2, float8).

optimum-quanto replaces linear layers by ``QLinear`` modules and ``freeze`` stores the
quantized weights: int8/float8 with one scale per output channel; int4/int2 in groups of
input columns with scale and shift, the group size chosen by quanto per layer (128, else the
largest of 96, 64, 32 that divides the input width: 96 for the demo model's 576-wide layers,
128 for its 1536-wide ones; per channel when none does).
The checkpoint is optimum-quanto's own layout: ``model.safetensors`` with the
quantized tensors flattened by quanto plus ``quanto_qmap.json`` (the quantization map), as
``QuantizedModelForCausalLM.save_pretrained`` writes it.

Reloading builds the float architecture on the CPU, applies the map with quanto's
``requantize`` and loads the tensors. (Building it on the meta device, as
``QuantizedModelForCausalLM.from_pretrained`` does, is not used: it gave wrong outputs
here.) Quanto's int4/int2 kernels fail under ``torch.inference_mode``; scoring uses
``torch.no_grad``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    QuantizeContext,
    Quantized,
    build_skeleton,
    quantizable_linears,
    read_weights,
    save_weights,
    skip_field,
    target_linears,
)

QMAP_NAME = "quanto_qmap.json"
_BITS = {"int8": 8, "int4": 4, "int2": 2, "float8": 8}


def _quanto():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import optimum.quanto as q
    except ImportError:
        raise MissingDependencyError("optimum-quanto", "quanto", "backend 'quanto'") from None
    return q


def _qtype(name: str):
    q = _quanto()
    return {"int8": q.qint8, "int4": q.qint4, "int2": q.qint2, "float8": q.qfloat8}[name]


class QuantoConfig(BackendConfig):
    weights: Literal["int8", "int4", "int2", "float8"] = Field(
        "int8",
        description="Weight type: int8 and float8 per output channel, int4 and int2 in "
        "groups (quanto picks 128, else the largest of 96/64/32 dividing the input width).",
    )
    skip: list[str] | Literal["auto"] = skip_field()

    def table_fields(self) -> dict[str, Any]:
        return {"bits": _BITS[self.weights]}


class Quanto(Backend):
    name = "quanto"
    description = (
        "optimum-quanto weight-only int8/int4/int2/float8 (quanto's own checkpoint layout)."
    )
    Config = QuantoConfig
    extra = "quanto"

    def check_dependencies(self) -> None:
        _quanto()

    def check(self, model: nn.Module) -> None:
        quantizable_linears(model, self.config.skip_list())
        _quanto()

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        q = _quanto()
        names = [n for n, _ in target_linears(model, self.config.skip_list())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize(model, weights=_qtype(self.config.weights), include=names)
            q.freeze(model)
        return model

    def quantized_modules(self, model: nn.Module) -> list[str]:
        q = _quanto()
        return [n for n, m in model.named_modules() if isinstance(m, q.QModuleMixin)]

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        q = _quanto()
        save_weights(model, out_dir / WEIGHTS_NAME)
        (out_dir / QMAP_NAME).write_text(json.dumps(q.quantization_map(model), indent=2))
        # optimum-quanto checkpoints carry no quantization_config (quanto_qmap.json holds the
        # map); this one names the method so that tools reading config.json see it
        return {
            "quant_method": "quanto",
            "weights": self.config.weights,
            "activations": None,
            "format": "optimum-quanto",
            "qmap": QMAP_NAME,
        }

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        from transformers import AutoConfig

        q = _quanto()
        ckpt_dir = Path(ckpt_dir)
        try:
            qmap = json.loads((ckpt_dir / QMAP_NAME).read_text())
            state = read_weights(ckpt_dir / WEIGHTS_NAME)  # one file, or an index and shards
        except FileNotFoundError as e:
            raise QuantlabError(
                f"quanto checkpoint '{ckpt_dir}' is incomplete: {e.filename} is missing"
            ) from None
        except QuantlabError:
            raise  # read_weights names the file and what would work
        except Exception as e:
            raise QuantlabError(f"quanto checkpoint '{ckpt_dir}' cannot be read: {e}") from None
        config = AutoConfig.from_pretrained(ckpt_dir, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers would look for a "quanto" quantizer
        model = build_skeleton(config, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.requantize(model, state_dict=state, quantization_map=qmap, device=torch.device("cpu"))
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.to(device).eval()
