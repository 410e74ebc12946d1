"""HYDRA — Sehwag, Wang, Mittal, Jana, "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020.

Algorithm (paper Sec. 3; facts from inspire-group/hydra):
  1. start from the adversarially pretrained dense network (the preset's cached dense model);
  2. give every Conv2d/Linear weight an importance score, initialised proportional to the weight:
     s = sqrt(6 / fan_in) * w / max|w|   (scaled score init; random init performs much worse);
  3. prune phase: weights frozen, optimise only the scores under the robust loss (TRADES),
     the mask keeping the top-k |s| in every layer with a straight-through gradient through |s|
     (s receives sign(s) * dL/dm, as in the reference's GetSubnet applied to popup_scores.abs());
  4. fine-tune phase: mask fixed, train the surviving weights under the same robust loss.
Every layer, first conv and last linear included, keeps the same fraction (local, uniform k).
BatchNorm is not frozen during the prune phase, as in the reference code.
"""

from torch import nn

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import attach_score_masks, bake_score_masks, scaled_score_init


@register
class Hydra(Method):
    name = "hydra"
    taxonomy = Taxonomy(
        paper="Sehwag et al., NeurIPS 2020",
        pipeline=Pipeline.AFTER,
        step1="AT (TRADES)",
        step2="AT (TRADES)",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.LOCAL,
        criterion=Criterion.LIS,
        repository="inspire-group/hydra",
    )
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        scores = attach_score_masks(model, ctx.sparsity, init=scaled_score_init)
        batchnorm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        ctx.train(model, ctx.preset.prune_train.with_(loss="trades"), "hydra score search", params=scores + batchnorm)
        masks = bake_score_masks(model)
        ctx.train(model, ctx.preset.finetune.with_(loss="trades"), "hydra fine-tune", masks=masks)
        return model
