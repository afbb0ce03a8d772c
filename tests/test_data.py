"""Text sources and calibration sampling."""

import json

import pytest
import torch
from conftest import WIKITEXT

from quantlab.data import load_text, pydoc_text, sample_calibration
from quantlab.errors import QuantlabError


def test_pydoc_split_is_deterministic_disjoint_and_complete():
    from pydoc_data.topics import topics

    cal, ev = pydoc_text("calibration"), pydoc_text("evaluation")
    assert set(cal.documents).isdisjoint(ev.documents)
    assert len(cal.documents) + len(ev.documents) == len(set(topics.values()))
    assert 0.15 < len(ev.joined()) / (len(ev.joined()) + len(cal.joined())) < 0.4
    assert pydoc_text("evaluation").sha256 == ev.sha256
    # the roles pick the parts by default
    assert load_text("pydoc", None, "evaluation").name == "pydoc:evaluation"
    assert load_text("pydoc", None, "calibration").name == "pydoc:calibration"
    with pytest.raises(QuantlabError, match="splits"):
        load_text("pydoc", "test", "evaluation")


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n\nsecond paragraph")
    assert load_text(str(tmp_path / "a.txt"), None, "evaluation").documents == [
        "hello world\n\nsecond paragraph"
    ]
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
    )
    assert load_text(str(tmp_path / "a.jsonl"), None, "calibration").documents == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(
        QuantlabError, match=r"b.jsonl:2: expected an object with a string field 'text'"
    ):
        load_text(str(tmp_path / "b.jsonl"), None, "calibration")


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "is empty"),
        (b"  \n\n ", "is empty"),
        (b"\x00\x01\x02abc", "binary"),
        (b"caf\xe9 latin-1", "not valid UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, content, needle):
    p = tmp_path / "t.txt"
    p.write_bytes(content)
    with pytest.raises(QuantlabError, match=needle):
        load_text(str(p), None, "evaluation")


def test_missing_source_and_split_on_file(tmp_path):
    with pytest.raises(QuantlabError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"), None, "evaluation")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(QuantlabError, match="no split"):
        load_text(str(tmp_path / "a.txt"), "test", "evaluation")


def test_wikitext_style_directory(tmp_path):
    (tmp_path / "valid.txt").write_text("valid text")
    (tmp_path / "test.txt").write_text("test text")
    assert load_text(str(tmp_path), None, "evaluation").documents == ["test text"]
    # no train.txt: calibration falls back to valid
    assert load_text(str(tmp_path), None, "calibration").documents == ["valid text"]
    assert load_text(str(tmp_path), "validation", "evaluation").documents == ["valid text"]
    (tmp_path / "test.txt").unlink()
    with pytest.raises(QuantlabError, match="no test file"):
        load_text(str(tmp_path), None, "evaluation")


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"shared WikiText-2 copy not found at {WIKITEXT}")
def test_shared_wikitext2_directory():
    t = load_text(str(WIKITEXT), None, "evaluation")
    assert t.name == "wikitext-2:test" and " = Robert <unk> = " in t.documents[0]


def test_calibration_sampling_is_seeded_and_recorded(tiny):
    _, tok = tiny
    text = pydoc_text("calibration")
    ids = torch.arange(1000)
    a = sample_calibration(ids, text, samples=5, seq_len=16, seed=3)
    b = sample_calibration(ids, text, samples=5, seq_len=16, seed=3)
    c = sample_calibration(ids, text, samples=5, seq_len=16, seed=4)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (5, 16)
    for row, s in zip(a.ids, a.record()["starts"]):
        assert torch.equal(row, ids[s : s + 16])
    with pytest.raises(QuantlabError, match="fewer than calibration.seq_len=2000"):
        sample_calibration(ids, text, samples=1, seq_len=2000, seed=0)


# --------------------------------------------------------------------------- long texts (issue 26)


def _long_text(path, at_least: int, sparse_to: int | None = None):
    """A real text file of ``at_least`` bytes (Python's docs repeated), optionally extended with
    a hole to ``sparse_to`` bytes (a large file that costs no disk)."""
    block = pydoc_text("evaluation").joined().encode() + b"\n\n"
    with open(path, "wb") as f:
        for _ in range(at_least // len(block) + 1):
            f.write(block)
        if sparse_to:
            f.truncate(sparse_to)
    return path


def test_a_2_gib_text_is_read_as_far_as_needed_not_whole(tmp_path):
    """It was read whole: a MemoryError under a 3 GB limit, at validate already."""
    import resource
    import subprocess
    import sys

    text = _long_text(tmp_path / "big.txt", 65 << 20, sparse_to=2 << 30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"methods: [{{backend: rtn, options: {{group_size: 64}}}}]\n"
        f"eval: {{source: {text}, max_windows: 8, seq_len: 512}}\n"
    )

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "quantlab", "validate", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 8 windows of 512 tokens need far less than the smallest budget: 32 MiB are read
    assert f"text: read the first 32.0 MiB of '{text}' (2.0 GiB)" in proc.stderr


def test_a_long_text_is_read_for_the_tokens_used_and_named_and_hashed_as_read(tmp_path, capsys):
    import hashlib
    import tracemalloc

    from quantlab.data import MIN_READ_BYTES, load_spec_text
    from quantlab.recipe import parse_recipe

    path = _long_text(tmp_path / "long.txt", MIN_READ_BYTES + (4 << 20))
    recipe = parse_recipe(
        {"methods": [{"backend": "rtn"}], "eval": {"source": str(path), "max_windows": 8}}
    )
    tracemalloc.start()
    try:
        text = load_spec_text(recipe.eval, "evaluation")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    read = len(text.documents[0].encode())
    assert text.name == f"file:long.txt[:{read} bytes]"
    assert MIN_READ_BYTES - 65536 < read <= MIN_READ_BYTES
    assert text.documents[0].endswith("\n")  # cut after a whole line
    with open(path, "rb") as f:
        assert text.sha256 == hashlib.sha256(f.read(read)).hexdigest()  # the digest of what is used
    assert peak < 6 * MIN_READ_BYTES  # the text and the decoder's copies, not the file
    assert "text: read the first 32.0 MiB of" in capsys.readouterr().err
    # a text that fits is read whole, named and hashed as it always was
    small = tmp_path / "small.txt"
    small.write_bytes(path.read_bytes()[:100_000])
    whole = load_spec_text(recipe.eval.model_copy(update={"source": str(small)}), "evaluation")
    assert whole.name == "file:small.txt"
    assert whole.sha256 == hashlib.sha256(small.read_bytes()).hexdigest()


def test_a_prefix_ends_on_a_whole_line_or_character(tmp_path, monkeypatch):
    import quantlab.data as data

    monkeypatch.setattr(data, "MIN_READ_BYTES", 1000)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} é"}) + "\n" for i in range(500)))
    text = load_text(str(rows), None, "calibration", max_tokens=1)
    assert 0 < len(text.documents) < 500 and text.documents[-1].startswith("row ")  # no half row
    assert text.name.startswith("file:rows.jsonl[:")
    one_line = tmp_path / "one.txt"
    one_line.write_text("é" * 5000)  # 2 bytes per character, no newline: cut inside one
    assert load_text(str(one_line), None, "evaluation", max_tokens=1).documents == ["é" * 500]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "x" * 5000}) + "\n")
    with pytest.raises(QuantlabError, match=r"first line is longer than the 0.0 MiB quantlab"):
        load_text(str(tmp_path / "long.jsonl"), None, "calibration", max_tokens=1)


