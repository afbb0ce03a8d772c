"""``int8-dynamic`` and ``int8-weight-only``: INT8 linear layers from PyTorch's own stacks.

``int8-dynamic`` stores INT8 weights and quantizes activations to INT8 at run time, on one
of two engines:

- ``torchao`` (default for ``activations: per-token``): torchao's
  ``Int8DynamicActivationInt8WeightConfig`` through ``torchao.quantization.quantize_``: one
  symmetric int8 activation scale per token, one weight scale per output channel. Accurate.
  On a CPU without a fast ``torch._int_mm`` (no VNNI/AMX) the matmul can be much slower than
  float; the results table's speed columns say how it ran (docs/methods.md, "Backends", has
  figures measured on the development machine). The checkpoint is transformers' torchao
  format (``quant_method: torchao``), loadable with ``AutoModelForCausalLM.from_pretrained``.
- ``fbgemm`` (default for ``activations: per-tensor``): ``torch.ao.quantization.quantize_dynamic``,
  usually the fastest INT8 kernel on x86 CPUs. It scales
  activations per tensor; activation outliers in a few layers break that (the demo model's
  perplexity collapses when every layer is quantized): pair it with ``skip: auto``, or ask
  for ``activations: per-token``, which divides each token by its largest magnitude before
  the kernel and multiplies it back after (:class:`RowScaledDynamicLinear`). CPU and float32
  only. PyTorch has no serialization for these modules that transformers reads, so the
  checkpoint is quantlab's own (``quant_method: quantlab``, format ``int8-fbgemm``): int8
  weights and float scales in safetensors.

``int8-weight-only`` is torchao's ``Int8WeightOnlyConfig`` (per-channel INT8 weights,
activations in float), also in the transformers torchao format.
"""

from __future__ import annotations

import contextlib
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
    build_skeleton,
    quantizable_linears,
    set_module,
    skip_field,
    target_linears,
    tied_parameter_names,
)

FBGEMM_FORMAT = "int8-fbgemm"


@contextlib.contextmanager
def _quiet_torch_ao():
    """torch.ao quantization is deprecated upstream and warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message=".*deprecat.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _torchao(backend: str):
    import logging

    # torchao logs a line per CUDA-only extension it cannot load, and torch warns about its
    # pytree registrations: noise on every CPU run
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as q
    except ImportError:
        raise MissingDependencyError("torchao", "torchao", f"backend '{backend}'") from None
    return q


# --------------------------------------------------------------------------- torchao


def _torchao_config(kind: str, backend: str):
    q = _torchao(backend)
    if kind == "dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    return q.Int8WeightOnlyConfig()


def torchao_quantize(model: nn.Module, names: set[str], kind: str, backend: str) -> nn.Module:
    q = _torchao(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(
            model,
            _torchao_config(kind, backend),
            filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names,
        )
    for name in names:
        model.get_submodule(name).quantlab_quantized = True
    return model


def torchao_save(
    model: nn.Module, out_dir: Path, kind: str, backend: str, skipped: list[str]
) -> dict:
    """Write the transformers torchao layout: flattened tensor subclasses in safetensors with
    their metadata, and a ``quant_method: torchao`` config."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import TorchAoConfig

    tied = tied_parameter_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", **metadata})
    config = TorchAoConfig(
        quant_type=_torchao_config(kind, backend), modules_to_not_convert=skipped or None
    )
    return config.to_dict()


def transformers_load(ckpt_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Load through transformers' own quantizer integration (what a user of the checkpoint
    would do)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            ckpt_dir,
            dtype=dtype,
            device_map=str(device),
            use_safetensors=True,
            trust_remote_code=False,
        )
    return model.eval()


# --------------------------------------------------------------------------- fbgemm


def fbgemm_quantize(
    model: nn.Module, names: list[str], per_channel: bool, per_token: bool = False
) -> nn.Module:
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with _quiet_torch_ao():
        quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8, inplace=True)
        if per_token:
            for n in names:
                dyn = model.get_submodule(n)
                w, b = dyn._weight_bias()
                dyn.set_weight_bias(w, None)
                set_module(model, n, RowScaledDynamicLinear(dyn, b))
    return model


class RowScaledDynamicLinear(nn.Module):
    """Per-token INT8 activations on the fbgemm kernel: each row (token) of the input is
    divided by its largest magnitude before torch.ao's dynamic INT8 linear (which quantizes
    its input with one scale for the whole tensor), and the output row multiplied back, so
    the one scale fits every token alike. fbgemm quantizes activations to 7 bits on x86
    (``reduce_range``, against int16 saturation in its AVX2 inner product), so the per-token
    grid is 2x coarser than torchao's symmetric int8; the bias is added in float afterwards."""

    kernel = "fbgemm-int8-rowscaled"

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        y = self.inner(x / s) * s
        return y if self.bias is None else y + self.bias


