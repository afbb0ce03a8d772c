"""`quantlab eval` (any model, any convention, divergence from a base) and lm-eval tasks."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from quantlab.bench.perplexity import make_plan, perplexity
from quantlab.cli import main
from quantlab.data import pydoc_text, tokenize


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(pydoc_text("evaluation").documents[:8]))
    return path


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny, tmp_path_factory):
    from quantlab.checkpoint import export_checkpoint
    from quantlab.quantizers.rtn import RTN

    model, tok = tiny
    backend = RTN(RTN.Config(bits=3, group_size=32))
    q = backend.quantize(copy.deepcopy(model), None).model
    return export_checkpoint(
        q, tok, backend, tmp_path_factory.mktemp("ckpt") / "rtn", source={}, label="rtn"
    )


def _eval_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_matches_a_direct_computation(tiny, tiny_model_dir, text_file, capsys):
    model, tok = tiny
    out = _eval_json(
        capsys,
        tiny_model_dir,
        "--data",
        text_file,
        "--convention",
        "llamacpp",
        "--ctx",
        64,
        "--max-chunks",
        5,
    )
    from quantlab.data import load_text

    plan = make_plan(
        "llamacpp",
        ids=tokenize(load_text(str(text_file), None, "evaluation"), tok),
        tokenizer=tok,
        seq_len=64,
        max_windows=5,
    )
    want = perplexity(model, plan)
    assert out["convention"] == "llamacpp" and out["ctx"] == 64 and out["scored_tokens"] == 5 * 31
    assert out["ppl"] == pytest.approx(want.ppl, rel=1e-9) and out["ppl_stderr"] == pytest.approx(
        want.ppl_stderr
    )
    assert out["text_source"] == "file:eval.txt" and len(out["text_sha256"]) == 64
    assert out["dtype"] == "float32" and out["device"] == "cpu" and "kld_mean" not in out


def test_eval_lm_eval_convention_reports_word_and_byte_perplexity(
    tiny_model_dir, text_file, capsys
):
    out = _eval_json(capsys, tiny_model_dir, "--data", text_file, "--convention", "lm-eval")
    assert (
        out["ppl"] == out["word_perplexity"] and out["bits_per_byte"] > 0 and out["documents"] == 1
    )
    assert out["seq_len"] == 256  # the model's context, as lm-eval takes it
    wiki = text_file.with_name("wiki")
    wiki.mkdir(exist_ok=True)
    (wiki / "test.txt").write_text(
        " = A = \n \n one two \n = B = \n \n three \n = C = \n \n four five six \n"
    )
    two = _eval_json(
        capsys, tiny_model_dir, "--data", wiki, "--convention", "lm-eval", "--max-docs", 2
    )
    assert two["documents"] == 2 and two["text_source"] == "wiki:test[:2 docs]"


def test_eval_with_base_reports_divergence(tiny_model_dir, rtn_checkpoint, text_file, capsys):
    out = _eval_json(
        capsys,
        rtn_checkpoint,
        "--base",
        tiny_model_dir,
        "--data",
        text_file,
        "--ctx",
        64,
        "--max-windows",
        6,
        "--kl-windows",
        4,
    )
    assert out["kld_tokens"] == 4 * 63 and out["scored_tokens"] == 6 * 63
    assert (
        out["kld_mean"] > 1e-4
        and 0 < out["top1_agreement"] < 1
        and out["base"] == str(tiny_model_dir)
    )
    same = _eval_json(
        capsys,
        tiny_model_dir,
        "--base",
        tiny_model_dir,
        "--data",
        text_file,
        "--ctx",
        64,
        "--max-windows",
        2,
    )
    assert same["kld_mean"] < 1e-6 and same["top1_agreement"] == 1.0


def test_eval_base_distributions_are_stored_once_and_reused(
    tiny_model_dir, rtn_checkpoint, text_file, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    args = [
        rtn_checkpoint,
        "--base",
        tiny_model_dir,
        "--data",
        text_file,
        "--ctx",
        64,
        "--max-windows",
    ]
    first = _eval_json(capsys, *args, 3)
    again = _eval_json(capsys, *args, 3)
    assert not first["base_reference_reused"] and again["base_reference_reused"]
    assert again["kld_mean"] == first["kld_mean"] and again["base_ppl"] == first["base_ppl"]
    # the base perplexity is the base model's own on the same tokens, the ratio the two
    # perplexities'
    base = _eval_json(capsys, tiny_model_dir, "--data", text_file, "--ctx", 64, "--max-windows", 3)
    assert first["base_ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert first["ppl_ratio"] == pytest.approx(first["ppl"] / base["ppl"], rel=1e-6)
    # other windows are another reference; the cache keeps the 3 most recent
    for n in (2, 4, 5):
        assert not _eval_json(capsys, *args, n)["base_reference_reused"]
    # (beside them, their lock files: .KEY.lock)
    refs = (tmp_path / "eval-references").iterdir()
    assert len([p for p in refs if not p.name.startswith(".")]) == 3
    assert not _eval_json(capsys, *args, 3)["base_reference_reused"]  # pruned: computed again
    none = _eval_json(capsys, *args, 3, "--no-cache-base")
    assert not none["base_reference_reused"] and none["kld_mean"] == first["kld_mean"]


def test_eval_human_output_and_speed(tiny_model_dir, text_file, capsys):
    assert (
        main(
            [
                "eval",
                str(tiny_model_dir),
                "--data",
                str(text_file),
                "--ctx",
                "64",
                "--max-windows",
                "2",
                "--speed",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "perplexity" in out and "gptq" in out and "decode" in out and "TTFT" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ctx", "0"], "--seq-len must be a positive integer"),
        (["--max-docs", "2"], "--max-docs applies to the lm-eval convention"),
        (["--data", "/no/such.txt"], "does not exist"),
        (["--convention", "lm-eval", "--max-windows", "2"], "--max-windows does not apply"),
        (["--ctx", "4096"], "longer than the model's context"),
        (["--convention", "llamacpp", "--ctx", "250"], "at least 2 x ctx"),
    ],
)
def test_eval_bad_input(tiny_model_dir, argv, message, capsys, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a short text " * 20)
    data = ["--data", str(small)] if "--data" not in argv else []
    assert main(["eval", str(tiny_model_dir), *data, *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_unknown_model(capsys):
    assert main(["eval", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------- lm-eval tasks


MC_DOCS = [
    {
        "question": "The keyword that defines a function is",
        "choices": ["def", "class", "zebra"],
        "answer": 0,
    },
    {"question": "A loop over items uses", "choices": ["while", "for", "import"], "answer": 1},
    {"question": "To leave a loop early use", "choices": ["break", "yield", "pass"], "answer": 0},
    {"question": "Exceptions are caught with", "choices": ["try", "except", "raise"], "answer": 1},
    {
        "question": "A value is returned with",
        "choices": ["lambda", "global", "return"],
        "answer": 2,
    },
    {"question": "Modules are loaded with", "choices": ["import", "assert", "del"], "answer": 0},
]


@pytest.fixture()
def mc_task(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(f"""
task: quantlab_mc_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return tasks


