"""Does the training phases' inner attack decide whether a pruned model masks gradients? Measured side by side.

Builds each cell once per training recipe: the preset with the inner attack of its prune phase
(``prune_train``) and of its fine-tuning phase (``finetune``) set to the given number of steps,
everything else (dense model, budgets, losses, attacks, points) unchanged. A recipe ``P/F`` is P
prune-phase steps and F fine-tuning steps; one step is FGSM-RS (a step of 1.25 eps from a random
start, Wong et al. 2020), k > 1 steps are PGD with steps of 2.5 eps / k (Madry et al. 2018), the
loss staying the method's own (PGD-AT, TRADES, MART). Each model is evaluated with the preset's
attacks (worst case as the suite) and its ``black_box`` indicator is read: the fraction of points
only Square broke, which fails above 1%. The recipe matching the preset is its cached cell.

    python benchmarks/training_attack.py [--cells hydra-weights-99,radmm-weights-90] [--recipes 1/1,1/5]
                                         [--preset quick] [--methods-dir DIR] [--cache-dir DIR]
                                         [--device auto] [--out reports/benchmarks]

Writes ``<out>/training_attack_<preset>.json`` (one record per cell and recipe); builds what is not
cached, under the keys a run of that recipe as a preset would use. The last line is the headline:
per recipe, how many cells pass ``black_box``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tabulate import tabulate

from pytest_advprune import indicators, presets, registry
from pytest_advprune.cache import default_dir
from pytest_advprune.errors import AdvPruneError
from pytest_advprune.presets import Preset
from pytest_advprune.session import AdvPruneSession, Cell, RunConfig, versions


def recipe(spec: str) -> tuple[int, int]:
    """``(prune steps, fine-tuning steps)`` of a ``P/F`` spec such as ``1/5``; SystemExit with the fix
    when it is malformed."""
    parts = spec.strip().split("/")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 50 for p in parts):
        raise SystemExit(f"--recipes: {spec!r} is not P/F, the prune-phase and fine-tuning attack steps "
                         "(1-50 each), e.g. 1/5")
    return int(parts[0]), int(parts[1])


def with_recipe(preset: Preset, prune_steps: int, finetune_steps: int) -> Preset:
    """``preset`` with the two phases' inner attack steps replaced (step 1.25 eps for one step, 2.5 eps / k
    for k steps); its name is kept, so cache keys are those of a preset defined this way."""
    def phase(spec, steps):
        return spec.with_(attack_steps=steps, step_size=1.25 if steps == 1 else 2.5 / steps)
    return dataclasses.replace(preset, prune_train=phase(preset.prune_train, prune_steps),
                               finetune=phase(preset.finetune, finetune_steps))


def _cell(spec: str, preset: Preset) -> Cell:
    """The preset's cell of a ``METHOD-STRUCTURE-SPARSITY`` spec such as ``hydra-weights-99``;
    SystemExit with the fix when it is malformed or names a method or structure that does not exist."""
    method, structure, sparsity = (spec.strip().rsplit("-", 2) + ["", ""])[:3]
    try:
        cls = registry.get(method)
    except AdvPruneError as exc:
        raise SystemExit(f"--cells: {exc}") from None
    if structure not in cls.structures or structure == "dense" or not sparsity.isdigit() or not 0 < int(sparsity) < 100:
        raise SystemExit(f"--cells: {spec!r} is not METHOD-STRUCTURE-SPARSITY with a structure {method} prunes "
                         f"({', '.join(s for s in cls.structures if s != 'dense')}) and a sparsity in percent, "
                         f"e.g. {method}-weights-90")
    return Cell(method, preset.dataset, preset.archs[0], structure, int(sparsity))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="hydra-weights-99", help="METHOD-STRUCTURE-SPARSITY cells, comma list")
    ap.add_argument("--recipes", default="1/1,1/5", help="P/F prune-phase/fine-tuning attack steps, comma list")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--methods-dir", default=None, help="a folder of method files, as --advprune-methods-dir")
    ap.add_argument("--cache-dir", default=str(default_dir()))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="reports/benchmarks")
    args = ap.parse_args(argv)

    try:
        registry.load_builtin()
        if args.methods_dir:
            registry.load_dir(args.methods_dir)
        preset = presets.get(args.preset)
    except AdvPruneError as exc:
        raise SystemExit(str(exc)) from None
    recipes = [recipe(r) for r in args.recipes.split(",")]
    cells = [_cell(c, preset) for c in args.cells.split(",")]

    records = []
    for prune_steps, finetune_steps in recipes:
        variant = with_recipe(preset, prune_steps, finetune_steps)
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
                "cell": cell.id, "recipe": f"{prune_steps}/{finetune_steps}",
                "prune_train": variant.prune_train.label(), "finetune": variant.finetune.label(),
                "preset_recipe": (variant.prune_train, variant.finetune) == (preset.prune_train, preset.finetune),
                "n_points": ev.clean.n, "clean": ev.clean.acc, "robust": ev.robust.acc, "attacks": {k: a.acc for k, a in ev.attacks.items()},
                "black_box": bb.value, "black_box_ok": bb.passed, "pruned_key": session.pruned_key(cell)})

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"
    print(tabulate([[r["cell"], r["recipe"] + (" (preset)" if r["preset_recipe"] else ""), pct(r["clean"]),
                     pct(r["robust"]), pct(r["black_box"]), {True: "ok", False: "FAIL", None: "not run"}[r["black_box_ok"]]]
                    for r in records],
                   headers=["cell", "recipe P/F", "clean (%)", "robust (%)", "Square-only (%)", "black_box"],
                   tablefmt="github"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"training_attack_{preset.name}.json").write_text(json.dumps(
        {"preset": preset.name, "eps": preset.eps,
         "device": str(session.device), "versions": versions(), "records": records}, indent=2))
    print("black_box passes per recipe: " + ", ".join(
        f"{p}/{f} {sum(r['black_box_ok'] is True for r in records if r['recipe'] == f'{p}/{f}')} of {len(cells)}"
        for p, f in recipes))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
