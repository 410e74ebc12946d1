"""Why does Square break points every white-box attack misses? Measured on those points.

For every cell of a preset's report whose ``black_box`` indicator failed (Square, after the white-box
attacks, broke more than the indicator's margin of the evaluation points), takes exactly those points
(clean-correct, robust to PGD, to AutoAttack's gradient attacks and to FMN, broken by Square) and
attacks them again with white-box budgets far above the preset's:

* APGD-CE and APGD-DLR with 5 restarts, APGD-CE with 20 restarts of 200 iterations;
* APGD-T and FAB-T against every other class (AutoAttack standard's 9 on 10 classes);
* PGD with 10 random restarts of 50 steps (step eps / 4).

If budget were the reason, these would break most of the points and the preset's subset would be
too weak; if they break few, the model's gradients mislead every gradient attack there (gradient
masking), and the failed indicator is a finding about the model, not about the protocol. Models
and evaluations are the suite's own, from its cache (what is not cached is built as the suite
builds it).

    python benchmarks/square_gap.py [--preset quick] [--report reports/quick.json] [--cell hydra-weights-99,...]

Writes ``reports/benchmarks/square_gap_<preset>.json``; prints one row per (cell, attack), one per cell
for all runs together and, last, the share of Square's points that the runs together broke.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods, parse_cell
from pytest_advprune import presets
from pytest_advprune.indicators import square_only
from pytest_advprune.attacks import pgd
from pytest_advprune.errors import AdvPruneError
from pytest_advprune.session import AdvPruneSession, Cell, RunConfig, versions

# (label, AutoAttack attack, {sub-attack attribute: value}); None attack = our PGD with restarts
RUNS = (
    ("APGD-CE, 5 restarts", "apgd-ce", {"apgd.n_restarts": 5}),
    ("APGD-DLR, 5 restarts", "apgd-dlr", {"apgd.n_restarts": 5}),
    ("APGD-CE, 20 restarts x 200 it", "apgd-ce", {"apgd.n_restarts": 20, "apgd.n_iter": 200}),
    ("APGD-T, all targets", "apgd-t", {"apgd_targeted.n_target_classes": "all"}),
    ("FAB-T, all targets", "fab-t", {"fab.n_target_classes": "all"}),
    ("PGD-50, 10 restarts", None, {}),
)


def broken_by(model, x, y, eps: float, attack: str | None, settings: dict, seed: int, device) -> torch.Tensor:
    """Bool ``[N]``: which points of ``(x, y)`` the run breaks at Linf ``eps``."""
    if attack is None:
        torch.manual_seed(seed)
        broken = torch.zeros(len(y), dtype=torch.bool)
        for _ in range(10):
            x_adv = pgd(model, x, y, eps, eps / 4, 50, random_start=True)
            with torch.no_grad():
                broken |= (model(x_adv).argmax(1) != y).cpu()
        return broken
    from pyautoattack import AutoAttack

    n_classes = int(model(x[:1]).shape[1])
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=[attack], seed=seed, device=device)
    aa.verbose = False
    for key, value in settings.items():
        obj, attr = key.split(".")
        setattr(getattr(aa, obj), attr, n_classes - 1 if value == "all" else value)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=len(y))
    return (y_adv != y).cpu()


def analyse(res, x_all: torch.Tensor, y_all: torch.Tensor, preset, device, rows: list[list]) -> dict:
    """Every run of :data:`RUNS` on the Square-only points of an evaluated cell ``res`` (a
    ``CellResult``); appends one table row per run and one for all runs together to ``rows``."""
    idx = square_only(res.evaluation).nonzero().flatten()
    model = res.model.eval()
    x, y = x_all[idx].to(device), y_all[idx].to(device)
    entry = {"square_only_points": len(idx), "of_points": res.evaluation.clean.n, "runs": []}
    any_run = torch.zeros(len(idx), dtype=torch.bool)
    for label, attack, settings in RUNS if len(idx) else ():
        t0 = time.perf_counter()
        broken = broken_by(model, x, y, preset.eps, attack, settings, preset.seed, device)
        run = {"attack": label, "broken": int(broken.sum()), "seconds": time.perf_counter() - t0}
        entry["runs"].append(run)
        any_run |= broken
        rows.append([res.cell.id, len(idx), label, run["broken"], f"{run['seconds']:.0f} s"])
        print(rows[-1], flush=True)
    entry["broken_by_any_run"] = int(any_run.sum())
    rows.append([res.cell.id, len(idx), "any of the runs above", entry["broken_by_any_run"], ""])
    return entry


def _failed_cells(report: Path, preset: str) -> list[Cell]:
    """The cells of ``report`` (a report JSON) whose black_box indicator failed."""
    if not report.is_file():
        raise SystemExit(f"no report {report}: run pytest --advprune-method=... first, or pass --report or --cell")
    return [Cell(r["method"], r["dataset"], r["arch"], r["structure"], round(100 * r["target_sparsity"]))
            for r in json.loads(report.read_text())["records"]
            if r.get("preset") == preset and (r.get("indicators") or {}).get("black_box", {}).get("passed") is False]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--report", default=None, help="the report JSON to pick cells from (default reports/<preset>.json)")
    ap.add_argument("--cell", default=None, help="METHOD-STRUCTURE-SPARSITY list instead of the report's failed cells")
    add_run_options(ap)
    args = ap.parse_args(argv)

    load_methods()
    try:
        preset = presets.get(args.preset)
        if "square" not in preset.autoattack.attacks and preset.autoattack.version != "standard":
            raise SystemExit(f"preset {preset.name} runs no Square attack, so no cell has a black_box verdict to explain")
        candidates = [parse_cell(c, preset, "--cell", dense=True) for c in args.cell.split(",")] if args.cell else _failed_cells(
            Path(args.report or f"reports/{preset.name}.json"), preset.name)
        session = AdvPruneSession(RunConfig(preset, sorted({c.method for c in candidates}), device=args.device,
                                            cache_dir=args.cache_dir), log=print)
    except AdvPruneError as exc:
        raise SystemExit(str(exc)) from None
    x_all, y_all = session._split(False)
    record = {"preset": preset.name, "eps": preset.eps, "device": str(session.device), "versions": versions(), "cells": {}}
    out = Path(args.out) / f"square_gap_{preset.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    rows: list[list] = []
    for cell in candidates:
        res = session.result(cell)
        if res.error or res.evaluation is None or "AA:square" not in res.evaluation.attacks:
            record["cells"][cell.id] = {"skipped": res.error or "no Square result"}
        else:
            record["cells"][cell.id] = analyse(res, x_all, y_all, preset, session.device, rows)
        out.write_text(json.dumps(record, indent=2))  # after every cell: a run that stops keeps what it measured
    print(tabulate(rows, headers=["cell", "Square-only points", "white-box run", "broken", "time"], tablefmt="github"))
    entries = [e for e in record["cells"].values() if "runs" in e]
    broken, points = sum(e["broken_by_any_run"] for e in entries), sum(e["square_only_points"] for e in entries)
    print(f"square_gap: the stronger white-box runs together break {broken} of the {points} points only Square "
          f"broke ({broken / points:.0%})" if points else
          "square_gap: Square broke no point beyond the white-box attacks in these cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
