"""The cards a run can be projected onto: datasheet figures, each with its source, and users'
own cards from a YAML or JSON file (``quantlab hardware RUN --cards FILE``).

Spec tables in circulation disagree with each other; every figure here is the vendor's own.
Vendors print tensor throughput "with sparsity" (2:4 structured); dense figures, which
inference uses, are half of those. Memory sizes are the datasheets' "GB", which are binary:
nvidia-smi reports 24564 MiB on a 24 GB RTX 4090 and 143771 MiB on a 141 GB H200, so
capacities are taken as GiB. Bandwidths are decimal (GB/s = 1e9 bytes/s), as vendors compute them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantlab.errors import QuantlabError, did_you_mean

GIB, GB, TERA = 1 << 30, 1e9, 1e12


@dataclass(frozen=True)
class Card:
    """One accelerator (or this machine's CPU) as the projection sees it."""

    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    #: dense 16-bit tensor throughput (FLOP/s); for a CPU, its measured float32 matmul rate
    dense_flops: float
    int8_ops: float | None = None
    fp8_flops: float | None = None
    kind: str = "gpu"
    cores: int | None = None
    #: where each figure comes from: figure name -> document
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    #: how the figures were read off the documents
    note: str = ""

    def peak(self, compute: str) -> float:
        """The throughput a row's matmuls run at: int8 or fp8 where the row computes in them
        and the card has them, else the 16-bit rate."""
        special = {"int8": self.int8_ops, "fp8": self.fp8_flops}.get(compute)
        return special or self.dense_flops

    def summary(self) -> str:
        if self.kind == "cpu":
            compute = f"{self.dense_flops / 1e9:,.0f} GFLOPS float32 matmul, {self.cores} cores"
        else:
            extra = (("int8 TOPS", self.int8_ops), ("fp8 TFLOPS", self.fp8_flops))
            compute = f"{self.dense_flops / TERA:,.1f} dense 16-bit TFLOPS" + "".join(
                f", {v / TERA:,.1f} {what}" for what, v in extra if v
            )
        return (
            f"{self.name}: {self.memory_bytes / GIB:.0f} GiB, "
            f"{self.bandwidth_bytes_per_s / GB:,.0f} GB/s, {compute}"
        )

    def source_line(self) -> str:
        """Which document each figure comes from, grouped by document."""
        by_doc: dict[str, list[str]] = {}
        for figure, doc in self.sources.items():
            by_doc.setdefault(doc, []).append(figure)
        line = "; ".join(f"{', '.join(figs)}: {doc}" for doc, figs in by_doc.items())
        return line + (f" ({self.note})" if self.note else "")


_A100 = (
    "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web), "
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
_H100 = (
    "NVIDIA H100 Tensor Core GPU datasheet, "
    "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
)
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/"
_ADA = (
    "NVIDIA Ada GPU Architecture whitepaper v2.01, appendix A, GeForce RTX 4090 column, "
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
)


def _datasheet(
    name: str,
    source: str,
    memory_gb: int,
    bandwidth_gb_s: float,
    tflops: float,
    int8_tops: float | None,
    fp8_tflops: float | None,
    note: str,
) -> Card:
    figures = ["memory", "bandwidth", "dense_flops"]
    figures += ["int8_ops"] * bool(int8_tops) + ["fp8_flops"] * bool(fp8_tflops)
    return Card(
        name,
        memory_gb * GIB,
        bandwidth_gb_s * GB,
        tflops * TERA,
        int8_tops * TERA if int8_tops else None,
        fp8_tflops * TERA if fp8_tflops else None,
        sources=dict.fromkeys(figures, source),
        note=f"{memory_gb} GB read as GiB; {note}",
    )


_SPARSE = "tensor throughputs dense: the datasheet's sparse figures / 2"
#: the built-in cards; each figure cites its datasheet
CARDS: tuple[Card, ...] = (
    # GeForce tensor cores run 16-bit inputs with FP32 accumulation (what engines use) at half
    # the FP16-accumulate rate: 165.2, not 330.3
    _datasheet(
        "RTX 4090",
        _ADA,
        24,
        1008,
        165.2,
        660.6,
        330.3,
        "16-bit: BF16 tensor with FP32 accumulate, dense; fp8 with FP32 accumulate",
    ),
    _datasheet("A100 40GB SXM", _A100, 40, 1555, 312, 624, None, _SPARSE),
    _datasheet("A100 80GB SXM", _A100, 80, 2039, 312, 624, None, _SPARSE),
    _datasheet("H100 SXM", _H100, 80, 3350, 989.5, 1979, 1979, _SPARSE),
    # the PCIe card's column is in the datasheet's 2022 edition (later editions list H100 NVL)
    _datasheet("H100 PCIe", _H100 + " (2022 edition)", 80, 2000, 756.5, 1513, 1513, _SPARSE),
    _datasheet("H200 SXM", _H200, 141, 4800, 989.5, 1979, 1979, _SPARSE),
)


def _key(name: str) -> str:
    """Names compare without case, spaces, dashes or underscores: 'h100-sxm' is 'H100 SXM'."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def find_card(name: str, cards: list[Card] | tuple[Card, ...]) -> Card:
    """The card called ``name``, or an error listing the known ones."""
    by_key = {_key(c.name): c for c in cards}
    if _key(name) in by_key:
        return by_key[_key(name)]
    # 'a100' names two cards: list both; else the closest spelling
    close = [k for k in by_key if _key(name) and _key(name) in k] or difflib.get_close_matches(
        _key(name), list(by_key), n=1, cutoff=0.6
    )
    hint = f" (did you mean {' or '.join(repr(by_key[k].name) for k in close)}?)" if close else ""
    known = ", ".join(f"'{c.name}'" for c in cards)
    raise QuantlabError(
        f"unknown card '{name}'{hint}; known cards: {known} (add your own with --cards FILE)"
    )


class CardSpec(BaseModel):
    """One card in a user's cards file: figures in the units datasheets print."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    memory_gib: float = Field(gt=0, description="device memory, GiB (what nvidia-smi shows / 1024)")
    bandwidth_gb_s: float = Field(gt=0, description="memory bandwidth, GB/s (1e9 bytes/s)")
    dense_tflops: float = Field(gt=0, description="dense 16-bit tensor TFLOPS (no sparsity)")
    int8_tops: float | None = Field(None, gt=0)
    fp8_tflops: float | None = Field(None, gt=0)
    source: str = Field(min_length=1, description="where the figures come from (datasheet, URL)")

    def card(self) -> Card:
        return Card(
            self.name,
            int(self.memory_gib * GIB),
            self.bandwidth_gb_s * GB,
            self.dense_tflops * TERA,
            self.int8_tops * TERA if self.int8_tops else None,
            self.fp8_tflops * TERA if self.fp8_tflops else None,
            sources=dict.fromkeys(("memory", "bandwidth", "dense_flops"), self.source),
            note="from the user's cards file",
        )


def _problem(err: dict) -> str:
    where = "".join(f".{p}" for p in err["loc"])
    if err["type"] == "extra_forbidden":
        leaf = str(err["loc"][-1])
        return f"{where}: unknown key{did_you_mean(leaf, list(CardSpec.model_fields))}"
    return f"{where}: {err['msg']}"


def load_cards(path: str | Path, builtin: tuple[Card, ...] = CARDS) -> list[Card]:
    """The cards of a YAML or JSON file (``cards: [{name, memory_gib, bandwidth_gb_s,
    dense_tflops, source, ...}]``), validated: one error naming every problem."""
    import yaml  # reads JSON too

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise QuantlabError(f"cards file '{path}' cannot be read ({type(e).__name__})") from None
    items = doc.get("cards") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise QuantlabError(
            f"cards file '{path}' holds no cards: expected 'cards:' with a list of cards"
        )
    problems, cards = [], []
    for i, item in enumerate(items):
        try:
            cards.append(CardSpec.model_validate(item).card())
        except ValidationError as e:
            problems += [f"cards[{i}]{_problem(err)}" for err in e.errors()]
    taken = {_key(c.name) for c in builtin}
    problems += [
        f"'{c.name}' is a built-in card; give yours another name"
        for c in cards
        if _key(c.name) in taken
    ]
    if problems:
        raise QuantlabError(f"cards file '{path}': " + "; ".join(problems))
    return cards
