"""``none``: the unquantized model, exported in the run's dtype. It is the reference row."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    QuantizeContext,
    Quantized,
    save_weights,
)


class NoQuantConfig(BackendConfig):
    pass


class NoQuant(Backend):
    name = "none"
    description = "No quantization: the float model in the run's dtype (the baseline)."
    Config = NoQuantConfig
    quantizes = False

    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        return model

    def save(self, quantized: Quantized, out_dir: Path) -> None:
        model = quantized.model
        save_weights(model, out_dir / WEIGHTS_NAME)
        return None

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            ckpt_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
        return model.to(device).eval()
