"""Divergence statistics: stored base distributions against a direct float64 computation."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from quantlab.bench.divergence import DivergenceStats, ReferenceLogprobs, check_distinct
from quantlab.bench.perplexity import IGNORE, make_plan
from quantlab.data import pydoc_text, tokenize
from quantlab.errors import QuantlabError
from quantlab.scoring import compute_reference, evaluate, plan_key


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = tiny
    ids = tokenize(pydoc_text("evaluation"), tok)[:1200]
    plan = make_plan("gptq", ids=ids, tokenizer=tok, seq_len=100)
    noisy = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, noisy, plan


def _direct(model, noisy, plan, n_windows):
    """KL(P||Q) per token in float64, top-1 agreement and Δp, window by window."""
    kl, same, dp = [], [], []
    for s in plan.segments[:n_windows]:
        with torch.no_grad():
            lp = torch.log_softmax(model(s.input_ids[None]).logits[0].double(), -1)
            lq = torch.log_softmax(noisy(s.input_ids[None]).logits[0].double(), -1)
        m = s.targets != IGNORE
        lp, lq, t = lp[m], lq[m], s.targets[m]
        kl.append((lp.exp() * (lp - lq)).sum(-1))
        same.append(lp.argmax(-1) == lq.argmax(-1))
        dp.append(lq.gather(1, t[:, None])[:, 0].exp() - lp.gather(1, t[:, None])[:, 0].exp())
    return torch.cat(kl), torch.cat(same).double(), torch.cat(dp)


def test_stored_reference_gives_the_direct_divergence(setup, tmp_path):
    model, noisy, plan = setup
    part = plan.head(4)
    ref = compute_reference(
        model, part, tmp_path / "ref", 3, plan_key(part, pydoc_text("evaluation"), {})
    )
    assert ref.n_tokens == 4 * 99
    # the candidate is scored on the WHOLE plan; divergence covers the reference's windows
    ppl, div = evaluate(noisy, plan, 3, ref)
    assert ppl.scored_tokens == plan.scored_tokens > ref.n_tokens
    kl, same, dp = _direct(model, noisy, plan, 4)
    assert div["kld_tokens"] == kl.numel()
    assert div["kld_mean"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert div["kld_median"] == pytest.approx(float(kl.median()), rel=1e-2)
    assert div["top1_agreement"] == pytest.approx(float(same.mean()), abs=1.5 / kl.numel())
    assert div["dp_mean"] == pytest.approx(float(dp.mean()), abs=1e-6)
    assert div["dp_rms"] == pytest.approx(float(dp.pow(2).mean().sqrt()), rel=1e-5)
    assert 0 < div["kld_mean"] and div["kld_p99"] <= div["kld_max"]


def test_a_model_against_its_own_stored_reference_is_zero(setup, tmp_path):
    model, _, plan = setup
    part = plan.head(3)
    ref = compute_reference(model, part, tmp_path / "ref", 3, "k")
    same_weights = copy.deepcopy(model)  # a different object with equal weights
    _, div = evaluate(same_weights, part, 3, ref)
    assert div["kld_mean"] < 1e-6 and div["top1_agreement"] == 1.0 and abs(div["dp_mean"]) < 1e-6


def test_reference_is_reused_by_key_and_only_when_finished(setup, tmp_path):
    model, _, plan = setup
    part = plan.head(2)
    ref = compute_reference(model, part, tmp_path / "ref", 2, "key-1")
    stamp = (tmp_path / "ref" / "logprobs.u16").stat().st_mtime_ns
    again = compute_reference(model, part, tmp_path / "ref", 2, "key-1")
    assert (
        again.n_tokens == ref.n_tokens
        and (tmp_path / "ref" / "logprobs.u16").stat().st_mtime_ns == stamp
    )
    (tmp_path / "ref" / "meta.json").unlink()  # an interrupted write leaves no marker
    assert ReferenceLogprobs.open(tmp_path / "ref") is None


def test_comparing_a_model_with_itself_is_refused(setup):
    model, _, _ = setup
    with pytest.raises(QuantlabError, match="same object"):
        check_distinct(model, model)
    logits = torch.randn(5, 11)
    with pytest.raises(ValueError, match="themselves"):
        DivergenceStats().update(logits, logits, torch.zeros(5, dtype=torch.long))
    # and the same object would report exactly zero, which is what the guard is for
    s = DivergenceStats()
    s.update(logits, logits.clone(), torch.zeros(5, dtype=torch.long))
    assert s.result()["kld_mean"] == 0.0


def test_candidate_on_other_tokens_is_an_error(setup, tmp_path):
    model, noisy, plan = setup
    ref = compute_reference(model, plan.head(2), tmp_path / "ref", 2, "k")
    shifted = make_plan(
        "gptq",
        ids=torch.cat(
            [plan.segments[0].input_ids[1:], plan.segments[1].input_ids, plan.segments[2].input_ids]
        ),
        seq_len=100,
    )
    with pytest.raises(QuantlabError, match="other tokens"):
        evaluate(noisy, shifted, 2, ref)
    with pytest.raises(QuantlabError, match="reference holds"):
        evaluate(noisy, plan.head(1), 2, ref)


def test_scoring_a_model_against_its_own_reference_is_refused(tiny, tmp_path):
    """A model quantized in place after its reference was taken is the same object: evaluate()
    refuses it (it would score KL 0); a separate load of the same weights is allowed."""
    import copy

    from quantlab.bench.perplexity import make_plan
    from quantlab.data import pydoc_text, tokenize
    from quantlab.scoring import compute_reference, evaluate

    model, tok = tiny
    ids = tokenize(pydoc_text("evaluation"), tok)[:256]
    plan = make_plan("gptq", ids=ids, seq_len=64)
    ref = compute_reference(model, plan, tmp_path / "ref", 2, "k")
    with pytest.raises(QuantlabError, match="same object"):
        evaluate(model, plan, 2, ref)
    _, div = evaluate(copy.deepcopy(model), plan, 2, ref)
    assert div["kld_mean"] < 1e-6


def _overwrite(path, at: int, data: bytes) -> None:
    """Change bytes in place: same size, same name, other content."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def test_a_reference_unlike_its_recorded_digests_is_recomputed_not_used(setup, tmp_path, capsys):
    """The codes, the rows, or a meta.json damaged or written before digests existed: open()
    reports no reference (and says why), compute_reference computes it again, and the
    divergence is the one of the untouched reference."""
    import json

    model, noisy, plan = setup
    part = plan.head(2)
    want = evaluate(noisy, part, 2, compute_reference(model, part, tmp_path / "ref", 2, "k"))[1]
    ref_dir = tmp_path / "ref"
    meta = json.loads((ref_dir / "meta.json").read_text())
    rows_end = (ref_dir / "rows.npy").stat().st_size
    damages = {
        "codes": lambda: _overwrite(ref_dir / "logprobs.u16", 1000, b"\0" * 20000),
        "rows": lambda: _overwrite(ref_dir / "rows.npy", rows_end - 8, b"\1" * 8),
        "codes truncated": lambda: os.truncate(ref_dir / "logprobs.u16", 1000),
        "no digests": lambda: (ref_dir / "meta.json").write_text(
            json.dumps({k: v for k, v in meta.items() if k != "files"})
        ),
        "not an object": lambda: (ref_dir / "meta.json").write_text("[1, 2]"),
        "absurd size": lambda: (ref_dir / "meta.json").write_text(
            json.dumps(dict(meta, n_tokens=10**15))
        ),
    }
    for name, damage in damages.items():
        damage()
        capsys.readouterr()
        assert ReferenceLogprobs.open(ref_dir) is None, name
        assert "are recomputed" in capsys.readouterr().err, name
        again = compute_reference(model, part, ref_dir, 2, "k")
        assert evaluate(noisy, part, 2, again)[1] == want, name


def test_an_open_reference_reads_the_bytes_it_verified(setup, tmp_path):
    """Once opened (verified), the reference keeps its files open: removing or replacing the
    directory (another process pruning the cache) does not change what it compares against."""
    import shutil

    model, noisy, plan = setup
    part = plan.head(2)
    compute_reference(model, part, tmp_path / "ref", 2, "k")
    ref = ReferenceLogprobs.open(tmp_path / "ref")
    want = evaluate(noisy, part, 2, ReferenceLogprobs.open(tmp_path / "ref"))[1]
    shutil.rmtree(tmp_path / "ref")
    assert evaluate(noisy, part, 2, ref)[1] == want
