"""Text sources for calibration and evaluation, and seeded calibration sampling.

Sources (the ``source`` key of ``calibration``/``eval`` in a recipe):

- ``pydoc`` -- embedded, offline: Python's reference documentation shipped in the standard
  library (``pydoc_data.topics``). Distinct topic texts (some topic names share one text)
  are split deterministically by a hash of their content: a text is in the ``evaluation``
  part when sha256(text) % 4 == 0 (about 23% of the characters), otherwise in the
  ``calibration`` part, so the two never overlap.
- a ``.txt`` file (one document) or a ``.jsonl`` file (one document per line, field
  ``text_field``);
- a directory with WikiText-style files ``train.txt``/``valid.txt``/``test.txt`` (or
  ``wiki.{split}.tokens``);
- ``wikitext2`` -- WikiText-2 (raw, v1) through ``datasets`` from the Hugging Face Hub
  (online only; rows kept as documents, as the GPTQ reference code does).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantlab.errors import MissingDependencyError, QuantlabError

PYDOC_SPLITS = ("calibration", "evaluation")
_DIR_FILES = {
    "train": ("train.txt", "wiki.train.tokens"),
    "valid": ("valid.txt", "validation.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "eval": "test", "evaluation": "test",
                  "calibration": "train"}


_HEADING = re.compile(r"^ = [^=].* = \s*$")


@dataclass(frozen=True)
class Text:
    """A named list of documents. ``name`` says where it came from (e.g. ``pydoc:evaluation``)."""

    name: str
    documents: list[str] = field(repr=False)
    kind: str = "documents"  # "wikitext": one file of many articles; "wikitext-lines": Hub rows

    def articles(self) -> list[str]:
        """Documents for document-level scoring (the lm-eval convention). WikiText files
        and rows are split into articles at their top-level headings (" = Title = "), as
        lm-eval's document-level WikiText is; other sources keep their documents."""
        if self.kind == "documents":
            return list(self.documents)
        text = "".join(self.documents) if self.kind == "wikitext-lines" else "\n".join(self.documents)
        out: list[list[str]] = []
        for line in text.splitlines(keepends=True):
            if _HEADING.match(line) and out and "".join(out[-1]).strip():
                out.append([])
            if not out:
                out.append([])
            out[-1].append(line)
        return ["".join(a) for a in out if "".join(a).strip()]

    def joined(self, sep: str = "\n\n") -> str:
        return sep.join(self.documents)

    @property
    def sha256(self) -> str:
        """sha256 of the documents joined with blank lines (what the gptq convention scores)."""
        return hashlib.sha256(self.joined().encode("utf-8")).hexdigest()


def _pydoc_split(text: str) -> str:
    return "evaluation" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 4 == 0 else "calibration"


def pydoc_text(split: str) -> Text:
    """The embedded corpus: Python's reference documentation topics, one part of it."""
    if split not in PYDOC_SPLITS:
        raise QuantlabError(f"pydoc has splits {', '.join(PYDOC_SPLITS)}, not {split!r}")
    from pydoc_data.topics import topics

    unique = list(dict.fromkeys(topics[k] for k in sorted(topics)))  # first name's order
    docs = [t for t in unique if _pydoc_split(t) == split]
    return Text(f"pydoc:{split}", docs)


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise QuantlabError(f"text file '{path}' looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantlabError(f"text file '{path}' is not valid UTF-8 (byte {e.start}); "
                            "convert it, e.g. with iconv -t UTF-8") from None
    if not text.strip():
        raise QuantlabError(f"text file '{path}' is empty")
    return text


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantlabError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise QuantlabError(f"{path}:{i}: expected an object with a string field '{text_field}'")
        docs.append(row[text_field])
    if not any(d.strip() for d in docs):
        raise QuantlabError(f"'{path}' holds no text in field '{text_field}'")
    return docs


def _wikitext_dir(path: Path, split: str) -> Text:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _DIR_FILES:
        raise QuantlabError(f"directory sources have splits train, valid, test, not {split!r}")
    for name in _DIR_FILES[split]:
        if (path / name).is_file():
            return Text(f"{path.name}:{split}", [_read_text_file(path / name)], kind="wikitext")
    if split == "train":  # WikiText copies often ship without train: calibrate on valid
        return _wikitext_dir(path, "valid")
    raise QuantlabError(f"directory '{path}' has no {split} file (looked for {', '.join(_DIR_FILES[split])})")


def _wikitext2_hub(split: str) -> Text:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("datasets", "eval", "the 'wikitext2' text source") from None
    hub_split = {"valid": "validation", "calibration": "train", "evaluation": "test"}.get(split, split)
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    except Exception as e:
        raise QuantlabError(
            f"could not load wikitext2 ({hub_split}) from the Hugging Face Hub: {e}. Offline? "
            "Point 'source' at a local directory with valid.txt/test.txt instead") from None
    return Text(f"wikitext-2-raw-v1:{hub_split}", list(rows), kind="wikitext-lines")


def load_text(source: str, split: str | None, role: str, text_field: str = "text") -> Text:
    """Load a text source. ``role`` ('calibration' or 'evaluation') picks the default split."""
    if role not in PYDOC_SPLITS:
        raise ValueError(role)
    if source == "pydoc":
        return pydoc_text(split or role)
    if source == "wikitext2":
        return _wikitext2_hub(split or ("train" if role == "calibration" else "test"))
    path = Path(source).expanduser()
    if path.is_dir():
        return _wikitext_dir(path, split or ("train" if role == "calibration" else "test"))
    if not path.exists():
        raise QuantlabError(
            f"text source '{source}' does not exist; use 'pydoc' (embedded), 'wikitext2' "
            "(online), a .txt/.jsonl file or a directory with valid.txt/test.txt")
    if not path.is_file():  # a device or FIFO (/dev/zero) would be read forever
        raise QuantlabError(f"text source '{source}' is not a regular file; give a .txt/.jsonl file or a directory")
    if split is not None:
        raise QuantlabError(f"text source '{source}' is a single file; it has no split {split!r}")
    if path.suffix == ".jsonl":
        return Text(f"file:{path.name}", _jsonl(path, text_field))
    return Text(f"file:{path.name}", [_read_text_file(path)])


def tokenize(text: Text, tokenizer) -> torch.Tensor:
    """Token ids [N] of the documents joined with blank lines, tokenized once (the GPTQ
    reference: ``tokenizer("\\n\\n".join(docs))``, special tokens as the tokenizer adds them)."""
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)  # silence the "longer than max length" warning
        ids = tokenizer(text.joined(), return_tensors="pt").input_ids[0]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return ids


@dataclass(frozen=True)
class Calibration:
    """Calibration windows and how they were drawn (recorded in the run directory)."""

    ids: torch.Tensor  # [samples, seq_len]
    source: str
    sha256: str
    text_tokens: int
    seed: int
    starts: list[int]

    def record(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "text_tokens": self.text_tokens,
                "samples": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                "seed": self.seed, "starts": self.starts}


def sample_calibration(ids: torch.Tensor, text: Text, samples: int, seq_len: int, seed: int) -> Calibration:
    """Draw ``samples`` windows of ``seq_len`` tokens at uniformly random offsets (seeded)."""
    n = ids.numel()
    if n < seq_len:
        raise QuantlabError(
            f"calibration text '{text.name}' has {n} tokens, fewer than calibration.seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return Calibration(windows, text.name, text.sha256, n, seed, starts.tolist())
