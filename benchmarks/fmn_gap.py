"""Why does FMN-Linf leave more points robust than AutoAttack on some cells? Measured on those points.

For every cell of a preset's report whose FMN-Linf robust accuracy exceeds that of its strongest other
attack (AutoAttack's cascade or PGD) by more than ``--min-gap`` points, takes the points that AutoAttack or PGD breaks at the
preset's eps while FMN's smallest distance stays above it, and re-runs FMN-Linf on them:

* with the cell's tuned configuration at more steps (is FMN unfinished?), and
* with every configuration of the preset's tuning grid at the preset's steps (did tuning pick badly?).

The first row re-runs the cell's own configuration and steps and must reproduce the distances the suite
cached (``reproduced``), so the analysis is about the very model and attack the verdict used. Models and
evaluations are the suite's own, from its cache (what is not cached is built as the suite builds it).

    python benchmarks/fmn_gap.py [--preset quick] [--report reports/quick.json] [--min-gap 2] [--steps 300,1000]

Writes ``reports/benchmarks/fmn_gap_<preset>.json`` and prints one table row per (cell, FMN run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods, load_preset
from pytest_advprune.fmn import fmn_distances
from pytest_advprune.session import AdvPruneSession, Cell, RunConfig, versions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--report", default=None, help="the report JSON to pick cells from (default reports/<preset>.json)")
    ap.add_argument("--min-gap", type=float, default=2.0, help="points of robust accuracy (percent)")
    ap.add_argument("--steps", default="300,1000", help="further step budgets for the tuned configuration")
    add_run_options(ap)
    args = ap.parse_args(argv)

    load_methods()
    preset = load_preset(args.preset)
    if preset.fmn is None or "linf" not in preset.fmn.norms:
        raise SystemExit(f"preset {preset.name} runs no FMN-Linf")
    report = json.loads(Path(args.report or f"reports/{preset.name}.json").read_text())
    candidates = []
    for r in report["records"]:
        acc = r.get("robust_acc") or {}
        others = [v for k, v in acc.items() if k not in ("worst_case", "FMN-Linf")]
        if r.get("preset") == preset.name and "FMN-Linf" in acc and others and 100 * (acc["FMN-Linf"] - min(others)) > args.min_gap:
            candidates.append(Cell(r["method"], r["dataset"], r["arch"], r["structure"], round(100 * r["target_sparsity"])))
    session = AdvPruneSession(RunConfig(preset, sorted({c.method for c in candidates}), device=args.device,
                                        cache_dir=args.cache_dir), log=print)
    x_all, y_all = session._split(False)
    record = {"preset": preset.name, "eps": preset.eps, "min_gap_points": args.min_gap, "device": str(session.device),
              "versions": versions(), "cells": {}}
    out = Path(args.out) / f"fmn_gap_{preset.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rec: dict) -> None:
        out.write_text(json.dumps(rec, indent=2))

    rows = []
    for cell in candidates:
        res = session.result(cell)
        if res.error or res.evaluation is None or res.evaluation.fmn is None:
            record["cells"][cell.id] = {"skipped": res.error or "no FMN result"}
            continue
        ev = res.evaluation
        white_box = min(a.acc for k, a in ev.attacks.items() if k != "FMN-Linf")
        gap = 100 * (ev.attacks["FMN-Linf"].acc - white_box)
        linf = ev.fmn.norms["linf"]
        dist = linf.tensor()
        idx = ((~ev.robust.tensor()) & ev.clean.tensor() & (dist > preset.eps)).nonzero().flatten()
        x, y = x_all[idx], y_all[idx]
        runs = [("tuned", linf.config, preset.fmn.steps)]
        runs += [("tuned", linf.config, int(s)) for s in args.steps.split(",")]
        runs += [("grid", c, preset.fmn.steps) for c in preset.fmn.grid("linf") if c != linf.config]
        entry = {"gap_points": gap, "fmn_linf": ev.attacks["FMN-Linf"].acc, "white_box_worst": white_box,
                 "points": len(idx), "tuned": dataclasses.asdict(linf.config), "runs": []}
        for kind, config, steps in runs:
            t0 = time.perf_counter()
            d, _ = fmn_distances(res.model, x, y, "linf", config, steps, preset.eval_batch, session.device)
            run = {"kind": kind, "config": config.label(), "steps": steps, "broken_at_eps": int((d <= preset.eps).sum()),
                   "median_distance": float(d.median()) if math.isfinite(d.median()) else None, "seconds": time.perf_counter() - t0}
            if len(entry["runs"]) == 0:
                # the suite caches distances rounded to a few significant digits
                run["reproduced"] = bool(torch.allclose(d, dist[idx], rtol=1e-3, atol=1e-6))
            entry["runs"].append(run)
            rows.append([cell.id, f"{gap:+.1f}", len(idx), kind, config.label(), steps, run["broken_at_eps"],
                         f"{float(d.median()):.4f}", f"{run['seconds']:.0f} s"])
            print(rows[-1], flush=True)
        record["cells"][cell.id] = entry
        write(record)  # after every cell: a long run that stops keeps what it measured
    write(record)
    print(tabulate(rows, headers=["cell", "FMN - AA (points)", "points", "run", "FMN configuration", "steps",
                                  f"broken at eps {preset.eps:g}", "median distance", "time"], tablefmt="github"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
