"""Robust Bird — Chen, Zhang, Liu, Chang, Wang, "Sparsity Winning Twice: Better Robust Generalization from
More Efficient Training", ICLR 2022 (repository VITA-Group/Sparsity-Win-Robust-Generalization, folder
``Robust-Bird``).

Algorithm (paper; ``Robust-Bird/train_eb.py`` and ``utils/early_bird.py`` of the repo):
  1. train a freshly initialised dense network adversarially;
  2. at every check, compute the global magnitude mask at the target sparsity and keep the newest
     :data:`KEEP` masks; the distance between two masks is the Hamming distance
     d = 1 - mean(m_i == m_j) (:func:`mask_distance`);
  3. stop searching as soon as the window is full and the newest mask is within :data:`THRESHOLD` of
     every older one: the "early-bird" ticket has emerged (:func:`early_bird_search`);
  4. prune globally by magnitude, with no rewind: the trained weights are kept;
  5. train the sparse network adversarially under the mask with a fresh optimiser.

Facts from the repo: the early-bird mask ranks |w| of Conv2d weights only, one global threshold at sorted
index int(total * percent); it is checked once per epoch of stage 1 (up to ``--epochs1`` 200), window
``epoch_keep`` = 5, and the unstructured rule ``unstructure_early_bird_emerge`` stops when every distance is
<= 0.08 (0.1 is the structured, BatchNorm-based rule's threshold); the final prune is
``torch.nn.utils.prune.global_unstructured`` with L1 over every Conv2d and Linear weight; stage 2 resets the
optimiser and scheduler and runs PGD-AT (10 steps of 2/255 at 8/255, random start, SGD lr 0.1, momentum 0.9,
wd 5e-4, batch 128) for ``--epochs2``. The README example trains stage 1 naturally (``--stage1 sgd``); the
survey's taxonomy lists PGD-AT, which we follow.

Budget (fair: the phases spend exactly ``ctx.budget_epochs``, the total an after-training method gets): the
search trains in chunks of ``min(1, budget / 14)`` epochs (half an epoch on the quick preset's 7, one epoch
as the repo from a 14-epoch budget on) and checks the mask after each; it stops at the early bird or at
the cap, half the budget (:data:`SEARCH_CAP`: 7 checks, 3.5 epochs on quick). The sparse network trains for
the rest, so an early bird leaves more epochs to the sparse training. Both phases use the preset's
dense-training recipe (FGSM-RS on smoke/quick, PGD-10 on the survey presets, as the repo's stage 2).

Deviations and why:
* a window of :data:`KEEP` = 3 masks instead of 5, and on short budgets a check every 1/14 of the budget
  instead of every epoch: on the quick preset's 7 epochs, per-epoch checks with 5 masks could not stop
  before the cap (3.5 epochs); 3 half-epoch masks span one epoch, and the earliest possible stop
  (1.5 epochs) is about a fifth of the budget. The survey presets (220 epochs) check every epoch as the
  repo, with the same 3-mask window.
* the early-bird mask ranks every Conv2d and Linear weight, the same global ranking as the final prune,
  instead of Conv2d only: the stopping rule should watch the mask that is actually applied, and in the
  small CNN of the Fashion-MNIST presets the convolutions hold only 2% of the weights (in ResNet18/VGG16
  the linear layers are a small share, so this changes little there).
* each search chunk is one ``ctx.train`` call (its own data order, a fresh SGD momentum and a cosine
  learning-rate decay within the chunk): the engine's loop cannot stop early, and a budget is only
  accounted per call. The repo keeps one optimiser and a constant lr 0.1 until its first decay at epoch 50.
* the masks keep exactly round((1 - s) * n) weights (the counting rule) instead of ``> threshold``.

Pitfall kept from the repo: the Hamming distance counts every position, and two masks at sparsity s differ
in at most 2 (1 - s) of them, so at 99% the distance is at most 0.02 and the rule fires as soon as the
window is full; at 90% at most 0.2. Measured with the quick preset's recipe and budget on its first 6000
training images: the search stopped at the first full window (1.5 epochs) at 90% (distances 0.039, 0.016)
and at 99% (0.0025, 0.0010).
"""

from typing import Callable

import torch

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import make_masks

KEEP = 3  # masks in the window (repo epoch_keep = 5; see the deviations)
THRESHOLD = 0.08  # largest distance of an early bird (repo, unstructured rule)
CHECKS_PER_BUDGET = 14  # a check every budget / 14 epochs, at most every epoch
SEARCH_CAP = 0.5  # share of the budget after which a search that never converged stops


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Hamming distance 1 - mean(a == b) of two same-shaped masks (repo ``EarlyBird.cal_dist``)."""
    return 1.0 - float((a == b).float().mean())


def early_bird_search(
    next_mask: Callable[[int], torch.Tensor],
    max_checks: int,
    keep: int = KEEP,
    threshold: float = THRESHOLD,
    log: Callable[[str], None] = lambda s: None,
) -> int:
    """Call ``next_mask(k)`` for k = 0, 1, ... (it trains one chunk and returns the current flat mask)
    until the newest of the last ``keep`` masks is within ``threshold`` of each of the others, or
    ``max_checks`` calls have been made. Returns the number of calls."""
    window: list[torch.Tensor] = []
    for k in range(max_checks):
        window = (window + [next_mask(k)])[-keep:]
        if len(window) < keep:
            continue
        dists = [mask_distance(window[-1], m) for m in window[:-1]]
        log(f"robustbird check {k + 1}: mask distances {', '.join(f'{d:.4f}' for d in dists)}")
        if max(dists) <= threshold:
            return k + 1
    return max_checks


def search_plan(budget: float) -> tuple[float, int]:
    """``(epochs per check, most checks)`` for a budget of ``budget`` epochs."""
    interval = min(1.0, budget / CHECKS_PER_BUDGET)
    return interval, max(KEEP, int(SEARCH_CAP * budget / interval + 1e-9))


@register
class RobustBird(Method):
    name = "robustbird"
    taxonomy = Taxonomy(
        paper="Chen et al., ICLR 2022",
        pipeline=Pipeline.BEFORE,
        step1="AT (PGD)",
        step2="AT (PGD)",
        schedule=Schedule.ITERATIVE,
        locality=Locality.GLOBAL,
        criterion=Criterion.LWM,
        repository="VITA-Group/Sparsity-Win-Robust-Generalization",
    )
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.fresh_model()
        spec = ctx.preset.dense_train
        interval, max_checks = search_plan(ctx.budget_epochs)

        def next_mask(k):
            ctx.train(model, spec.with_(epochs=interval), f"robustbird search {k + 1}/{max_checks}", part=k)
            masks = make_masks(model, "weights", ctx.sparsity, scope="global")
            return torch.cat([m.flatten().bool().cpu() for m in masks.values()])

        checks = early_bird_search(next_mask, max_checks, log=ctx.log)
        ctx.log(f"robustbird: search stopped after {checks} of at most {max_checks} checks")
        masks = make_masks(model, "weights", ctx.sparsity, scope="global")
        rest = spec.with_(epochs=ctx.budget_epochs - checks * interval)
        ctx.train(model, rest, "robustbird sparse AT", part=checks, masks=masks)
        return model