def _direct_accuracy(model, tok) -> float:
    """Pick the choice whose continuation " choice" has the highest summed log-likelihood
    after the question (context and continuation tokenized together, then split)."""
    right = 0
    for d in MC_DOCS:
        scores = []
        for choice in d["choices"]:
            ctx = tok(d["question"]).input_ids
            whole = tok(d["question"] + " " + choice).input_ids
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return right / len(MC_DOCS)


def test_lm_eval_task_on_local_data_matches_a_direct_computation(tiny, mc_task):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (extra [eval])")
    from quantlab.bench.tasks import check_tasks, run_tasks

    model, tok = tiny
    check_tasks(["quantlab_mc_test"], [str(mc_task)])
    res = run_tasks(model, tok, ["quantlab_mc_test"], [str(mc_task)])
    assert res["quantlab_mc_test"]["acc"] == pytest.approx(_direct_accuracy(model, tok))
    assert "acc_stderr" in res["quantlab_mc_test"]


def test_recipe_tasks_land_in_the_results_table(tiny_recipe, mc_task, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (extra [eval])")
    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                "--set",
                "eval.tasks=[quantlab_mc_test]",
                "--set",
                f"eval.task_paths=[{mc_task}]",
                "--set",
                "eval.speed.enabled=false",
                "--set",
                "eval.divergence.enabled=false",
            ]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert table["task_quantlab_mc_test_acc"].between(0, 1).all()


def test_unknown_task_fails_before_any_work(tiny_recipe, mc_task, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (extra [eval])")
    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                "--set",
                "eval.tasks=[quantlab_mc_tset]",
                "--set",
                f"eval.task_paths=[{mc_task}]",
            ]
        )
        == 2
    )
    assert "did you mean 'quantlab_mc_test'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_public_api_evaluate(tiny_model_dir, text_file):
    import quantlab

    out = quantlab.evaluate(
        tiny_model_dir,
        data=str(text_file),
        convention="strided",
        seq_len=128,
        stride=64,
        max_windows=3,
    )
    assert out["convention"] == "strided" and out["stride"] == 64 and out["windows"] == 3


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import sys

    from quantlab.bench.tasks import check_tasks
    from quantlab.errors import MissingDependencyError

    monkeypatch.setitem(
        sys.modules, "lm_eval", None
    )  # what `import lm_eval` sees when it is absent
    with pytest.raises(MissingDependencyError, match=r"quantlab\[eval\]"):
        check_tasks(["arc_easy"], [])
