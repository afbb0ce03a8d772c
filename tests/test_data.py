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
    assert load_text(str(tmp_path / "a.txt"), None, "evaluation").documents == ["hello world\n\nsecond paragraph"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "a.jsonl"), None, "calibration").documents == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(QuantlabError, match=r"b.jsonl:2: expected an object with a string field 'text'"):
        load_text(str(tmp_path / "b.jsonl"), None, "calibration")


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"), (b"  \n\n ", "is empty"), (b"\x00\x01\x02abc", "binary"),
    (b"caf\xe9 latin-1", "not valid UTF-8"),
])
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
