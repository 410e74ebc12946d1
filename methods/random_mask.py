"""Random pruning baseline: a uniformly random mask with the target sparsity in every layer
(random weights, or random filters), then adversarial fine-tuning (PGD-AT) under the mask.
The floor every criterion must beat: same sparsity, same fine-tuning, no criterion.
"""

import torch

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import make_masks, structured_layers


@register
class RandomPruning(Method):
    name = "random"
    taxonomy = Taxonomy(
        paper="baseline",
        pipeline=Pipeline.AFTER,
        step1="AT (PGD)",
        step2="AT (PGD)",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.LOCAL,
        criterion=Criterion.RANDOM,
    )
    structures = ("weights", "filters")

    def prune(self, ctx):
        model = ctx.dense
        gen = torch.Generator().manual_seed(ctx.seed)
        layers = structured_layers(model, ctx.structure)
        unit_dim = {"weights": None, "filters": 0, "channels": 1}[ctx.structure]
        scores = {
            n: torch.rand(m.weight.shape if unit_dim is None else (m.weight.shape[unit_dim],), generator=gen)
            for n, m in layers.items()
        }
        masks = make_masks(model, ctx.structure, ctx.sparsity, scores=scores, scope="local")
        ctx.train(model, ctx.preset.finetune, "random fine-tune", masks=masks)
        return model
