"""Is MAD's collapse on a preset the global ranking's or the saliency's? Measured side by side.

Computes MAD's adversarial saliency once, as the suite's ``mad`` cell does (same batches, attack and
budget), then builds the cell's masks under several rankings and fine-tunes each from the dense
model with ``mad``'s own ``fine_tune`` (the preset's fine-tuning budget, MART with beta 0.5):

* ``repo``: MAD's own rule (conv layers in one global ranking, Linear layers per row), the suite's cell;
* ``local``: the same saliency, every conv layer ranked on its own (per-row Linear as in ``repo``);
* ``abs``: like ``local``, ranking by the saliency's magnitude (a negative diagonal entry is not pruned first);
* ``magnitude-conv``: conv layers by weight magnitude per layer, Linear layers by MAD's per-row rule.

Each model is scored on the preset's test points: clean accuracy and PGD-``pgd_steps`` robust accuracy
(the suite's PGD; AutoAttack would only lower it). The share of exactly-zero and negative saliencies
per layer is printed too: a weight whose mask stayed at 1 in every batch (one the attack does not
exploit) has saliency 0 and is pruned before every positive one.

    python benchmarks/mad_ranking.py [--sparsity 90] [--rankings repo,local,abs,magnitude-conv]
                                     [--finetune-epochs E] [--preset quick] [--cache-dir DIR]
                                     [--device auto] [--out reports/benchmarks]

Writes ``<out>/mad_ranking_<preset>.json``. The last line is the headline: clean / PGD accuracy per ranking.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
from pathlib import Path

import torch
from tabulate import tabulate

from benchmark_cli import add_run_options, load_methods, load_preset, write_records
from pytest_advprune import registry
from pytest_advprune.attacks import pgd_robust_flags, predict
from pytest_advprune.session import AdvPruneSession, PruneContext, RunConfig, versions
from pytest_advprune.sparsity import local_keep, prunable_layers

RANKINGS = ("repo", "local", "abs", "magnitude-conv")


def ranking_masks(mad, model: torch.nn.Module, saliency: dict[str, torch.Tensor], sparsity: float,
                  ranking: str) -> dict[str, torch.Tensor]:
    """The masks of one of :data:`RANKINGS` (``sparsity`` a fraction); Linear layers always follow MAD's per-row rule."""
    masks = mad.mad_masks(model, saliency, sparsity)
    if ranking == "repo":
        return masks
    for name, layer in prunable_layers(model).items():
        if isinstance(layer, torch.nn.Conv2d):
            scores = {"local": saliency[name], "abs": saliency[name].abs(),
                      "magnitude-conv": layer.weight.detach().abs()}[ranking]
            masks[name] = local_keep({name: scores}, sparsity)[name].float()
    return masks


def _ranking(spec: str) -> str:
    if spec not in RANKINGS:
        raise SystemExit(f"--rankings: {spec!r} is not one of {', '.join(RANKINGS)}")
    return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=int, default=90, help="weight sparsity in percent (1-99)")
    ap.add_argument("--rankings", default=",".join(RANKINGS), help="comma list of " + ", ".join(RANKINGS))
    ap.add_argument("--finetune-epochs", type=float, default=None, help="default: the preset's")
    ap.add_argument("--preset", default="quick")
    add_run_options(ap)
    args = ap.parse_args(argv)

    load_methods()
    preset = load_preset(args.preset)
    rankings = [_ranking(r) for r in args.rankings.split(",")]
    if not 1 <= args.sparsity <= 99:
        raise SystemExit(f"--sparsity: {args.sparsity} is not a percentage in 1-99, e.g. --sparsity 90")
    if args.finetune_epochs is not None:
        if not 0 < args.finetune_epochs <= 50:
            raise SystemExit(f"--finetune-epochs: {args.finetune_epochs:g} is not in (0, 50]")
        preset = dataclasses.replace(preset, finetune=preset.finetune.with_(epochs=args.finetune_epochs))
    sparsity = args.sparsity / 100
    mad_cls = registry.get("mad")
    mad = importlib.import_module(mad_cls.__module__)

    session = AdvPruneSession(RunConfig(preset, ["mad"], device=args.device, cache_dir=args.cache_dir), log=print)
    dense = session.dense_model(preset.archs[0])
    x, y = session._split(True)
    x_test, y_test = session._split(False)

    def context():
        return PruneContext(copy.deepcopy(dense), "weights", sparsity, preset, x, y, session.device, preset.seed,
                            print, arch=preset.archs[0])

    saliency = mad_cls().saliency(context())
    shares = {n: {"zero": float((s == 0).float().mean()), "negative": float((s < 0).float().mean())}
              for n, s in saliency.items()}
    records = []
    for ranking in rankings:
        ctx = context()
        masks = ranking_masks(mad, ctx.dense, saliency, sparsity, ranking)
        losses = mad_cls().fine_tune(ctx, ctx.dense, masks, f"mad ({ranking}) fine-tune")
        model = ctx.dense.eval()
        with torch.no_grad():
            clean = float((predict(model, x_test, preset.eval_batch, session.device) == y_test).float().mean())
        robust = float(pgd_robust_flags(model, x_test, y_test, preset.eps, preset.pgd_steps, preset.eval_batch,
                                        session.device).float().mean())
        records.append({"ranking": ranking, "sparsity": args.sparsity, "finetune": preset.finetune.label(),
                        "kept": {n: int(m.sum()) for n, m in masks.items()}, "finetune_losses": losses,
                        "n_points": len(y_test), "clean": clean, f"pgd{preset.pgd_steps}": robust,
                        "saliency_shares": shares, "device": str(session.device), "versions": versions()})

    print(tabulate([[n, f"{100 * s['zero']:.1f}", f"{100 * s['negative']:.1f}"] for n, s in shares.items()],
                   headers=["layer", "zero saliency (%)", "negative saliency (%)"], tablefmt="github"))
    pgd = f"pgd{preset.pgd_steps}"
    print(tabulate([[r["ranking"], ", ".join(f"{n} {k}" for n, k in r["kept"].items()), f"{r['finetune_losses'][-1]:.3f}",
                     f"{100 * r['clean']:.1f}", f"{100 * r[pgd]:.1f}"] for r in records],
                   headers=["ranking", "weights kept", "last fine-tuning loss", "clean (%)", f"PGD-{preset.pgd_steps} (%)"],
                   tablefmt="github"))
    write_records(Path(args.out) / f"mad_ranking_{preset.name}.json", {"preset": preset.name, "eps": preset.eps}, records,
                  ("ranking", "sparsity", "finetune"))
    print(f"clean / PGD-{preset.pgd_steps} (%) at {args.sparsity}% weights: " + ", ".join(
        f"{r['ranking']} {100 * r['clean']:.1f} / {100 * r[pgd]:.1f}" for r in records))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
