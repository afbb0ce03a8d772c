"""How a model is scored on a text: one spec for ``quantlab run`` and ``quantlab eval``.

A recipe's ``eval`` block is a :class:`ScoringSpec` (it adds the text, divergence, speed and
engines); ``quantlab eval`` and :func:`quantlab.evaluate` build one from their flags or
arguments with :meth:`ScoringSpec.checked`. So each default (the convention, the window
length, the batch size, the kernel) and each applicability rule ("stride applies to the
strided convention") has one home, here, and the two commands cannot drift apart. The rules
speak the caller's language: a recipe's keys, the command's flags or the function's
arguments.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from quantlab.errors import QuantlabError
from quantlab.formats.kernels import DEFAULT_KERNEL

CONVENTIONS = ("gptq", "llamacpp", "strided", "lm-eval")


class ScoringSpec(BaseModel):
    """The perplexity convention, its windows, and what runs the reloaded model's layers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    convention: Literal["gptq", "llamacpp", "strided", "lm-eval"] = Field(
        "gptq",
        description="Perplexity convention. 'gptq': the GPTQ/AWQ papers (non-overlapping "
        "windows over the text joined with blank lines, remainder dropped); 'llamacpp': "
        "llama-perplexity (BOS-led chunks, second half scored, ± stderr); 'strided': the "
        "transformers docs' sliding window; 'lm-eval': lm-evaluation-harness rolling "
        "log-likelihood per document, reported as word perplexity (docs/results.md, 'Perplexity').",
    )
    seq_len: int | None = Field(
        None,
        ge=8,
        le=1_000_000,
        description="Window length in tokens "
        "(llamacpp: ctx). None: gptq 2048, llamacpp 512, strided and "
        "lm-eval the model's context.",
    )
    stride: int | None = Field(
        None, ge=1, description="strided: tokens between window starts (default 512)."
    )
    bos: bool | None = Field(
        None,
        description="llamacpp: BOS on every chunk. None: when the "
        "tokenizer adds BOS to a text (as llama.cpp decides).",
    )
    max_windows: int | None = Field(
        None, ge=1, description="Score only the first N windows (None: all)."
    )
    batch_size: int = Field(
        4,
        ge=1,
        description="Windows per forward pass (windows longer than "
        "512 tokens: as many as fit in batch_size x 512 tokens).",
    )
    kernel: Literal["auto", "dense", "int4pack", "int8pack"] = Field(
        DEFAULT_KERNEL,
        description="What executes the packed layers of quantlab's layouts (GPTQ "
        "v1, AWQ gemm) when a checkpoint is reloaded, for scoring and speed: 'dense' "
        "(dequantized once, float matmul), 'int4pack' / 'int8pack' (torch's kernels reading "
        "packed weights, bfloat16 activations), 'auto' (times them per layer shape, keeps a "
        'kernel only for the token counts where it beat dense). docs/results.md, "Kernels".',
    )

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo) -> ScoringSpec:
        """Every option set applies to the others: a value that would be ignored is refused."""
        say = _Speaker((info.context or {}).get("spell", "recipe"))
        if self.stride is not None and self.convention != "strided":
            raise ValueError(say.applies("stride", "strided", self.convention))
        if self.bos is not None and self.convention != "llamacpp":
            raise ValueError(say.applies("bos", "llamacpp", self.convention))
        if self.max_windows is not None and self.convention == "lm-eval":
            raise ValueError(
                f"{say('max_windows')} does not apply to the lm-eval convention (it "
                "scores whole documents); use a smaller text instead"
            )
        if self.stride is not None and self.seq_len is not None and self.stride > self.seq_len:
            raise ValueError(
                f"{say('stride')} ({self.stride}) must not exceed {say('seq_len')} ({self.seq_len})"
            )
        return self

    @classmethod
    def checked(cls, spell: Literal["cli", "api"], **values: Any) -> ScoringSpec:
        """The spec of ``quantlab eval``'s flags (``spell="cli"``) or :func:`quantlab.evaluate`'s
        arguments (``"api"``); a value out of range or an option that does not apply is one
        :class:`QuantlabError` in that caller's words. ``None`` means the default."""
        given = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(given, context={"spell": spell})
        except ValidationError as e:
            err = e.errors()[0]
            where = _Speaker(spell)(str(err["loc"][0])) if err["loc"] else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise QuantlabError(
                f"{where}: {msg}" if where and err["type"] != "value_error" else msg
            ) from None


def defaults() -> dict[str, Any]:
    """Each option's default, for the command line's help and the function's signature."""
    return {k: f.default for k, f in ScoringSpec.model_fields.items()}


class _Speaker:
    """An option's name as the caller spells it: a recipe key, a flag, an argument."""

    def __init__(self, spell: str):
        self.spell = spell

    def __call__(self, name: str) -> str:
        return "--" + name.replace("_", "-") if self.spell == "cli" else name

    def applies(self, name: str, convention: str, chosen: str) -> str:
        fix = {
            "cli": f"add --convention {convention}",
            "api": f"pass convention={convention!r}",
        }.get(self.spell, f"set convention: {convention}")
        return (
            f"{self(name)} applies to the {convention} convention, not {chosen!r}; "
            f"{fix} or drop {self(name)}"
        )
