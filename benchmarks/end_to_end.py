"""End to end: one method's whole grid with a warm dense-model cache, timed against the goal.

Copies the dense models of the warm cache (default: env ``ADVPRUNE_CACHE_DIR``, else ``~/.cache/pytest-advprune``; only read) to a
temporary folder, nothing else (no pruned model, evaluation, FMN or indicator entry), and times

    pytest --advprune-method=<method> --advprune-preset=quick --advprune-cache-dir=<copy>

in a subprocess: a real run of a method nobody has run yet, on a dense model already trained.
Goal: at most 600 s on a 2-core CPU, at most 60 s on an H100-class GPU. Beside it, the
estimator's projection of the same grid (calibration) and its projected per-cell cost of the
``cifar10`` preset on this device, and a per-cell split of the time (prune + fine-tune, AutoAttack +
PGD, FMN) from the run's report. If the copy holds no dense model for the preset, an untimed
``--advprune-method=dense`` run trains it first. The copy is deleted afterwards.

    python benchmarks/end_to_end.py [--method hydra] [--cache-dir DIR] [--device auto|cpu|cuda] [--out DIR] [--smoke]

``--smoke`` runs the ``smoke`` preset (seconds; used by the test suite). Writes
``<out>/end_to_end_<device-kind>.json``; the last printed line is the headline ratio (wall time / goal).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from pytest_advprune import presets, registry
from pytest_advprune.cache import default_dir
from pytest_advprune.estimate import estimate
from pytest_advprune.session import AdvPruneSession, RunConfig, versions

GOAL_S = {"cpu": 600.0, "cuda": 60.0}


def cold_copy(source: Path, target: Path) -> dict[str, int]:
    """Copy only the dense models (kind ``dense``) of the cache ``source`` to ``target``: the timed
    run then prunes, evaluates, runs FMN and the indicators from scratch, as for a method nobody
    has run yet. Returns ``{"dense": entries copied}``; ``source`` is only read."""
    dense = source / "dense"
    if dense.is_dir():
        shutil.copytree(dense, target / "dense", ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
    target.mkdir(parents=True, exist_ok=True)
    return {"dense": len(list((target / "dense").glob("*.json")))}


def phases(records: list[dict]) -> list[dict]:
    """Per evaluated cell: seconds of prune + fine-tune, of AutoAttack + PGD and of FMN, from the
    report records (``duration_s`` is their sum; the indicators and the latency measurement are not
    in it)."""
    out = []
    for r in records:
        if r.get("eval_s") is None:
            continue
        fmn = (r.get("fmn") or {}).get("seconds", {}).get("fmn", 0.0)
        out.append({"cell": f"{r['structure']}-{round(100 * r['target_sparsity'])}", "status": r["status"],
                    "prune_s": round(r["duration_s"] - r["eval_s"] - fmn, 1), "autoattack_pgd_s": r["eval_s"],
                    "fmn_s": fmn})
    return out


def run_pytest(workdir: Path, cache: Path, preset: str, method: str, device: str, extra: list[str]) -> tuple[int, float, str]:
    """``(exit code, wall seconds, output)`` of one conformance run in a subprocess, report inside ``workdir``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "ADVPRUNE_CACHE_DIR")}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--advprune-method={method}",
           f"--advprune-preset={preset}", f"--advprune-cache-dir={cache}", f"--advprune-device={device}",
           f"--advprune-report={workdir / 'reports' / f'{preset}.md'}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="hydra")
    ap.add_argument("--cache-dir", type=Path, default=default_dir(),
                    help="warm cache to copy (only read)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    ap.add_argument("--smoke", action="store_true", help="the smoke preset instead of quick (seconds)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for the timed run, e.g. '-n 2'")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("end_to_end: --device cuda but no CUDA device here; use --device cpu or auto")
    registry.load_builtin()
    preset = presets.get("smoke" if args.smoke else "quick")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    kind = device.type
    work = Path(tempfile.mkdtemp(prefix="advprune-e2e-"))
    try:
        cache = work / "cache"
        warm = cold_copy(args.cache_dir, cache)
        warm_s = None
        probe = AdvPruneSession(RunConfig(preset, ["dense"], device=kind, cache_dir=str(cache)))
        if not all(probe.cache.has("dense", probe.dense_key(a)) for a in preset.archs):
            rc, warm_s, out = run_pytest(work, cache, preset.name, "dense", kind, [])
            if rc != 0:
                print(out, file=sys.stderr)
                raise SystemExit(f"warming the dense model failed (exit {rc})")
            shutil.rmtree(work / "reports")
        quick_kw = {"budget_s": 0.05, "batch": 2} if args.smoke else {}
        projected = estimate(AdvPruneSession(RunConfig(preset, [args.method], device=kind, cache_dir=str(cache))),
                             **quick_kw)
        cifar = estimate(AdvPruneSession(RunConfig(presets.get("cifar10"), [args.method], device=kind,
                                                   cache_dir=str(work / "empty-cache"))), **quick_kw)
        rc, wall, out = run_pytest(work, cache, preset.name, args.method, kind, args.pytest_args.split())
        records = json.loads((work / "reports" / f"{preset.name}.json").read_text())["records"] if rc in (0, 1) else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rc not in (0, 1):  # 1 = some verdict failed, still a measured run; anything else broke
        print(out, file=sys.stderr)
        print(f"end_to_end: the timed run failed (exit {rc})", file=sys.stderr)
        return 1

    goal = GOAL_S[kind]
    statuses = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "benchmark": "end_to_end", "method": args.method, "preset": preset.name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if kind == "cuda" else "cpu",
        "wall_s": round(wall, 2), "goal_s": goal, "ratio_to_goal": round(wall / goal, 3), "pytest_exit": rc,
        "cells": statuses, "warm_entries": warm, "phases": phases(records), "dense_warmup_s": warm_s and round(warm_s, 2),
        "projected_s": round(projected.todo_h * 3600, 1),
        "cifar10_projected_per_cell_h": round(cifar.per_cell_h(), 4), "cifar10_projected_grid_h": round(cifar.total_h, 2),
        "peak_child_rss_mb": round(peak_mb, 1), "versions": versions(), "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"end_to_end_{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        [f"{args.method} {preset.name} grid (warm dense cache)", f"{wall:.1f} s", f"{goal:.0f} s",
         f"{wall / goal:.2f}", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))],
        ["estimator's projection of that grid", f"{projected.todo_h * 3600:.1f} s", "", "", "measured / projected "
         f"{wall / max(projected.todo_h * 3600, 1e-9):.2f}"],
        [f"cifar10 per cell ({args.method}, projected)", f"{cifar.per_cell_h():.2f} h", "", "",
         f"whole grid {cifar.total_h:.1f} device-hours"],
    ]
    print(tabulate(rows, ["run", "time", "goal", "time / goal", "note"], tablefmt="github", disable_numparse=True))
    cells = result["phases"]
    if cells:
        print(tabulate([[c["cell"], c["status"], c["prune_s"], c["autoattack_pgd_s"], c["fmn_s"]] for c in cells],
                       ["cell", "status", "prune + fine-tune s", "AutoAttack + PGD s", "FMN s"], tablefmt="github"))
        rest = wall - sum(c["prune_s"] + c["autoattack_pgd_s"] + c["fmn_s"] for c in cells)
        print(f"the rest of the wall time (start-up, indicators, latency, report): {rest:.1f} s")
    print(f"end_to_end: {args.method} {preset.name} grid in {wall:.1f} s on {device} vs goal {goal:.0f} s: "
          f"{wall / goal:.2f}x the goal ({'met' if wall <= goal else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
