"""Would a method meet the floors with a longer training budget? Measured side by side.

Builds each cell once per budget scale: the preset with the epochs of its prune phase
(``prune_train``) and of its fine-tuning phase (``finetune``) multiplied, everything else (dense
model, learning rates, losses, inner attacks, evaluation attacks, points, floors) unchanged. A scale
``PxF`` multiplies the prune phase's epochs by P and the fine-tuning's by F; ``1x1`` is the preset
and its cached cell. The cell's total budget (:attr:`~pytest_advprune.session.PruneContext.budget_epochs`)
grows with the phases, so a method that splits the phases' epochs spends the longer budget the way
it spends the preset's. Each model is evaluated as the suite does (worst case over the preset's
attacks) and judged against the preset's floors for its cell.

Why: the preset counts the budget in epochs, so a method whose step costs fewer forward/backward
passes (PwoA distils on clean inputs: about 1.3 passes per batch, where a 5-step PGD-AT
fine-tuning batch costs 6) gets less compute than the others. ``1.5x4.5`` gives such a method the
preset's compute; larger scales show whether any budget closes its gap to the floors.

    python benchmarks/budget_scaling.py [--cells pwoa-weights-90] [--scales 1x1,1.5x4.5,4x12]
                                        [--preset quick] [--methods-dir DIR] [--cache-dir DIR]
                                        [--device auto] [--out reports/benchmarks]

Writes ``<out>/budget_scaling_<preset>.json`` (one record per cell and scale, with its device and
versions, added to those of earlier runs; ``cell_s`` is the cell's seconds: prune + fine-tune,
AutoAttack + PGD, FMN, summed over the runs that built them); builds what is not cached, under the keys a preset with
those epochs would use. The last line is the headline: per scale, how many cells meet every floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import (
    JUDGED_HEADERS, add_run_options, judged, judged_columns, load_methods, load_preset, parse_cell, write_records,
)
from pytest_advprune.presets import Preset
from pytest_advprune.session import AdvPruneSession, RunConfig

MAX_SCALE = 50.0


def scale(spec: str) -> tuple[float, float]:
    """``(prune-phase factor, fine-tuning factor)`` of a ``PxF`` spec such as ``1.5x4.5``; SystemExit
    with the fix when it is malformed or a factor is outside (0, 50]."""
    parts = spec.strip().lower().split("x")
    try:
        factors = tuple(float(p) for p in parts)
    except ValueError:
        factors = ()
    if len(factors) != 2 or not all(math.isfinite(f) and 0 < f <= MAX_SCALE for f in factors):
        raise SystemExit(f"--scales: {spec!r} is not PxF, the factors (0-{MAX_SCALE:g}] of the prune phase's and the "
                         "fine-tuning's epochs, e.g. 1.5x4.5")
    return factors


def label(factors: tuple[float, float]) -> str:
    """``PxF`` of a scale, each factor as ``%g``: ``(1.0, 4.5)`` -> ``1x4.5``."""
    return "x".join(f"{f:g}" for f in factors)


def with_scale(preset: Preset, prune_factor: float, finetune_factor: float) -> Preset:
    """``preset`` with its prune phase's and fine-tuning's epochs multiplied; its name is kept, so cache
    keys are those of a preset defined this way."""
    return dataclasses.replace(preset, prune_train=preset.prune_train.with_(epochs=preset.prune_train.epochs * prune_factor),
                               finetune=preset.finetune.with_(epochs=preset.finetune.epochs * finetune_factor))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="pwoa-weights-90", help="METHOD-STRUCTURE-SPARSITY cells, comma list")
    ap.add_argument("--scales", default="1x1,1.5x4.5,4x12", help="PxF epoch factors of prune phase x fine-tuning, comma list")
    ap.add_argument("--preset", default="quick")
    add_run_options(ap, methods_dir=True)
    args = ap.parse_args(argv)

    load_methods(args.methods_dir)
    preset = load_preset(args.preset)
    scales = [scale(s) for s in args.scales.split(",")]
    cells = [parse_cell(c, preset, "--cells") for c in args.cells.split(",")]

    records = []
    for factors in scales:
        variant = with_scale(preset, *factors)
        session = AdvPruneSession(RunConfig(variant, sorted({c.method for c in cells}), device=args.device,
                                            cache_dir=args.cache_dir), log=print)
        for cell in cells:
            _, fields = judged(session, cell, f" at scale {label(factors)}")
            records.append({
                "cell": cell.id, "scale": label(factors), "preset_scale": factors == (1.0, 1.0),
                "prune_train": variant.prune_train.label(), "finetune": variant.finetune.label(),
                "epochs": {"prune_train": variant.prune_train.epochs, "finetune": variant.finetune.epochs}, **fields})

    print(tabulate([[r["cell"], r["scale"] + (" (preset)" if r["preset_scale"] else ""), f"{r['epochs']['prune_train']:g}",
                     f"{r['epochs']['finetune']:g}", *judged_columns(r)] for r in records],
                   headers=["cell", "scale PxF", "prune-phase epochs", "fine-tuning epochs", *JUDGED_HEADERS], tablefmt="github"))
    write_records(Path(args.out) / f"budget_scaling_{preset.name}.json", {"preset": preset.name, "eps": preset.eps}, records, ("cell", "scale"))
    print("cells meeting every floor per scale: " + ", ".join(
        f"{label(f)} {sum(r['meets_floors'] for r in records if r['scale'] == label(f))} of {len(cells)}" for f in scales))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