def _fbgemm_modules(
    model: nn.Module,
) -> list[tuple[str, nn.Module, nn.Module, torch.Tensor | None]]:
    """(name, layer, its torch.ao dynamic linear, float bias) of every fbgemm INT8 layer."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    out = []
    for n, m in model.named_modules():
        if isinstance(m, RowScaledDynamicLinear):
            out.append((n, m, m.inner, m.bias))
        elif isinstance(m, DynLinear) and not n.endswith(".inner"):
            out.append((n, m, m, None))
    return out


def fbgemm_save(model: nn.Module, out_dir: Path, per_channel: bool, per_token: bool) -> dict:
    """int8 weights (``{name}.weight``), float32 scales (``{name}.weight_scale``, one per output
    channel or one in all) and float biases, with the rest of the model's tensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    with _quiet_torch_ao():
        for name, _layer, m, outer_bias in _fbgemm_modules(model):
            w, b = m._weight_bias()
            b = outer_bias if outer_bias is not None else b
            if w.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine):
                scale, zero = w.q_per_channel_scales(), w.q_per_channel_zero_points()
            else:
                scale, zero = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
            if bool((zero != 0).any()):
                raise QuantlabError(
                    f"layer '{name}': asymmetric int8 weights are not supported by the export"
                )
            tensors[f"{name}.weight"] = w.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = scale.to(torch.float32).contiguous()
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().contiguous()
            quantized.add(name)
    tied = tied_parameter_names(model)
    for k, v in model.state_dict().items():
        if (
            k in tied
            or not isinstance(v, torch.Tensor)
            or any(k.startswith(f"{n}.") for n in quantized)
        ):
            # the int8 layers' own entries (packed weights, scale, zero point) are written above
            continue
        tensors[k] = v.detach().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return {
        "quant_method": "quantlab",
        "format": FBGEMM_FORMAT,
        "bits": 8,
        "weights": "per-channel" if per_channel else "per-tensor",
        "activations": "per-token-rowscaled" if per_token else "per-tensor",
    }


def fbgemm_load(ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from safetensors.torch import load_file
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from transformers import AutoConfig

    if device.type != "cpu":
        raise QuantlabError(f"int8 fbgemm checkpoints run on CPU only, not on '{device}'")
    config = AutoConfig.from_pretrained(ckpt_dir, trust_remote_code=False)
    per_token = (getattr(config, "quantization_config", None) or {}).get(
        "activations"
    ) == "per-token-rowscaled"
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_skeleton(config, dtype)
    try:
        state = load_file(str(Path(ckpt_dir) / WEIGHTS_NAME))
    except Exception as e:
        raise QuantlabError(f"checkpoint weights in '{ckpt_dir}' cannot be read: {e}") from None
    names = meta.get("modules", [])
    try:
        packed = {
            n: (
                state.pop(f"{n}.weight"),
                state.pop(f"{n}.weight_scale").double(),
                state.pop(f"{n}.bias", None),
            )
            for n in names
        }
    except KeyError as e:
        raise QuantlabError(f"checkpoint '{ckpt_dir}' lacks the int8 tensor {e}") from None
    # the float part first, into the float skeleton (the int8 layers' weights are expected
    # to be missing here), then the int8 layers replace their float ones
    tied = tied_parameter_names(model)
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if k not in tied and k.rsplit(".", 1)[0] not in packed
    ]
    if missing or result.unexpected_keys:
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    with _quiet_torch_ao():
        for name, (w8, scale, bias) in packed.items():
            lin = model.get_submodule(name)
            if scale.numel() == 1:
                qw = torch._make_per_tensor_quantized_tensor(w8, float(scale), 0)
            else:
                qw = torch._make_per_channel_quantized_tensor(
                    w8, scale, torch.zeros_like(scale, dtype=torch.long), 0
                )
            q = DynLinear(
                lin.in_features, lin.out_features, bias_=bias is not None, dtype=torch.qint8
            )
            if per_token:
                q.set_weight_bias(qw, None)
                q = RowScaledDynamicLinear(q, bias)
            else:
                q.set_weight_bias(qw, None if bias is None else bias.float())
            set_module(model, name, q)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- backends


