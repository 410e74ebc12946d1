"""Does the training phases' inner attack decide whether a pruned model masks gradients? Measured side by side.

Builds each cell once per training recipe: the preset with the inner attack of its prune phase
(``prune_train``) and of its fine-tuning phase (``finetune``) set to the given number of steps,
everything else (dense model, budgets, losses, attacks, points) unchanged. A recipe ``P/F`` is P
prune-phase steps and F fine-tuning steps; one step is FGSM-RS (a step of 1.25 eps from a random
start, Wong et al. 2020), k > 1 steps are PGD with steps of 2.5 eps / k (Madry et al. 2018), the
loss staying the method's own (PGD-AT, TRADES, MART). Each model is evaluated with the preset's
attacks (worst case as the suite) and its ``black_box`` indicator is read: the fraction of points
only Square broke, which fails above 1%. The recipe matching the preset is its cached cell.
``--seeds`` runs every recipe under each of the given preset seeds instead of the preset's: a seed
retrains the dense model too, so each seed is an independent sample of the whole pipeline.

    python benchmarks/training_attack.py [--cells hydra-weights-99,radmm-weights-90] [--recipes 1/1,1/5]
                                         [--seeds 0,1] [--preset quick] [--methods-dir DIR] [--cache-dir DIR]
                                         [--device auto] [--out reports/benchmarks]

Writes ``<out>/training_attack_<preset>.json`` (one record per cell, recipe and seed, with its device
and versions, added to those of earlier runs); builds what is not cached, under the keys a run of
that recipe as a preset would use. The last line is the headline: per recipe, how many of its runs
(cells x seeds) pass ``black_box``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods, load_preset, parse_cell, write_records
from pytest_advprune import indicators
from pytest_advprune.presets import Preset
from pytest_advprune.session import AdvPruneSession, RunConfig, versions


def recipe(spec: str) -> tuple[int, int]:
    """``(prune steps, fine-tuning steps)`` of a ``P/F`` spec such as ``1/5``; SystemExit with the fix
    when it is malformed."""
    parts = spec.strip().split("/")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 50 for p in parts):
        raise SystemExit(f"--recipes: {spec!r} is not P/F, the prune-phase and fine-tuning attack steps "
                         "(1-50 each), e.g. 1/5")
    return int(parts[0]), int(parts[1])


def with_recipe(preset: Preset, prune_steps: int, finetune_steps: int, seed: int | None = None) -> Preset:
    """``preset`` with the two phases' inner attack steps replaced (step 1.25 eps for one step, 2.5 eps / k
    for k steps) and, if given, its seed; its name is kept, so cache keys are those of a preset defined
    this way."""
    def phase(spec, steps):
        return spec.with_(attack_steps=steps, step_size=1.25 if steps == 1 else 2.5 / steps)
    return dataclasses.replace(preset, prune_train=phase(preset.prune_train, prune_steps),
                               finetune=phase(preset.finetune, finetune_steps),
                               seed=preset.seed if seed is None else seed)


def _seed(spec: str) -> int:
    """A seed of ``--seeds``; SystemExit with the fix when it is not a non-negative integer."""
    if not spec.strip().isdigit():
        raise SystemExit(f"--seeds: {spec!r} is not a non-negative integer, e.g. --seeds 0,1,2")
    return int(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="hydra-weights-99", help="METHOD-STRUCTURE-SPARSITY cells, comma list")
    ap.add_argument("--recipes", default="1/1,1/5", help="P/F prune-phase/fine-tuning attack steps, comma list")
    ap.add_argument("--seeds", default=None, help="preset seeds, comma list (default: the preset's)")
    ap.add_argument("--preset", default="quick")
    add_run_options(ap, methods_dir=True)
    args = ap.parse_args(argv)

    load_methods(args.methods_dir)
    preset = load_preset(args.preset)
    recipes = [recipe(r) for r in args.recipes.split(",")]
    cells = [parse_cell(c, preset, "--cells") for c in args.cells.split(",")]
    seeds = [preset.seed] if args.seeds is None else [_seed(v) for v in args.seeds.split(",")]

    records = []
    for (prune_steps, finetune_steps), seed in ((r, seed) for seed in seeds for r in recipes):
        variant = with_recipe(preset, prune_steps, finetune_steps, seed)
        session = AdvPruneSession(RunConfig(variant, sorted({c.method for c in cells}), device=args.device,
                                            cache_dir=args.cache_dir), log=print)
        for cell in cells:
            res = session.result(cell)
            if res.error or res.evaluation is None:
                raise SystemExit(f"could not build {cell.id} with recipe {prune_steps}/{finetune_steps}: "
                                 f"{res.error or res.skip_reason or 'not evaluated'}")
            ev = res.evaluation
            bb = indicators.black_box(ev, indicators.DEFAULT)
            records.append({
                "cell": cell.id, "recipe": f"{prune_steps}/{finetune_steps}", "seed": seed,
                "prune_train": variant.prune_train.label(), "finetune": variant.finetune.label(),
                "preset_recipe": (variant.prune_train, variant.finetune) == (preset.prune_train, preset.finetune),
                "n_points": ev.clean.n, "clean": ev.clean.acc, "robust": ev.robust.acc,
                "attacks": {k: a.acc for k, a in ev.attacks.items()}, "black_box": bb.value,
                "black_box_ok": bb.passed, "pruned_key": session.pruned_key(cell),
                "device": str(session.device), "versions": versions()})

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"
    print(tabulate([[r["cell"], r["recipe"] + (" (preset)" if r["preset_recipe"] else ""), r["seed"], pct(r["clean"]),
                     pct(r["robust"]), pct(r["black_box"]), {True: "ok", False: "FAIL", None: "not run"}[r["black_box_ok"]]]
                    for r in records],
                   headers=["cell", "recipe P/F", "seed", "clean (%)", "robust (%)", "Square-only (%)", "black_box"],
                   tablefmt="github"))
    write_records(Path(args.out) / f"training_attack_{preset.name}.json", {"preset": preset.name, "eps": preset.eps}, records, ("cell", "recipe", "seed"))
    print("black_box passes per recipe: " + ", ".join(
        f"{p}/{f} {sum(r['black_box_ok'] is True for r in records if r['recipe'] == f'{p}/{f}')} of "
        f"{len(cells) * len(seeds)}"
        for p, f in recipes))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
