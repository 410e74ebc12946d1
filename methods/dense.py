"""Dense reference: the preset's adversarially trained, unpruned model (the ceiling of every
table), trained as in Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018. It has no sparsity to claim, so its sparsity check is reported as not applicable."""

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register


@register
class Dense(Method):
    name = "dense"
    taxonomy = Taxonomy(
        paper="reference (Madry et al., ICLR 2018 adversarial training)",
        pipeline=Pipeline.NONE,
        step1="AT (preset)",
        step2="-",
        schedule=Schedule.NONE,
        locality=Locality.NONE,
        criterion=Criterion.NONE,
    )
    structures = ("dense",)

    def prune(self, ctx):
        return ctx.dense