class Int8DynamicConfig(BackendConfig):
    activations: Literal["per-token", "per-tensor"] = Field(
        "per-token",
        description="Activation scales: one per token (accurate) or one per "
        "tensor (fragile with activation outliers; pair it with skip: auto).",
    )
    engine: Literal["torchao", "fbgemm"] | None = Field(
        None,
        description="Kernel: 'torchao' (Int8DynamicActivationInt8Weight; symmetric int8 "
        "per token; slow matmul on CPUs without a fast int8 GEMM) or 'fbgemm' (torch.ao "
        "quantize_dynamic; fastest on x86 CPUs; CPU and float32 only; per token by row "
        "scaling, with 7-bit activations). Default: torchao for per-token, fbgemm for per-tensor.",
    )
    weights: Literal["per-channel", "per-tensor"] = Field(
        "per-channel", description="Weight scales; 'per-tensor' only with the fbgemm engine."
    )
    skip: list[str] | Literal["auto"] = skip_field()

    @model_validator(mode="after")
    def _combo(self):
        if self.activations == "per-tensor" and self.engine == "torchao":
            raise ValueError(
                "activations: per-tensor runs on engine fbgemm (torchao's int8 "
                "dynamic quantization is per token)"
            )
        if self.weights == "per-tensor" and self.resolved_engine() == "torchao":
            raise ValueError(
                "weights: per-tensor needs engine: fbgemm (torchao scales int8 weights per channel)"
            )
        return self

    def resolved_engine(self) -> str:
        if self.engine is not None:
            return self.engine
        return "torchao" if self.activations == "per-token" else "fbgemm"

    def table_fields(self) -> dict[str, Any]:
        return {"bits": 8}


class Int8Dynamic(Backend):
    name = "int8-dynamic"
    description = (
        "INT8 weights and dynamic INT8 activations, per token or per tensor, on "
        "torchao or torch.ao's fbgemm kernel."
    )
    Config = Int8DynamicConfig
    extra = "torchao"

    @property
    def _fbgemm(self) -> bool:
        return self.config.resolved_engine() == "fbgemm"

    def check_dependencies(self) -> None:
        if not self._fbgemm:
            _torchao(self.name)

    def check(self, model: nn.Module) -> None:
        quantizable_linears(model, self.config.skip_list())
        if not self._fbgemm:
            _torchao(self.name)
        # meta: a skeleton built from config.json by the checks before any weight is read; the
        # run checks again with the model on its device
        elif next(model.parameters()).device.type not in ("cpu", "meta"):
            raise QuantlabError(
                "engine fbgemm (torch.ao quantize_dynamic) runs on CPU only; use "
                "engine: torchao (activations: per-token) on this device"
            )

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        names = [n for n, _ in target_linears(model, self.config.skip_list())]
        if not self._fbgemm:
            return torchao_quantize(model, set(names), "dynamic", self.name)
        if model.dtype != torch.float32:
            raise QuantlabError("engine fbgemm needs model.dtype: float32")
        return fbgemm_quantize(
            model,
            names,
            self.config.weights == "per-channel",
            per_token=self.config.activations == "per-token",
        )

    def quantized_modules(self, model: nn.Module) -> list[str]:
        if not self._fbgemm:
            return [n for n, m in model.named_modules() if getattr(m, "quantlab_quantized", False)]
        return [n for n, *_ in _fbgemm_modules(model)]

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        if not self._fbgemm:
            skipped = [
                n
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and not getattr(m, "quantlab_quantized", False)
            ]
            return torchao_save(model, out_dir, "dynamic", self.name, skipped)
        return fbgemm_save(
            model,
            out_dir,
            self.config.weights == "per-channel",
            per_token=self.config.activations == "per-token",
        )

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        config = cls.Config(**meta.get("options", {}))
        if config.resolved_engine() == "fbgemm":
            return fbgemm_load(ckpt_dir, meta, dtype, device)
        _torchao(cls.name)
        return transformers_load(ckpt_dir, dtype, device)


class Int8WeightOnlyConfig(BackendConfig):
    skip: list[str] | Literal["auto"] = skip_field()

    def table_fields(self) -> dict[str, Any]:
        return {"bits": 8}


class Int8WeightOnly(Backend):
    name = "int8-weight-only"
    description = "INT8 per-channel weights, float activations (torchao Int8WeightOnlyConfig)."
    Config = Int8WeightOnlyConfig
    extra = "torchao"

    def check_dependencies(self) -> None:
        _torchao(self.name)

    def check(self, model: nn.Module) -> None:
        quantizable_linears(model, self.config.skip_list())
        _torchao(self.name)

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        names = {n for n, _ in target_linears(model, self.config.skip_list())}
        return torchao_quantize(model, names, "weight-only", self.name)

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if getattr(m, "quantlab_quantized", False)]

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        skipped = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not getattr(m, "quantlab_quantized", False)
        ]
        return torchao_save(model, out_dir, "weight-only", self.name, skipped)

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        _torchao(cls.name)
        return transformers_load(ckpt_dir, dtype, device)
