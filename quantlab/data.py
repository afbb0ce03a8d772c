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
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.log import log

PYDOC_SPLITS = ("calibration", "evaluation")
_DIR_FILES = {
    "train": ("train.txt", "wiki.train.tokens"),
    "valid": ("valid.txt", "validation.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}
_SPLIT_ALIASES = {
    "validation": "valid",
    "val": "valid",
    "eval": "test",
    "evaluation": "test",
    "calibration": "train",
}


_HEADING = re.compile(r"^ = [^=].* = \s*$")

#: a text file is read only as far as the tokens a run uses need, at this many bytes per token
#: at most (English is ~4 with the usual tokenizers, code and CJK text more; generous so that
#: a prefix never runs short of tokens)
BYTES_PER_TOKEN = 64
#: the least read of a long file: every text of up to this size reads whole, as it always did
#: (WikiText-2's train split is 11 MB; calibration windows are drawn from the whole of it)
MIN_READ_BYTES = 32 << 20
#: the most read of any file, even of a text used whole (scored without eval.max_windows): a
#: longer one is used up to here, said in the log and in the text's name (~16M tokens: hours
#: of scoring on a CPU, and about a GB while the tokenizer holds them)
MAX_TEXT_BYTES = 64 << 20
_CHUNK = 4 << 20


@dataclass(frozen=True)
class Budget:
    """How much of a text file to read: enough for ``tokens`` (None: not known, or all of the
    text is used), never more than MAX_TEXT_BYTES."""

    tokens: int | None

    @property
    def bytes(self) -> int:
        if self.tokens is None:
            return MAX_TEXT_BYTES
        return min(MAX_TEXT_BYTES, max(MIN_READ_BYTES, self.tokens * BYTES_PER_TOKEN))


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
        text = (
            "".join(self.documents) if self.kind == "wikitext-lines" else "\n".join(self.documents)
        )
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
    return (
        "evaluation"
        if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 4 == 0
        else "calibration"
    )


def pydoc_text(split: str) -> Text:
    """The embedded corpus: Python's reference documentation topics, one part of it."""
    if split not in PYDOC_SPLITS:
        raise QuantlabError(f"pydoc has splits {', '.join(PYDOC_SPLITS)}, not {split!r}")
    from pydoc_data.topics import topics

    unique = list(dict.fromkeys(topics[k] for k in sorted(topics)))  # first name's order
    docs = [t for t in unique if _pydoc_split(t) == split]
    return Text(f"pydoc:{split}", docs)


def _what_is(path: Path) -> str:
    """What a path that is not a regular file is, in words ("a FIFO", "a directory"...)."""
    if path.is_symlink() and not path.exists():
        return f"a symbolic link to '{os.readlink(path)}', which does not exist"
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    what = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"a symbolic link to {what}" if path.is_symlink() else what


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, refused unless it is (or links to) a regular file: checked
    on the opened file itself, and opened without blocking (opening a FIFO blocks until a
    writer comes)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        what = _what_is(path) if path.is_symlink() else "missing"
        raise QuantlabError(f"text file '{path}' is {what}; give a .txt/.jsonl file") from None
    except OSError as e:
        raise QuantlabError(f"text file '{path}' cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QuantlabError(
            f"text file '{path}' is {_what_is(path)}, not a regular file; give a "
            ".txt/.jsonl file (a symbolic link to one is followed)"
        )
    return os.fdopen(fd, "rb")


def _read_prefix(f: BinaryIO, budget: int) -> tuple[bytearray, bool]:
    """At most ``budget`` bytes of ``f``, read into one buffer of the size the file says it
    has (no copy grows past what is kept), and whether the file holds more."""
    raw, n = bytearray(min(budget, os.fstat(f.fileno()).st_size or _CHUNK)), 0
    while n < budget:
        if n == len(raw):  # longer than its size said (growing, or /proc): a chunk more
            raw.extend(bytes(min(_CHUNK, budget - n)))
        with memoryview(raw) as view:
            got = f.readinto(view[n:])
        if not got:
            break
        n += got
    del raw[n:]
    return raw, bool(f.read(1))


def _cut(raw: bytearray, path: Path, whole_lines: bool) -> None:
    """Shorten the prefix of a longer file, in place, to its last complete line (a .jsonl file:
    must), else to its last complete UTF-8 character."""
    end = raw.rfind(b"\n")
    if end >= 0:
        del raw[end + 1 :]
        return
    if whole_lines:
        raise QuantlabError(
            f"'{path}': its first line is longer than the {_size(len(raw))} "
            "quantlab reads of this file; give one document per line"
        )
    start = len(raw)  # of the last character: back over its continuation bytes (10xxxxxx)
    while start > 0 and len(raw) - start < 3 and raw[start - 1] & 0xC0 == 0x80:
        start -= 1
    lead = raw[start - 1] if start else 0
    width = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1
    if width > 1 and len(raw) - (start - 1) < width:
        del raw[start - 1 :]


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _read_text_file(
    path: Path, budget: Budget | None = None, *, whole_lines: bool = False
) -> tuple[str, int | None]:
    """The text of a UTF-8 file, or of its first ``budget.bytes`` when it is longer (said in the
    log). Returns the text and, for a prefix, the bytes it holds (None: the whole file)."""
    budget = budget or Budget(None)
    with _open_regular(path) as f:
        total = os.fstat(f.fileno()).st_size
        raw, more = _read_prefix(f, budget.bytes)
    if b"\x00" in raw[:65536]:
        raise QuantlabError(
            f"text file '{path}' looks binary (it holds NUL bytes); give a UTF-8 text file"
        )
    if more:
        _cut(raw, path, whole_lines)
        why = (
            f"enough for the {budget.tokens} tokens used, at up to {BYTES_PER_TOKEN} bytes each"
            if budget.tokens is not None and budget.bytes < MAX_TEXT_BYTES
            else "the most quantlab reads of a text"
        )
        log(f"text: read the first {_size(len(raw))} of '{path}' ({_size(total)}): {why}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantlabError(
            f"text file '{path}' is not valid UTF-8 (byte {e.start}); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None
    if not text.strip():
        raise QuantlabError(f"text file '{path}' is empty")
    return text, len(raw) if more else None


def _prefix_name(name: str, read: int | None) -> str:
    """A text's name; a prefix says so (its sha256 is of what was read, not of the file)."""
    return name if read is None else f"{name}[:{read} bytes]"


def _jsonl(path: Path, text_field: str, budget: Budget | None = None) -> Text:
    text, read = _read_text_file(path, budget, whole_lines=True)
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantlabError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise QuantlabError(
                f"{path}:{i}: expected an object with a string field '{text_field}'"
            )
        docs.append(row[text_field])
    if not any(d.strip() for d in docs):
        raise QuantlabError(f"'{path}' holds no text in field '{text_field}'")
    return Text(_prefix_name(f"file:{path.name}", read), docs)


def _wikitext_dir(path: Path, split: str, budget: Budget | None = None) -> Text:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _DIR_FILES:
        raise QuantlabError(f"directory sources have splits train, valid, test, not {split!r}")
    for name in _DIR_FILES[split]:
        if (path / name).exists() or (path / name).is_symlink():  # not a regular file: said so
            text, read = _read_text_file(path / name, budget)
            return Text(_prefix_name(f"{path.name}:{split}", read), [text], kind="wikitext")
    if split == "train":  # WikiText copies often ship without train: calibrate on valid
        return _wikitext_dir(path, "valid", budget)
    raise QuantlabError(
        f"directory '{path}' has no {split} file (looked for {', '.join(_DIR_FILES[split])})"
    )


def _wikitext2_hub(split: str) -> Text:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("datasets", "eval", "the 'wikitext2' text source") from None
    hub_split = {"valid": "validation", "calibration": "train", "evaluation": "test"}.get(
        split, split
    )
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    except Exception as e:
        raise QuantlabError(
            f"could not load wikitext2 ({hub_split}) from the Hugging Face Hub: {e}. Offline? "
            "Point 'source' at a local directory with valid.txt/test.txt instead"
        ) from None
    return Text(f"wikitext-2-raw-v1:{hub_split}", list(rows), kind="wikitext-lines")


def load_text(
    source: str,
    split: str | None,
    role: str,
    text_field: str = "text",
    *,
    max_tokens: int | None = None,
) -> Text:
    """Load a text source. ``role`` ('calibration' or 'evaluation') picks the default split.
    ``max_tokens``: the most tokens the caller uses (:func:`tokens_needed`); a longer file is
    read only as far as they need (see :class:`Budget`), and never past MAX_TEXT_BYTES."""
    if role not in PYDOC_SPLITS:
        raise ValueError(role)
    if source == "pydoc":
        return pydoc_text(split or role)
    if source == "wikitext2":
        return _wikitext2_hub(split or ("train" if role == "calibration" else "test"))
    path = Path(source).expanduser()
    budget = Budget(max_tokens)
    if path.is_dir():
        return _wikitext_dir(path, split or ("train" if role == "calibration" else "test"), budget)
    if not path.exists() and not path.is_symlink():
        raise QuantlabError(
            f"text source '{source}' does not exist; use 'pydoc' (embedded), 'wikitext2' "
            "(online), a .txt/.jsonl file or a directory with valid.txt/test.txt"
        )
    if split is not None and path.is_file():
        raise QuantlabError(f"text source '{source}' is a single file; it has no split {split!r}")
    if path.suffix == ".jsonl":
        return _jsonl(path, text_field, budget)
    text, read = _read_text_file(path, budget)  # a link, a FIFO, a device: said what it is
    return Text(_prefix_name(f"file:{path.name}", read), [text])


def tokens_needed(spec) -> int | None:
    """The most tokens of its text a recipe's ``calibration`` or ``eval`` section uses (None:
    all of it): calibration windows, or the windows scored, the speed prompt and the llama.cpp
    engine's chunks. A bound, not an exact count: the file is read with room to spare."""
    if hasattr(spec, "samples"):  # calibration: the sensitivity pass's windows fit MIN_READ_BYTES
        return spec.samples * spec.seq_len
    from quantlab.bench.perplexity import DEFAULT_SEQ_LEN, DEFAULT_STRIDE

    seq = spec.seq_len or DEFAULT_SEQ_LEN.get(spec.convention)  # strided: the model's context
    if spec.convention == "lm-eval" or spec.max_windows is None or seq is None:
        return None
    scored = spec.max_windows * seq
    if spec.convention == "strided":
        scored = (spec.max_windows - 1) * (spec.stride or min(DEFAULT_STRIDE, seq)) + seq
    need = [scored + 1, spec.speed.prompt_tokens]
    if "llamacpp" in spec.engines:
        if spec.llamacpp.chunks is None:
            return None
        need.append(spec.llamacpp.chunks * spec.llamacpp.ctx)
    return max(need)


def load_spec_text(spec, role: str) -> Text:
    """The text of a recipe's ``calibration`` or ``eval`` section, read as far as it is used."""
    return load_text(spec.source, spec.split, role, spec.text_field, max_tokens=tokens_needed(spec))


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
        return {
            "source": self.source,
            "sha256": self.sha256,
            "text_tokens": self.text_tokens,
            "samples": int(self.ids.shape[0]),
            "seq_len": int(self.ids.shape[1]),
            "seed": self.seed,
            "starts": self.starts,
        }


def sample_calibration(
    ids: torch.Tensor, text: Text, samples: int, seq_len: int, seed: int
) -> Calibration:
    """Draw ``samples`` windows of ``seq_len`` tokens at uniformly random offsets (seeded)."""
    n = ids.numel()
    if n < seq_len:
        raise QuantlabError(
            f"calibration text '{text.name}' has {n} tokens, fewer than "
            f"calibration.seq_len={seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return Calibration(windows, text.name, text.sha256, n, seed, starts.tolist())
