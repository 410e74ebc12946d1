"""Li20 (boosting tickets) — Li, Wang, Jia, Lu, Zhong, Carin, Jana, "Towards Practical Lottery Ticket
Hypothesis for Adversarial Training", arXiv 2003.05733, 2020 (repository boosting-ticket/ticket_robust).

Algorithm (paper; ``ticket.py``, ``ratio.py``, ``enhance.py``, ``pruning/methods.py`` of the repo):
  1. save the random initialisation theta0 of a freshly built network;
  2. train it densely with cheap FGSM adversarial training;
  3. one-shot global magnitude prune: every Conv2d and Linear weight, last layer included, is divided by
     its layer's mean |w| and the normalised magnitudes of all layers are ranked together
     (:func:`normalised_magnitude_masks`), so a layer whose weights are uniformly small is not wiped out;
  4. rewind the surviving weights, and everything else, to theta0 (the original init, not an early
     checkpoint; :func:`rewind`): this is the "boosting ticket";
  5. train the ticket with PGD adversarial training, pruned weights held at zero.

Facts from the repo: the mask comes from the model at the end of FGSM training (``--finetune_method
fgsm``: one step of 8/255 at eps 8/255, no random start); one pruning step (``--n_pruning_steps 1``);
``weight_prune`` thresholds the pooled normalised |w| at the target percentile and also masks a BatchNorm
channel whose filter is entirely pruned; the ticket is loaded from the saved init (``--init``) and trained
with Madry PGD (``--enhance_method madry``: 10 steps of 2/255); by default both phases run
``train_epochs`` = 100 epochs, and the convergence scripts train the ticket for 20-100 epochs after a
100-epoch FGSM run.

Budget (fair: the phases spend exactly ``ctx.budget_epochs``, the total an after-training method gets):
:data:`SEARCH_SHARE` = 2/7 of it for the FGSM phase (2 of the quick preset's 7 epochs), the other 5/7 for
the ticket's PGD training. The repo's phases are 100 + 100 epochs; under one shared budget most of it
goes to the ticket, which restarts from theta0 and is the model delivered, while the FGSM phase only has
to settle the magnitude ranking (the methods.md minimal version: 2 FGSM epochs, 2-3 PGD epochs).

Deviations and why:
* FGSM phase: the preset's dense-training recipe with one attack step of 1.25 eps from a random start
  (FGSM-RS, Wong et al. 2020; the engine's attacks always start at random). On the FGSM-RS presets
  (smoke, quick) this is exactly ``preset.dense_train``; on the PGD-10 presets only the attack changes.
* ticket phase: ``preset.dense_train`` as it is, so PGD-10 (2/255 steps) on the survey presets, as the repo;
  on smoke/quick it stays the preset's FGSM-RS training attack: the budget is counted in epochs, and a
  10-step attack would make those epochs about 5x dearer than every other method's on the 2-core CPU
  the quick preset targets.
* BatchNorm channels whose filter is fully pruned are not masked (the engine masks Conv2d/Linear weights
  only; BN is outside the counting rule). Learning rates are the preset's, not the repo's (0.01 VGG /
  0.05 ResNet for FGSM, 0.1 for the ticket), with the engine's per-phase cosine decay.
* the threshold keeps exactly round((1 - s) * n) weights (the counting rule) instead of ``> percentile``.
"""

import copy

import torch
from torch import nn

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import Masks, apply_masks, make_masks, prunable_layers
from pytest_advprune.training import TrainSpec

SEARCH_SHARE = 2 / 7  # of ctx.budget_epochs for the FGSM phase; the rest trains the ticket


def phase_specs(dense_train: TrainSpec, budget: float) -> tuple[TrainSpec, TrainSpec]:
    """``(FGSM mask search, PGD ticket training)`` specs from the preset's dense-training spec; their
    epochs add up to ``budget``."""
    search = dense_train.with_(epochs=SEARCH_SHARE * budget, attack_steps=1, step_size=1.25)
    return search, dense_train.with_(epochs=budget - search.epochs)


def normalised_magnitude_masks(model: nn.Module, sparsity: float) -> Masks:
    """Weight-shaped masks of every Conv2d/Linear from one global ranking of |w| / mean_layer(|w|)
    (repo ``pruning/methods.py::weight_prune``): exactly round(sparsity * total) weights are pruned."""
    scores = {}
    for n, m in prunable_layers(model).items():
        w = m.weight.detach().abs()
        scores[n] = w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    return make_masks(model, "weights", sparsity, scores=scores, scope="global")


@torch.no_grad()
def rewind(model: nn.Module, theta0: dict[str, torch.Tensor], masks: Masks) -> None:
    """Load the initial state ``theta0`` (every parameter and buffer) into ``model`` and zero the pruned
    weights: the surviving weights restart from their original init."""
    model.load_state_dict(theta0)
    apply_masks(model, masks)


@register
class Li20(Method):
    name = "li20"
    taxonomy = Taxonomy(
        paper="Li et al., arXiv 2020",
        pipeline=Pipeline.BEFORE,
        step1="AT (FGSM)",
        step2="AT (PGD)",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.GLOBAL,
        criterion=Criterion.LWM,
        repository="boosting-ticket/ticket_robust",
    )
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.fresh_model()
        theta0 = copy.deepcopy(model.state_dict())
        search, ticket = phase_specs(ctx.preset.dense_train, ctx.budget_epochs)
        ctx.train(model, search, "li20 FGSM-AT (mask search)", part=0)
        masks = normalised_magnitude_masks(model, ctx.sparsity)
        rewind(model, theta0, masks)
        ctx.train(model, ticket, "li20 ticket AT", part=1, masks=masks)
        return model
