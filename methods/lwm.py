"""LWM — layer-wise lowest-weight-magnitude pruning with adversarial fine-tuning, in the style of
Sehwag, Wang, Mittal, Jana, "Towards Compact and Robust Deep Neural Networks", arXiv 1906.06110, 2019.

Algorithm: starting from the adversarially pretrained dense model, for rounds r = 1..R prune in
every layer the lowest-|w| weights (or lowest-L2 filters) up to the round's sparsity
s_r = 1 - (1 - s)^(r / R), then fine-tune adversarially (PGD-AT) under the mask. The fine-tune
budget of the preset is split evenly over the rounds, each round drawing its own data order. A baseline: the magnitude criterion with
no learned component.
"""

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import make_masks

ROUNDS = 3


@register
class LayerwiseMagnitude(Method):
    name = "lwm"
    taxonomy = Taxonomy(
        paper="Sehwag et al., arXiv 2019 (baseline)",
        pipeline=Pipeline.AFTER,
        step1="AT (PGD)",
        step2="AT (PGD)",
        schedule=Schedule.ITERATIVE,
        locality=Locality.LOCAL,
        criterion=Criterion.LWM,
    )
    structures = ("weights", "filters")

    def prune(self, ctx):
        model = ctx.dense
        budget = ctx.preset.finetune
        for r in range(1, ROUNDS + 1):
            sparsity = 1 - (1 - ctx.sparsity) ** (r / ROUNDS)
            masks = make_masks(model, ctx.structure, sparsity, scope="local")
            ctx.train(model, budget.with_(epochs=budget.epochs / ROUNDS), f"lwm round {r}/{ROUNDS}", masks=masks, part=r)
        return model
