"""Each perplexity convention against an independent, straightforward implementation of its
reference (and the lm-eval one against the real lm-eval where it is installed)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from quantlab.bench.perplexity import (
    IGNORE,
    Segment,
    batches,
    llamacpp_plan,
    make_plan,
    perplexity,
    strided_plan,
)
from quantlab.data import Text, pydoc_text, tokenize
from quantlab.errors import QuantlabError


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


@pytest.fixture(scope="module")
def ids(tiny):
    _, tok = tiny
    return tokenize(pydoc_text("evaluation"), tok)[:1500]


def test_llamacpp_matches_its_reference_loop(tiny, ids):
    """llama-perplexity: chunks of ctx, BOS on each, second half scored, ± stderr."""
    model, tok = tiny
    ctx, bos = 100, tok.bos_token_id
    toks = ids.tolist()
    nll = nll2 = 0.0
    count = 0
    for c in range(len(toks) // ctx):
        chunk = toks[c * ctx : (c + 1) * ctx]
        orig = list(chunk)
        chunk[0] = bos
        lp = _logprobs(model, chunk)
        for i in range(ctx // 2, ctx - 1):
            x = -float(lp[i, orig[i + 1]])
            nll, nll2, count = nll + x, nll2 + x * x, count + 1
    nll, nll2 = nll / count, nll2 / count
    want_ppl = math.exp(nll)
    want_err = want_ppl * math.sqrt((nll2 - nll * nll) / (count - 1))

    got = perplexity(
        model, make_plan("llamacpp", ids=ids, tokenizer=tok, seq_len=ctx, bos=True), batch_size=3
    )
    assert got.scored_tokens == count == 15 * 49
    assert got.ppl == pytest.approx(want_ppl, rel=1e-6)
    assert got.ppl_stderr == pytest.approx(want_err, rel=1e-4)
    assert got.convention == "llamacpp" and got.params["ctx"] == ctx


def test_llamacpp_bos_follows_the_tokenizer_and_needs_two_contexts(tiny, ids):
    model, tok = tiny
    # this tokenizer adds no BOS to a text, so llama.cpp would leave chunks as they are
    auto = make_plan("llamacpp", ids=ids, tokenizer=tok, seq_len=100)
    assert auto.params["bos"] is False and torch.equal(auto.segments[1].input_ids, ids[100:200])
    forced = make_plan("llamacpp", ids=ids, tokenizer=tok, seq_len=100, bos=True)
    assert forced.segments[1].input_ids[0] == tok.bos_token_id
    assert forced.segments[1].targets[50] == ids[151]  # targets keep the original tokens
    with pytest.raises(QuantlabError, match="at least 2 x ctx"):
        llamacpp_plan(ids[:150], 100, None)


def _docs_strided(model, ids: torch.Tensor, max_length: int, stride: int, exact: bool) -> float:
    """The loop of the transformers docs ("Perplexity of fixed-length models"), with
    ``labels=`` and the model's own loss. ``exact=False`` weights each window's mean loss by
    (valid labels - 1) as the docs do; ``exact=True`` by the number of labels it averaged."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.double()
        n = int((target_ids[:, 1:] != -100).sum()) if exact else int((target_ids != -100).sum()) - 1
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def test_strided_matches_the_transformers_docs(tiny, ids):
    model, _ = tiny
    got = perplexity(model, strided_plan(ids, 128, 48), batch_size=4)
    assert got.scored_tokens == ids.numel() - 1  # every token but the first, once
    assert got.ppl == pytest.approx(_docs_strided(model, ids, 128, 48, exact=True), rel=1e-6)
    # the docs' own weighting differs by a little (and the test shows how little)
    assert got.ppl == pytest.approx(_docs_strided(model, ids, 128, 48, exact=False), rel=5e-3)
    with pytest.raises(QuantlabError, match="stride"):
        strided_plan(ids, 128, 200)


