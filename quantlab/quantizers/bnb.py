"""``bnb``: bitsandbytes 4-bit (NF4, FP4) and 8-bit (LLM.int8) linear layers.

Layers are replaced by ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` exactly as
transformers' ``BitsAndBytesConfig`` quantize-on-load does, but in memory, so that the
sensitivity pass can quantize one layer at a time. The checkpoint is transformers'
bitsandbytes layout (``quant_method: bitsandbytes``): ``AutoModelForCausalLM.from_pretrained``
loads it, and that is how quantlab reloads it too.

Faithful export: on CPUs with avx512_bf16, bitsandbytes repacks 4-bit weights in place on the
first forward pass, and saving afterwards writes scales that no longer match (the reloaded
model is garbage). The backend therefore keeps the tensors of every quantized layer as they
were right after quantization and writes those, whatever ran in between.

LLM.int8 (``mode: int8``) quantizes its inputs from float16: float32 activations are cast to
float16 first (bitsandbytes' own behaviour; its per-call log line is silenced).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    QuantizeContext,
    Quantized,
    quantizable_linears,
    set_module,
    skip_field,
    target_linears,
    tied_parameter_names,
)
from quantlab.quantizers.int8 import transformers_load


def _bnb():
    import logging

    # LLM.int8 logs "inputs will be cast from float32 to float16" on every matmul; that fact
    # is stated once in the backend's documentation instead
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except ImportError:
        raise MissingDependencyError("bitsandbytes", "bnb", "backend 'bnb'") from None
    return bitsandbytes


class BnbConfig(BackendConfig):
    mode: Literal["nf4", "fp4", "int8"] = Field(
        "nf4",
        description="'nf4' (4-bit NormalFloat), 'fp4' (4-bit float) or 'int8' (LLM.int8: "
        "int8 weights, outlier input features in 16/32-bit).",
    )
    double_quant: bool = Field(
        False, description="4-bit: quantize the block scales too (saves about 0.4 bits per weight)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit: dtype the matmul runs in ('auto': the run's dtype)."
    )
    threshold: float | None = Field(
        None,
        ge=0,
        description="int8: outlier threshold of "
        "LLM.int8 (default 6.0; 0 disables the outlier path).",
    )
    skip: list[str] | Literal["auto"] = skip_field()

    @model_validator(mode="after")
    def _mode_keys(self):
        if self.mode == "int8":
            if self.double_quant:
                raise ValueError("double_quant applies to the 4-bit modes (nf4, fp4), not int8")
            if self.compute_dtype != "auto":
                raise ValueError(
                    "compute_dtype applies to the 4-bit modes (nf4, fp4); int8 computes "
                    "in the run's dtype"
                )
        elif self.threshold is not None:
            raise ValueError(f"threshold applies to mode int8 (LLM.int8), not {self.mode}")
        return self

    def int8_threshold(self) -> float:
        return 6.0 if self.threshold is None else self.threshold

    def table_fields(self) -> dict[str, Any]:
        return {
            "bits": 8 if self.mode == "int8" else 4,
            "group_size": None if self.mode == "int8" else 64,
        }

    def transformers_config(self, dtype: torch.dtype, skipped: list[str]):
        """The equivalent ``BitsAndBytesConfig`` (written into config.json)."""
        from transformers import BitsAndBytesConfig

        if self.mode == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=self.int8_threshold(),
                llm_int8_skip_modules=skipped or None,
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute(dtype),
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=skipped or None,
        )

    def compute(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.compute_dtype == "auto" else getattr(torch, self.compute_dtype)


def _is_bnb(m: nn.Module) -> bool:
    bnb = _bnb()
    return isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


class Bnb(Backend):
    name = "bnb"
    description = (
        "bitsandbytes NF4/FP4 (optional double quantization) or LLM.int8, transformers layout."
    )
    Config = BnbConfig
    extra = "bnb"

    def check_dependencies(self) -> None:
        _bnb()

    def check(self, model: nn.Module) -> None:
        targets = quantizable_linears(model, self.config.skip_list())
        _bnb()
        if self.config.mode != "int8":
            odd = [n for n, m in targets if m.in_features * m.out_features % 2]
            if odd:
                raise QuantlabError(
                    f"layer '{odd[0]}' has an odd number of weights, which 4-bit "
                    "packing cannot hold; add it to 'skip'"
                )

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        bnb = _bnb()
        c = self.config
        for name, lin in target_linears(model, c.skip_list()):
            device = lin.weight.device
            has_bias = lin.bias is not None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if c.mode == "int8":
                    q = bnb.nn.Linear8bitLt(
                        lin.in_features,
                        lin.out_features,
                        bias=has_bias,
                        has_fp16_weights=False,
                        threshold=c.int8_threshold(),
                        device="meta",
                    )
                    q.weight = bnb.nn.Int8Params(
                        lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False
                    ).to(device)
                else:
                    q = bnb.nn.Linear4bit(
                        lin.in_features,
                        lin.out_features,
                        bias=has_bias,
                        compute_dtype=c.compute(lin.weight.dtype),
                        compress_statistics=c.double_quant,
                        quant_type=c.mode,
                        quant_storage=torch.uint8,
                        device="meta",
                    )
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data.clone(),
                        requires_grad=False,
                        quant_type=c.mode,
                        compress_statistics=c.double_quant,
                        quant_storage=torch.uint8,
                        module=q,
                    ).to(device)
            if has_bias:
                q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            # a new module is in training mode, where LLM.int8 on CPU takes a dequantize-
            # then-matmul path that differs from the int8 path the reloaded (eval) model takes
            q.train(lin.training)
            set_module(model, name, q)
        # what save() writes: the layers' tensors before any forward pass could repack them
        out.artifacts["state"] = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if _owned_by(k, self.quantized_modules(model))
        }
        return model

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if _is_bnb(m)]

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        from safetensors.torch import save_file

        snapshot = quantized.artifacts.get("state")
        if snapshot is None:
            raise QuantlabError(
                "this model was not quantized by the bnb backend in this process; "
                "it cannot be exported faithfully"
            )
        tied = tied_parameter_names(model)
        tensors = {}
        for k, v in model.state_dict().items():
            if k in tied or not isinstance(v, torch.Tensor):
                continue
            tensors[k] = snapshot.get(k, v).detach().contiguous().cpu()
        save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        dtype = next(p.dtype for n, p in model.named_parameters() if p.is_floating_point())
        skipped = [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_bnb(m)
        ]
        return self.config.transformers_config(dtype, skipped).to_dict()

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        _bnb()
        return transformers_load(ckpt_dir, dtype, device)


def _owned_by(key: str, modules: list[str]) -> bool:
    return any(key.startswith(f"{m}.") for m in modules)
