"""Would a method meet the floors on a wider network? Measured side by side.

Builds each cell on the preset's SmallCNN (``cnn``) and on copies of it with every width multiplied:
``--widths 2`` means conv channels 32 and 64 and a hidden layer of 256 units instead of 16, 32
and 128 (about 4x the multiply-adds). Everything else is the preset's: data, eps, the dense model's
training recipe (a wider dense model is trained for each width and cached), the methods' budgets,
the attacks, the points and the floors. Each model is evaluated as the suite does (worst case over
the preset's attacks) and judged against the preset's floors for its cell; ``dense-dense-0`` adds
the unpruned model of each width as the ceiling.

Why: on ``quick``, PwoA at 90% weights misses the robust floor at every training budget tried
(``benchmarks/budget_scaling.py``) and MAD's saliency leaves the pruned CNN at chance
(``benchmarks/mad_ranking.py``). The survey ran them on ResNet-18 and VGG-16, far wider networks; a
wider ``quick`` CNN is one way the floors could be met, at the price of a slower preset. This
script measures what widening buys before that decision.

    python benchmarks/arch_width.py [--cells pwoa-weights-90,mad-weights-90,dense-dense-0]
                                    [--widths 1,2] [--preset quick] [--methods-dir DIR]
                                    [--cache-dir DIR] [--device auto] [--out reports/benchmarks]

Writes ``<out>/arch_width_<preset>.json`` (one record per cell and width, with its device and
versions, added to those of earlier runs); builds what is not cached. A widened architecture is
registered for this process only, as ``cnn_x<width>``, so its models have their own cache keys. The
last line is the headline: per width, how many cells meet every floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import (
    JUDGED_HEADERS, add_run_options, judged, judged_columns, load_methods, load_preset, parse_cell, write_records,
)
from pytest_advprune import models
from pytest_advprune.presets import Preset
from pytest_advprune.session import AdvPruneSession, RunConfig
from pytest_advprune.sparsity import prunable_layers

WIDTHS = (1, 2, 3, 4)  # 4x widths is about 16x the base CNN's compute: the most a CPU run can take


def width(spec: str) -> int:
    """A ``--widths`` entry as an int of :data:`WIDTHS`; SystemExit with the fix otherwise."""
    w = spec.strip()
    if not w.isdigit() or int(w) not in WIDTHS:
        raise SystemExit(f"--widths: {spec!r} is not one of {', '.join(map(str, WIDTHS))} (multiples of the CNN's "
                         "widths 16, 32 and 128)")
    return int(w)


def widened(preset: Preset, factor: int) -> Preset:
    """``preset`` on its SmallCNN with every width times ``factor`` (1: the preset itself). Registers the
    architecture ``cnn_x<factor>`` for this process. Raises SystemExit if the preset is not on ``cnn``."""
    if preset.archs[0] != "cnn":
        raise SystemExit(f"--preset {preset.name}: its architecture is {preset.archs[0]}, not the SmallCNN (cnn) "
                         "this script widens; pick a preset on cnn (smoke, quick)")
    if factor == 1:
        return preset
    name = f"cnn_x{factor}"
    models.ARCHITECTURES[name] = functools.partial(models.SmallCNN, widths=(16 * factor, 32 * factor),
                                                   hidden=128 * factor)
    return dataclasses.replace(preset, archs=(name,))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="pwoa-weights-90,mad-weights-90,dense-dense-0",
                    help="METHOD-STRUCTURE-SPARSITY cells, comma list (dense-dense-0: the unpruned model)")
    ap.add_argument("--widths", default="1,2", help=f"width multiples of the CNN, comma list, of {WIDTHS}")
    ap.add_argument("--preset", default="quick")
    add_run_options(ap, methods_dir=True)
    args = ap.parse_args(argv)

    load_methods(args.methods_dir)
    preset = load_preset(args.preset)
    factors = [width(w) for w in args.widths.split(",")]
    specs = args.cells.split(",")
    for spec in specs:  # validated before any width is built
        parse_cell(spec, preset, "--cells", dense=True)
    variants = {factor: widened(preset, factor) for factor in factors}

    records = []
    for factor, variant in variants.items():
        cells = [parse_cell(spec, variant, "--cells", dense=True) for spec in specs]
        session = AdvPruneSession(RunConfig(variant, sorted({c.method for c in cells}), device=args.device,
                                            cache_dir=args.cache_dir), log=print)
        for cell in cells:
            res, fields = judged(session, cell, f" at width {factor}")
            records.append({
                "cell": f"{cell.method}-{cell.structure}-{cell.sparsity}", "width": factor, "arch": cell.arch,
                "weights": sum(m.weight.numel() for m in prunable_layers(res.model).values()), **fields})

    print(tabulate([[r["cell"], r["width"], r["arch"], f"{r['weights'] / 1e3:.0f}k", *judged_columns(r)] for r in records],
                   headers=["cell", "width", "arch", "weights", *JUDGED_HEADERS], tablefmt="github"))
    write_records(Path(args.out) / f"arch_width_{preset.name}.json", {"preset": preset.name, "eps": preset.eps}, records,
                  ("cell", "width"))
    print("cells meeting every floor per width: " + ", ".join(
        f"x{f} {sum(r['meets_floors'] for r in records if r['width'] == f)} of {len(specs)}" for f in factors))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
