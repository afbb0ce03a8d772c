"""Architecture knowledge as data: where the decoder layers are, in which order their linear
layers see data (for true-sequential GPTQ), and which operation feeds which linears (for
AWQ's scale folding). Unknown architectures fall back to a generic description: every
linear of a layer in one group, and no AWQ folding (AWQ then refuses with a clear error)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the operation that produces that input.

    AWQ multiplies the linears' input columns by s and divides ``prev``'s output by s
    (an RMSNorm weight, or the output rows of a preceding linear), leaving the function of
    the float model unchanged."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # groups of linears, in the order they see data
    scale_groups: tuple[ScaleGroup, ...] = field(default=())
    #: (norm1, attention, its output linear, norm2, mlp, its output linear) of a pre-norm
    #: layer: out = h2 + mlp(norm2(h2)) with h2 = h + attention(norm1(h)). Lets calibration
    #: run each stage of a layer once.
    prenorm: tuple[str, str, str, str, str, str] | None = None


_LLAMA = ArchSpec(
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # v_proj -> o_proj only when their widths match (no grouped-query attention)
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    prenorm=(
        "input_layernorm",
        "self_attn",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp",
        "mlp.down_proj",
    ),
)

ARCHS: dict[str, ArchSpec] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model``'s architecture, or a generic one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return ArchSpec(layers=name, sequential=())
    return ArchSpec(layers="", sequential=())


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    from quantlab.errors import QuantlabError

    if not spec.layers:
        raise QuantlabError(
            f"cannot find the decoder layers of a '{type(model).__name__}'; "
            f"known architectures: {', '.join(sorted(ARCHS))}"
        )
    return model.get_submodule(spec.layers)
