"""The speed phase: every checkpoint of a run is timed in rounds alternating with the baseline;
ratios come from neighbouring measurements; a resumed run measures all rows again, together;
"slower than float" is said only when every round says so."""

from __future__ import annotations

import json
import os

import pandas as pd

from quantlab.cli import main
from quantlab.report.tables import format_summary, slower_than_baseline

RECIPE = """
name: speed
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
  - {{label: rtn-w8, backend: rtn, options: {{bits: 8, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 2, batch_size: 2,
        speed: {{prompt_tokens: 8, new_tokens: 3, warmup: 0, repeats: 2, rounds: 3,
                 batch_size: 1}}}}
output: {{dir: "{out}", report: false}}
"""


def test_every_checkpoint_is_timed_in_rounds_beside_the_baseline(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, out=tmp_path / "run"))
    assert main(["run", str(recipe)]) == 0
    assert "speed: 3 checkpoints, 3 rounds alternating with the baseline" in capsys.readouterr().err
    run = tmp_path / "run"
    frame = pd.read_csv(run / "results.csv").set_index("method")
    assert frame.loc["baseline", "decode_x_float"] == 1.0
    for label in ("rtn-w4", "rtn-w8"):
        m = json.loads((run / label / "metrics.json").read_text())
        ratios = m["speed"]["ratios"]["decode"]
        assert len(ratios) == 3 and len(m["speed"]["measurements"]) == 3  # once per round
        assert min(ratios) == m["decode_x_min"] and max(ratios) == m["decode_x_max"]
        assert sorted(ratios)[1] == m["decode_x_float"]
        # every raw sample is kept (2 repeats per measurement)
        assert all(
            len(x["by_batch"]["b1"]["decode_tokens_per_s_samples"]) == 2
            for x in m["speed"]["measurements"]
        )
    base = json.loads((run / "baseline" / "metrics.json").read_text())
    assert len(base["speed"]["measurements"]) == 3 * 3  # before, between and after the two methods
    first = set(frame["speed_session"])
    assert len(first) == 1
    # how busy the rest of the machine was while it measured: one figure for the whole phase
    assert frame["speed_other_cores"].nunique() == 1 and frame["speed_other_cores"].iloc[0] >= 0
    # resumed: every row reused, and every row's speed measured again, together
    assert main(["run", str(recipe)]) == 0
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 3
    again = pd.read_csv(run / "results.csv")
    assert again["speed_session"].nunique() == 1
    assert "EARLIER SESSION" not in format_summary(again)


def test_slower_than_float_only_when_every_round_says_so():
    frame = pd.DataFrame(
        {
            "method": ["baseline", "a", "b"],
            "backend": ["none", "rtn", "rtn"],
            "decode_x_float": [1.0, 0.8, 0.9],
            "decode_x_min": [1.0, 0.7, 0.8],
            "decode_x_max": [1.0, 0.95, 1.05],
        }
    )
    assert slower_than_baseline(frame) == [("a", 0.8)]  # b was faster in one round: not stated


def test_a_ratio_is_against_the_baseline_measurements_beside_it():
    from quantlab.speedphase import _round_ratios

    def m(d, p):
        return {"decode_tokens_per_s": d, "prefill_tokens_per_s": p}

    base, a, b = (
        {"method": "baseline", "backend": "none"},
        {"method": "a", "backend": "rtn"},
        {"method": "b", "backend": "rtn"},
    )
    # the machine slows down during the round: the baseline goes 10 -> 8 -> 4
    measured = [
        (base, m(10, 100)),
        (a, m(9, 90)),
        (base, m(8, 80)),
        (b, m(3, 30)),
        (base, m(4, 40)),
    ]
    ratios = {"a": {"decode": [], "prefill": []}, "b": {"decode": [], "prefill": []}}
    _round_ratios(measured, ratios)
    assert ratios["a"]["decode"] == [9 / 9] and ratios["b"]["decode"] == [3 / 6]
    assert ratios["a"]["prefill"] == [90 / 90] and ratios["b"]["prefill"] == [30 / 60]


def test_the_cores_other_processes_use_are_measured_while_speed_is():
    """A real second process spinning on one core for the window: about one core, from the
    kernel's accounting (this process only sleeps meanwhile)."""
    import subprocess
    import sys
    import time

    from quantlab.speedphase import _cpu_seconds, other_cores

    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"]
    )
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        before, t0 = _cpu_seconds(), time.perf_counter()
        time.sleep(2.0)
        busy = other_cores(before, _cpu_seconds(), time.perf_counter() - t0)
    finally:
        spin.wait()
    assert 0.7 <= busy <= 1.0 + (os.cpu_count() or 1), busy
    assert (
        other_cores(None, (1.0, 1.0), 1.0) is None and other_cores((0, 0), (1.0, 2.0), 1.0) == 0.0
    )


def test_a_busy_machine_is_a_warning_in_the_report():
    from quantlab.report.caveats import busy_machine

    quiet = pd.DataFrame({"speed_other_cores": [0.05, 0.05]})
    busy = pd.DataFrame({"speed_other_cores": [0.9, 0.9]})
    assert busy_machine(quiet) is None and busy_machine(pd.DataFrame({"ppl": [1.0]})) is None
    assert "other processes used 0.90 cores on average while speed was measured" in busy_machine(
        busy
    )
