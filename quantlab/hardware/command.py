"""``quantlab hardware RUN``: the run's rows projected onto cards, printed as tables or JSON."""

from __future__ import annotations

import json

from quantlab.errors import QuantlabError
from quantlab.hardware import machine
from quantlab.hardware.cards import CARDS, GB, Card, find_card, load_cards
from quantlab.hardware.deploy import check_batch, nothing_fits, project_rows, resolve_context
from quantlab.hardware.rows import run_rows
from quantlab.layout import ENVIRONMENT
from quantlab.report.data import RunData, load_run


def _run_bandwidth(run: RunData) -> tuple[float, str] | None:
    """The bandwidth the run measured, when the run ran on this host (a figure of another
    machine says nothing about this one)."""
    bw = run.environment.get("memory_bandwidth_bytes_per_s")
    workers = {str(w) for w in run.frame.get("worker", []) if isinstance(w, str)}
    if bw and workers == {machine.host()}:
        return float(bw), f"measured by the run ({run.path / ENVIRONMENT})"
    return None


def _this_machine(args, run: RunData) -> Card:
    if args.bandwidth is not None:
        if args.bandwidth <= 0:
            raise QuantlabError(f"--bandwidth must be positive (GB/s), not {args.bandwidth}")
        return machine.this_machine(args.bandwidth * GB, "given (--bandwidth)")
    cached = _run_bandwidth(run)
    return machine.this_machine(*cached) if cached else machine.this_machine()


def select_cards(args, run: RunData) -> list[Card]:
    """The cards asked for (``--card``, repeatable), else every known card and this machine."""
    known: list[Card] = [*CARDS, *(load_cards(args.cards) if args.cards else [])]
    if not args.card:
        return [*known, _this_machine(args, run)]
    names = [Card(machine.NAME, 0, 0, 0)] + known  # "this machine" is measured only when asked for
    picked = [find_card(name, names) for name in args.card]
    return [_this_machine(args, run) if c.name == machine.NAME else c for c in picked]


def run_hardware(args) -> int:
    from quantlab.report.tables import format_deploy

    run = load_run(args.run)
    rows, skipped = run_rows(run)
    if not rows:
        raise QuantlabError(f"no row of '{run.path}' can be projected: " + "; ".join(skipped))
    context, _ = resolve_context(rows, args.context), check_batch(args.batch)
    cards = select_cards(args, run)  # after the cheap checks: this machine may be measured here
    records = project_rows(rows, cards, context, args.batch, args.kv_dtype)
    empty = [s for c in cards if (s := nothing_fits(records, c.name))]
    if args.card and empty:  # the card the user asked about runs nothing: that is the answer
        raise QuantlabError("; ".join(empty))
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_deploy(records, cards, notes=skipped + empty))
    return 0
