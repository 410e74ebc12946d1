"""Does a method's training recipe keep the dense model's robustness when it prunes nothing? Measured side by side.

Runs a method's ``prune`` at sparsity 0 (its masks keep every weight; ADMM projects onto the
whole set) on the preset's dense model, evaluates the result with the preset's attacks (PGD, the
AutoAttack subset and FMN, point-wise worst case, as the suite does), and prints it beside the dense model and
the method's own cells at the requested sparsities, all on the same points. A control that keeps
the dense model's robust accuracy while the pruned cells lose it says the pruning, not the
method's loss, costs the robustness (e.g. PwoA's clean-input distillation at quick 90%).

    python benchmarks/unpruned_control.py --method pwoa [--cells weights-90,filters-75] [--preset quick]
                                          [--methods-dir DIR] [--cache-dir DIR] [--device auto] [--out reports/benchmarks]

Writes ``<out>/unpruned_control_<method>_<preset>.json``; trains and evaluates what is not cached
(the control model is not cached; its evaluation and FMN run are, by its weights). The last line is the headline: the control's robust
accuracy minus the dense model's, in points.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods
from pytest_advprune import presets, registry
from pytest_advprune.errors import AdvPruneError
from pytest_advprune.evaluate import check_finite
from pytest_advprune.session import AdvPruneSession, Cell, CellResult, PruneContext, RunConfig, versions
from pytest_advprune.sparsity import measure


def _cell(spec: str, structures: list[str]) -> tuple[str, int]:
    """``(structure, sparsity %)`` of a ``STRUCTURE-SPARSITY`` spec such as ``weights-90``; SystemExit
    with the fix when it is malformed or names a structure the method does not prune."""
    structure, _, sparsity = spec.strip().rpartition("-")
    if structure not in structures or not sparsity.isdigit() or not 0 < int(sparsity) < 100:
        raise SystemExit(f"--cells: {spec!r} is not STRUCTURE-SPARSITY with a structure of this method "
                         f"({', '.join(structures)}) and a sparsity in percent, e.g. {structures[0]}-90")
    return structure, int(sparsity)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--cells", default="", help="STRUCTURE-SPARSITY cells of the method to show beside it, comma list")
    ap.add_argument("--preset", default="quick")
    add_run_options(ap, methods_dir=True)
    args = ap.parse_args(argv)

    load_methods(args.methods_dir)
    try:
        preset = presets.get(args.preset)
        cls = registry.get(args.method)
        structures = [s for s in cls.structures if s != "dense"]
        if not structures:
            raise SystemExit(f"{args.method} prunes nothing (structures {cls.structures}): no control to run; "
                             "pass a pruning method")
        cells = [_cell(spec, structures) for spec in filter(None, args.cells.split(","))]
        session = AdvPruneSession(RunConfig(preset, ["dense", args.method], device=args.device,
                                            cache_dir=args.cache_dir), log=print)
    except AdvPruneError as exc:
        raise SystemExit(str(exc)) from None
    arch = preset.archs[0]
    rows = {"dense": session.result(Cell("dense", preset.dataset, arch, "dense", 0))}
    for structure, sparsity in cells:
        rows[f"{structure}-{sparsity}"] = session.result(Cell(args.method, preset.dataset, arch, structure, sparsity))
    for name, res in rows.items():
        if res.error or res.evaluation is None:
            raise SystemExit(f"could not build {name}: {res.error or res.skip_reason or 'not evaluated'}")

    x_train, y_train = session._split(True)
    structure = structures[0]
    ctx = PruneContext(copy.deepcopy(session.dense_model(arch)), structure, 0.0, preset, x_train, y_train,
                       session.device, preset.seed, lambda s: print(f"[control] {s}"), arch=arch)
    t0 = time.perf_counter()
    control = cls().prune(ctx).eval()
    check_finite(control)
    prune_s = time.perf_counter() - t0
    measured = measure(control, structure).sparsity
    if measured > 0.001:
        raise SystemExit(f"{args.method} at sparsity 0 left {100 * measured:.1f}% of the {structure} at zero: "
                         "no control; the method prunes regardless of its target")
    # the suite's own evaluation path (attacks, then FMN), keyed by the control's weights
    res = CellResult(Cell(args.method, preset.dataset, arch, structure, 0), None, None, 0.0, model=control)
    session._build_evaluation(res)
    evaluation = res.evaluation

    accs = {name: (res.evaluation.clean.acc, res.evaluation.robust.acc) for name, res in rows.items()}
    accs[f"{args.method} at 0% ({structure})"] = (evaluation.clean.acc, evaluation.robust.acc)
    print(tabulate([[n, f"{100 * c:.1f}", f"{100 * r:.1f}"] for n, (c, r) in accs.items()],
                   headers=["model", "clean (%)", "robust (%, worst case)"], tablefmt="github"))
    record = {"method": args.method, "preset": preset.name, "n_points": evaluation.clean.n, "eps": preset.eps,
              "device": str(session.device), "versions": versions(), "control_structure": structure,
              "control_budget_epochs": ctx.budget(), "control_prune_s": prune_s,
              "control_sparsity": measured,
              "accuracy": {n: {"clean": c, "robust": r} for n, (c, r) in accs.items()},
              "control_attacks": {k: v.acc for k, v in evaluation.attacks.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"unpruned_control_{args.method}_{preset.name}.json").write_text(json.dumps(record, indent=2))
    delta = 100 * (evaluation.robust.acc - rows["dense"].evaluation.robust.acc)
    print(f"control robust - dense robust: {delta:+.1f} points ({evaluation.clean.n} points)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