def _rolling_reference(model, tok, docs: list[str], max_len: int) -> tuple[float, float, float]:
    """Document-level rolling log-likelihood written out directly: every token of a document
    predicted once, the first from BOS, each from at most max_len previous tokens."""
    ll_total, words, nbytes = 0.0, 0, 0
    for doc in docs:
        toks = tok(doc).input_ids
        seq = [tok.bos_token_id] + toks
        for start in range(0, len(toks), max_len):
            stop = min(start + max_len, len(toks))
            # predict toks[start:stop] (seq positions start+1..stop) from a context that ends at
            # seq position stop-1 and is max_len long (shorter only at the start)
            lo = max(0, stop - max_len)
            lp = _logprobs(model, seq[lo:stop])
            for j in range(start, stop):
                ll_total += float(lp[j - lo, seq[j + 1]])
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
    return (
        math.exp(-ll_total / words),
        math.exp(-ll_total / nbytes),
        -ll_total / nbytes / math.log(2),
    )


@pytest.fixture(scope="module")
def docs():
    return pydoc_text("evaluation").documents[:6]


def test_lmeval_matches_a_direct_rolling_loglikelihood(tiny, docs):
    model, tok = tiny
    plan = make_plan("lm-eval", documents=docs, tokenizer=tok, model_context=256)
    got = perplexity(model, plan, batch_size=2)
    word, byte, bpb = _rolling_reference(model, tok, docs, 256)
    assert plan.params["seq_len"] == 256 and len(plan.segments) > len(
        docs
    )  # some docs need 2+ windows
    assert got.scored_tokens == sum(len(tok(d).input_ids) for d in docs)
    assert got.ppl == pytest.approx(word, rel=1e-6)
    assert got.extra["word_perplexity"] == got.ppl
    assert got.extra["byte_perplexity"] == pytest.approx(byte, rel=1e-6)
    assert got.extra["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)


def test_lmeval_matches_the_real_lm_eval(tiny, docs, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (extra [eval])")
    import json

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = tiny
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(f"""
task: quantlab_rolling_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["quantlab_rolling_test"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    ref = out["results"]["quantlab_rolling_test"]
    got = perplexity(
        model, make_plan("lm-eval", documents=docs, tokenizer=tok, model_context=256), batch_size=2
    )
    assert got.extra["word_perplexity"] == pytest.approx(ref["word_perplexity,none"], rel=1e-5)
    assert got.extra["byte_perplexity"] == pytest.approx(ref["byte_perplexity,none"], rel=1e-5)
    assert got.extra["bits_per_byte"] == pytest.approx(ref["bits_per_byte,none"], rel=1e-5)


def test_wikitext_files_split_into_articles():
    text = Text(
        "w:test", [" = A = \n \n x y \n = = Sub = = \n z \n = B = \n \n w \n"], kind="wikitext"
    )
    assert text.articles() == [" = A = \n \n x y \n = = Sub = = \n z \n", " = B = \n \n w \n"]
    assert Text("d", ["one", "two"]).articles() == ["one", "two"]


def test_batches_respect_a_token_budget():
    seg = lambda n: Segment(torch.zeros(n, dtype=torch.long), torch.full((n,), IGNORE))  # noqa: E731
    assert [len(b) for b in batches([seg(512)] * 9, 4)] == [4, 4, 1]
    assert [len(b) for b in batches([seg(2048)] * 3, 4)] == [1, 1, 1]
    assert [len(b) for b in batches([seg(1024)] * 5, 4)] == [2, 2, 1]


def test_padding_does_not_change_scores(tiny, docs):
    """Right padding in a batch of unequal windows leaves every token's NLL unchanged."""
    model, tok = tiny
    plan = make_plan("lm-eval", documents=docs, tokenizer=tok, model_context=256)
    one = perplexity(model, plan, batch_size=1)
    many = perplexity(model, plan, batch_size=4)
    assert many.nll_mean == pytest.approx(one.nll_mean, rel=1e-6)


def test_scored_logits_skip_unscored_positions(tiny, ids):
    """The llamacpp plan asks the head for the second half only; results equal a full pass."""
    model, tok = tiny
    plan = make_plan("llamacpp", ids=ids, tokenizer=tok, seq_len=100, bos=True, max_windows=3)
    full = []
    for s in plan.segments:
        lp = _logprobs(model, s.input_ids.tolist())
        m = s.targets != IGNORE
        full.append(-lp[m].gather(1, s.targets[m][:, None])[:, 0])
    want = torch.cat(full)
    seen = []
    got = perplexity(model, plan, batch_size=2, on_logits=lambda lg, t: seen.append(lg.shape[0]))
    assert sum(seen) == want.numel() == got.scored_tokens
    assert got.nll_mean == pytest.approx(float(want.mean()), rel=1e-6)
