"""Warnings a report states above its table: anything that makes two rows less comparable
than they look, or a figure less trustworthy than it looks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from quantlab.report.data import RunData
from quantlab.report.tables import slower_basis, slower_than_baseline

#: two engines of the same method disagree when their perplexities differ by more than this
#: fraction. Not by standard errors: both scored the same tokens, so their errors are not
#: independent and the combined standard error of two scores would hide real differences.
ENGINE_REL_TOL = 0.01
#: fewer scored tokens than this: perplexity differences of a few percent are not resolved
FEW_TOKENS = 10_000


def _distinct(frame: pd.DataFrame, col: str) -> list[str]:
    return [str(v) for v in frame[col].dropna().unique()] if col in frame else []


def _rows(frame: pd.DataFrame, col: str, value: str) -> str:
    return ", ".join(frame.loc[frame[col].astype(str) == value, "method"].astype(str))


def _differs(frame: pd.DataFrame, col: str, what: str, scope: str) -> str | None:
    values = _distinct(frame, col)
    if len(values) <= 1:
        return None
    parts = "; ".join(f"{v[:16]}: {_rows(frame, col, v)}" for v in values)
    return (
        f"{scope}: rows differ in {what} ({parts}); their "
        f"{('perplexities' if col != 'device' else 'speeds')} are not directly comparable"
    )


def few_tokens(frame: pd.DataFrame) -> str | None:
    """A warning when perplexity rests on few scored tokens, with the relative standard error
    the rows report where they do."""
    if "eval_tokens" not in frame or frame["eval_tokens"].dropna().empty:
        return None
    n = int(frame["eval_tokens"].dropna().min())
    if n >= FEW_TOKENS:
        return None
    rel = (
        (frame["ppl_stderr"] / frame["ppl"]).dropna()
        if "ppl_stderr" in frame
        else pd.Series(dtype=float)
    )
    err = (
        f" (standard error about ±{100 * rel.median():.1f}% of the perplexity)" if len(rel) else ""
    )
    return (
        f"perplexity rests on only {n} scored tokens{err}: differences of a few percent between "
        f"rows may be noise; raise eval.max_windows (or use more text) for {FEW_TOKENS}+ tokens, "
        "and compare rows by KL"
    )


def busy_machine(frame: pd.DataFrame) -> str | None:
    """A warning when other processes kept cores busy while the speed phase measured."""
    from quantlab.results import BUSY_CORES

    if "speed_other_cores" not in frame or not frame["speed_other_cores"].notna().any():
        return None
    other = float(frame["speed_other_cores"].max())
    if other < BUSY_CORES:
        return None
    return (
        f"other processes used {other:.2f} cores on average while speed was measured: tokens/s are "
        "disturbed (threads waiting for a shared core can slow decode many times over) and ratios "
        "are only as good as the interleaving; measure again on an idle machine, or with fewer "
        "threads than free cores"
    )


def within_noise_floor(frame: pd.DataFrame) -> str | None:
    """Neighbours in the KL ranking of the quantized rows whose KLs differ by less than the
    noise floor (the float model's own KL in another dtype, on the same tokens): these
    tokens do not tell them apart, so neither is the better method by this figure."""
    if "kld_floor" not in frame or frame["kld_floor"].dropna().empty:
        return None
    floor = float(frame["kld_floor"].dropna().iloc[0])
    dtype = str(frame["kld_floor_dtype"].dropna().iloc[0])
    ranked = frame[frame["kld_mean"].notna() & (frame["backend"] != "none")]
    ranked = ranked.sort_values("kld_mean")
    kl, names = ranked["kld_mean"].astype(float).tolist(), ranked["method"].astype(str).tolist()
    close = [
        f"{names[i]} vs {names[i + 1]} (ΔKL {kl[i + 1] - kl[i]:.5f})"
        for i in range(len(kl) - 1)
        if kl[i + 1] - kl[i] < floor
    ]
    if not close:
        return None
    return (
        f"KL differences smaller than the noise floor ({floor:.5f}: what running the float "
        f"model in {dtype} alone costs on the same tokens) are not claimed as a method's win: "
        f"{', '.join(close)}"
    )


def engine_disagreements(frame: pd.DataFrame, metrics: dict[str, dict]) -> list[str]:
    """Pairs of rows whose options are equal except for ``engine`` and whose perplexities
    differ by more than noise."""
    out = []
    rows = [
        (str(r["method"]), r, (metrics.get(str(r["method"])) or {}).get("options") or {})
        for _, r in frame.iterrows()
    ]
    for i, (la, ra, oa) in enumerate(rows):
        for lb, rb, ob in rows[i + 1 :]:
            if (
                ra["backend"] != rb["backend"]
                or "engine" not in oa
                or oa.get("engine") == ob.get("engine")
            ):
                continue
            if {k: v for k, v in oa.items() if k != "engine"} != {
                k: v for k, v in ob.items() if k != "engine"
            }:
                continue
            diff = abs(float(ra["ppl"]) - float(rb["ppl"]))
            noise = ENGINE_REL_TOL * float(ra["ppl"])
            if diff > noise:
                out.append(
                    f"engines disagree: {la} (engine {oa['engine']}, ppl {ra['ppl']:.3f}) and {lb} "
                    f"(engine {ob['engine']}, ppl {rb['ppl']:.3f}) run the same options but differ "
                    f"by {diff:.3f}, more than noise ({noise:.3f})"
                )
    return out


#: a GGUF type of the source -> the quantlab grids that coincide with it
_SOURCE_GRIDS = {
    "Q4_0": (4, True, 32),
    "Q4_1": (4, False, 32),
    "Q5_0": (5, True, 32),
    "Q5_1": (5, False, 32),
    "Q8_0": (8, True, 32),
}


def source_history(frame: pd.DataFrame, metrics: dict[str, dict]) -> list[str]:
    """A source model that was itself quantized (the demo: a Q4_1 GGUF dequantized to float)
    makes the rows whose grid coincides with the source's look near-lossless for a reason that
    has nothing to do with their method: say so, and name those rows."""
    base = next((m for m in metrics.values() if m.get("backend") == "none"), None)
    gguf_name = str((base or {}).get("source_gguf") or "")
    qtype = next((t for t in _SOURCE_GRIDS if t in gguf_name.upper()), None)
    if qtype is None:
        return []
    bits, sym, group = _SOURCE_GRIDS[qtype]
    hit = []
    for label, m in metrics.items():
        o = m.get("options") or {}
        g = o.get("group_size")
        if o.get("bits") == bits and o.get("sym", True) == sym and g == group:
            hit.append(label)
        elif m.get("backend") == "llamacpp" and o.get("type") == qtype:
            hit.append(label)
    rows = f"; rows on that grid: {', '.join(hit)}" if hit else ""
    grid = f"{bits}-bit {'symmetric' if sym else 'with zero points'}, blocks of {group}"
    return [
        f"the source model was quantized before ({gguf_name}: {qtype}, {grid}): its float weights "
        f"sit on that grid, which flatters any method using the same grid{rows}"
    ]


def checkpoint_warnings(run: RunData, label: str) -> list[str]:
    """A row whose checkpoint is gone, or changed since it was exported and scored: the row
    describes a checkpoint that is no longer there as it was (the rule of
    :mod:`quantlab.checkpoint`: a change is noticed wherever a run is read)."""
    ckpt = (run.metrics.get(label) or {}).get("checkpoint")
    if not ckpt:
        return []
    if not (run.path / ckpt).exists():
        return [f"the checkpoint of {label} ({Path(run.path) / ckpt}) is no longer on disk"]
    changes = run.checkpoint_changes(label)
    if not changes:
        return []
    more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
    return [
        f"the checkpoint of {label} changed since it was scored: {changes[0]}{more}; its row "
        "describes the checkpoint as it was: run the recipe again to quantize and score it anew"
    ]


#: packages whose version cannot change a figure (they only carry the data)
_NUMBERLESS_PACKAGES = frozenset({"pandas", "pydantic"})


def version_differences(runs: list[RunData]) -> str | None:
    """Runs made with different versions of the libraries that compute their numbers (each
    run's environment.json): the same method may score differently under another version."""
    recorded = [(r, r.environment.get("packages")) for r in runs]
    known = [(r, pk) for r, pk in recorded if isinstance(pk, dict)]
    parts = []
    for pkg in sorted({k for _, pk in known for k in pk} - _NUMBERLESS_PACKAGES):
        by_version: dict[str, list[str]] = {}
        for r, pk in known:
            if pkg in pk:  # a run whose quantlab did not record this package says nothing of it
                by_version.setdefault(str(pk[pkg]), []).append(r.path.name)
        if len(by_version) > 1:
            where = "; ".join(f"{v} in {', '.join(names)}" for v, names in by_version.items())
            parts.append(f"{pkg} {where}")
    unknown = [r.path.name for r, pk in recorded if not isinstance(pk, dict)]
    if not parts and not (unknown and known):
        return None
    what = (
        f"different library versions ({' | '.join(parts)})"
        if parts
        else "library versions not all recorded"
    )
    missing = f"; {', '.join(unknown)} recorded none (no environment.json)" if unknown else ""
    return (
        f"the runs were made with {what}{missing}: the same method can score differently "
        "under another version; compare each method with its own run's baseline, or run them "
        "again in one environment"
    )


def report_warnings(runs: list[RunData], frame: pd.DataFrame) -> list[str]:
    """Every warning of a report: each run's own (:func:`_run_warnings`), then, for several
    runs, what makes rows of different runs less comparable (:func:`_cross_run_warnings`)."""
    multi = len(runs) > 1
    out = [w for run in runs for w in _run_warnings(run, multi)]
    return out + (_cross_run_warnings(runs, frame) if multi else [])


def _run_warnings(run: RunData, multi: bool) -> list[str]:
    out: list[str] = []
    part = run.frame
    scope = f"run {run.path.name}" if multi else "this run"
    for col, what in (
        ("ppl_convention", "perplexity convention"),
        ("eval_seq_len", "evaluation context length"),
        ("eval_sha256", "evaluation text"),
        ("eval_tokens", "number of scored tokens"),
        ("dtype", "dtype"),
        ("device", "device"),
    ):
        msg = _differs(part, col, what, scope)
        if msg:
            out.append(msg)
    out += [f"{scope}: {w}" if multi else w for w in engine_disagreements(part, run.metrics)]
    # runs before the field said so in their description
    if run.recipe.get("quick") is True or str(run.recipe.get("description") or "").startswith(
        "QUICK PRESET"
    ):
        out.append(
            f"{scope}: made with `quantlab run --quick` (8 calibration windows, 8 evaluation "
            "windows, 1 speed round): indicative figures, not a measurement to publish; run "
            "without --quick"
        )
    for msg in (few_tokens(part), within_noise_floor(part)):
        if msg:
            out.append(f"{scope}: {msg}" if multi else msg)
    sess = (
        "speed_session"
        if "speed_session" in part and part["speed_session"].notna().any()
        else "session"
    )
    if sess in part and part["decode_tokens_per_s"].notna().any():
        timed = part[part["decode_tokens_per_s"].notna()]
        sessions = _distinct(timed, sess)
        if len(sessions) > 1:
            latest = str(timed[sess].dropna().astype(str).max())
            older = timed[timed[sess].astype(str) != latest]["method"].astype(str).tolist()
            out.append(
                f"{scope}: speed of {', '.join(older)} was measured in an earlier session "
                "(finished methods are reused when a run resumes); the machine's load may "
                "have differed, so speed ratios between those rows and the others are "
                "unreliable (re-run with --force to measure all of them together)"
            )
    busy = busy_machine(part)
    if busy:
        out.append(f"{scope}: {busy}" if multi else busy)
    slower = slower_than_baseline(part)
    if slower:
        out.append(
            f"{scope}: slower than the float baseline on this device ({slower_basis(part)}): "
            + ", ".join(f"{m} ({r:.2f}x)" for m, r in slower)
        )
    out += [f"{scope}: {w}" if multi else w for w in source_history(part, run.metrics)]
    model = run.recipe.get("model") or {}
    if model.get("trust_remote_code"):
        out.append(
            f"{scope}: trust_remote_code was ON: code from the model repository "
            f"'{model.get('source')}' ran in this process"
        )
    for label in part["method"].astype(str):
        if label not in run.metrics:
            out.append(
                f"{scope}: {label} has no metrics.json (only its results row); its details are "
                "missing"
            )
        out += [f"{scope}: {w}" for w in checkpoint_warnings(run, label)]
    out += [f"{scope}: {n}" for n in run.notes]
    return out


def _cross_run_warnings(runs: list[RunData], frame: pd.DataFrame) -> list[str]:
    out: list[str] = []
    versions = version_differences(runs)
    if versions:
        out.append(versions)
    tok = _distinct(frame, "tokenizer")
    models = _distinct(frame, "model")
    if len(models) > 1:
        out.append(
            f"the runs use different models ({', '.join(models)}): compare each method with "
            "its own run's baseline (Δppl_%, KL), not raw perplexities across models"
            + (" (their tokenizers also differ)" if len(tok) > 1 else "")
        )
    for col, what in (
        ("ppl_convention", "perplexity convention"),
        ("eval_seq_len", "evaluation context length"),
        ("eval_sha256", "evaluation text"),
        ("eval_tokens", "number of scored tokens"),
    ):
        values = _distinct(frame, col)
        if len(values) > 1:
            out.append(
                f"the runs differ in {what} ({', '.join(v[:16] for v in values)}); "
                "perplexities across runs are not comparable; compare each run's Δppl_% "
                "against its own baseline instead"
            )
            break
    return out