@pytest.mark.parametrize(
    ("section", "tokens"),
    [
        ({"calibration": {"samples": 16, "seq_len": 256}}, ("calibration", 16 * 256)),
        ({"eval": {"max_windows": 4, "seq_len": 128}}, ("eval", 4 * 128 + 1)),
        ({"eval": {"max_windows": 4}}, ("eval", 4 * 2048 + 1)),  # gptq's default window
        (
            {"eval": {"convention": "strided", "max_windows": 3, "seq_len": 256, "stride": 64}},
            ("eval", 2 * 64 + 256 + 1),
        ),
        ({"eval": {"max_windows": 1, "seq_len": 8}}, ("eval", 64)),  # the speed prompt
        ({"eval": {}}, ("eval", None)),  # every window
        ({"eval": {"convention": "lm-eval"}}, ("eval", None)),
        (
            {"eval": {"convention": "strided", "max_windows": 3}},
            ("eval", None),
        ),  # the model's context
        (
            {
                "eval": {"max_windows": 2, "seq_len": 64, "engines": ["torch", "llamacpp"]},
                "methods": [{"backend": "rtn", "export": ["native", "gguf"]}],
            },
            ("eval", None),
        ),
        (
            {
                "eval": {
                    "max_windows": 2,
                    "seq_len": 64,
                    "engines": ["torch", "llamacpp"],
                    "llamacpp": {"chunks": 5},
                },
                "methods": [{"backend": "rtn", "export": ["native", "gguf"]}],
            },
            ("eval", 5 * 512),
        ),
    ],
)
def test_the_tokens_a_section_uses(section, tokens):
    from quantlab.data import tokens_needed
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe({"methods": [{"backend": "rtn"}], **section})
    assert tokens_needed(getattr(recipe, tokens[0])) == tokens[1]


def test_links_fifos_and_devices_are_said_what_they_are(tmp_path):
    """A link is followed when it points to a regular file; anything else is named, not
    reported as missing (a FIFO in a WikiText directory was "no test file")."""
    import os

    (tmp_path / "real.txt").write_text("hello world")
    (tmp_path / "link.txt").symlink_to("real.txt")
    assert load_text(str(tmp_path / "link.txt"), None, "evaluation").documents == ["hello world"]
    (tmp_path / "dangling.txt").symlink_to("nowhere.txt")
    dangling = r"'.*dangling.txt' is a symbolic link to 'nowhere.txt', which does not exist"
    with pytest.raises(QuantlabError, match=dangling):
        load_text(str(tmp_path / "dangling.txt"), None, "evaluation")
    os.mkfifo(tmp_path / "fifo.txt")
    fifo = r"is a FIFO \(named pipe\), not a regular file"
    with pytest.raises(QuantlabError, match=r"'.*fifo.txt' " + fifo):
        load_text(str(tmp_path / "fifo.txt"), None, "evaluation")  # and does not block on the pipe
    (tmp_path / "to-fifo.txt").symlink_to("fifo.txt")
    with pytest.raises(QuantlabError, match=r"is a symbolic link to a FIFO \(named pipe\), not a"):
        load_text(str(tmp_path / "to-fifo.txt"), None, "evaluation")
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    os.mkfifo(wiki / "test.txt")
    with pytest.raises(QuantlabError, match=r"'.*wiki/test.txt' " + fifo):
        load_text(str(wiki), None, "evaluation")
    with pytest.raises(QuantlabError, match=r"'/dev/zero' is a character device, not a regular"):
        load_text("/dev/zero", None, "evaluation")
