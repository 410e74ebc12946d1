"""Does a preset's AutoAttack subset match full AutoAttack standard? Measured side by side.

Compares, on the same points and seed, the preset's attack subset and AutoAttack standard
(APGD-CE, APGD-T 9 targets, FAB-T 9 targets, Square 5000 queries) on the preset's dense model
and on pruned cells, and prints the cumulative robust accuracy after every attack. The subset's
numbers are the suite's own evaluation of the cell (read from the cache, or built exactly as
``pytest --advprune-method=...`` builds it), so what is validated is what the verdicts use.
The last line is the headline: the largest gap (points) between subset and standard.

    python benchmarks/attack_subset.py [--preset quick] [--cell lwm-weights-90[,hydra-weights-90]] [--cache-dir DIR]
                                       [--standard-from reports/benchmarks/attack_subset_quick.json]

Writes ``reports/benchmarks/attack_subset_<preset>.json``. Trains/prunes what is not cached, with the
suite's thread setting (torch's default, or env ``ADVPRUNE_THREADS``), so a cell it builds is the one
``pytest --advprune-method=...`` would build and cache.
Every model is identified by the sha256 of its weights; ``--standard-from`` reuses an earlier
run's AutoAttack standard result (hours on a CPU) for a model whose sha256 matches, and only for it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods, load_preset, parse_cell
from pytest_advprune.attacks import AutoAttackSpec, run_autoattack
from pytest_advprune.cache import weights_digest
from pytest_advprune.session import AdvPruneSession, Cell, RunConfig, versions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--cell", default="lwm-weights-90", help="METHOD-STRUCTURE-SPARSITY of the pruned model(s), comma list")
    ap.add_argument("--standard-from", default=None, help="earlier JSON whose standard results are reused by weight sha256")
    add_run_options(ap)
    args = ap.parse_args(argv)

    load_methods()
    preset = load_preset(args.preset)
    cells = [parse_cell(c, preset, "--cell") for c in args.cell.split(",")]
    session = AdvPruneSession(RunConfig(preset, sorted({"dense"} | {c.method for c in cells}), device=args.device,
                                        cache_dir=args.cache_dir), log=print)
    arch = preset.archs[0]
    results = {f"dense {arch}": session.result(Cell("dense", preset.dataset, arch, "dense", 0))}
    for cell in cells:
        results[cell.id] = session.result(cell)
    for name, res in results.items():
        if res.error:
            raise SystemExit(f"could not build {name}: {res.error}")
    earlier = json.loads(Path(args.standard_from).read_text())["models"] if args.standard_from else {}
    x, y = session._split(False)
    rows, record = [], {"preset": preset.name, "n_points": len(y), "eps": preset.eps, "device": str(session.device),
                        "versions": versions(), "models": {}}
    for name, res in results.items():
        sha = weights_digest(res.model)
        aa = {k[3:]: v.acc for k, v in res.evaluation.attacks.items() if k.startswith("AA:")}
        entry = {"state_sha256": sha, "subset": {
            "label": preset.autoattack.label(), "cumulative": aa, "warnings": res.evaluation.warnings,
            "seconds": res.evaluation.duration_s, "source": "the suite's evaluation of the cell (cache kind eval); "
            "seconds: its AutoAttack and PGD time, summed over resumed runs"}}
        previous = earlier.get(name, {})
        if previous.get("state_sha256") == sha and "standard" in previous:
            entry["standard"] = {**previous["standard"], "reused": f"from {args.standard_from} (same weights sha256)"}
        else:
            spec = AutoAttackSpec(version="standard")
            t0 = time.perf_counter()
            out = run_autoattack(res.model, x, y, preset.eps, spec, preset.seed, preset.eval_batch, session.device, log=print)
            entry["standard"] = {"label": spec.label(), "cumulative": {a: float(f.float().mean()) for a, f in out.flags_after.items()},
                                 "seconds": time.perf_counter() - t0, "warnings": out.warnings}
        for label in ("subset", "standard"):
            rows.append([name, label, ", ".join(f"{a} {100 * v:.1f}" for a, v in entry[label]["cumulative"].items()),
                         f"{entry[label]['seconds']:.0f} s" + (" (reused)" if "reused" in entry[label] else "")])
        entry["gap_points"] = 100 * (list(entry["subset"]["cumulative"].values())[-1]
                                     - list(entry["standard"]["cumulative"].values())[-1])
        record["models"][name] = entry
    print(tabulate(rows, headers=["model", "attacks", "cumulative robust accuracy (%) after each attack", "time"], tablefmt="github"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"attack_subset_{preset.name}.json").write_text(json.dumps(record, indent=2))
    gap = max(e["gap_points"] for e in record["models"].values())
    print(f"largest gap subset - standard: {gap:+.1f} points (robust accuracy, {len(y)} points)")


if __name__ == "__main__":
    main()
