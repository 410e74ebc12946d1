"""R-ADMM — Ye, Xu, Liu, Lambrechts, Zhang, Zhou, Ma, Wang, Lin, "Adversarial Robustness vs. Model
Compression, or Both?", ICCV 2019 (repository yeshaokai/Robustness-Aware-Pruning-ADMM).

Algorithm (paper Sec. 3-4, ``--stage admm`` then ``--stage retrain`` of the reference code):
  1. start from the adversarially pretrained dense network (PGD-AT; the preset's cached dense model);
  2. ADMM phase: minimise the adversarial loss CE(f(x_adv), y) plus the augmented-Lagrangian
     penalty sum_l rho/2 ||W_l - Z_l + U_l||^2, where Z_l is W_l + U_l projected onto layer l's
     sparse set (largest-|w| weights, or largest-L2 filters) and U_l the scaled dual
     (:class:`pytest_advprune.admm.ADMM`; U rescaled when rho grows, unlike the reference: see
     that module); Z, U and rho (x1.3, "multi-rho") are updated
     ``UPDATES`` times over the phase, the learning rate restarting at each update as in the
     reference's periodic ADMM schedule;
  3. hard prune: project W itself, layer by layer (same fraction in every layer);
  4. retrain: adversarial training of the surviving weights under the fixed mask.

Budget: the preset's prune phase for step 2 and its fine-tune phase for step 4. The reference runs
200 ADMM epochs with rho 1e-3; on a shorter budget that rho would leave W where it started, so the
initial rho is derived from the reference schedule's total pull on W (:func:`rho_for_budget`).
Every Conv2d/Linear layer is pruned (the counting rule counts them all); the reference's example
config lists conv layers only.
"""

import math

from pytest_advprune.admm import ADMM, rho_for_budget
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.training import robust_loss

UPDATES = 10  # Z/U updates in the ADMM phase: the reference does one every 20 of 200 epochs
RHO_GROWTH = 1.3
# Reference pull: rho 1e-3 (x1.3 per update) x mean lr ~0.0037 (0.01 stepped x0.1 twice per period)
# x 7820 steps per period (20 CIFAR-10 epochs), summed over 10 periods: about 1.2.
TOTAL_PULL = 1.2


@register
class RADMM(Method):
    name = "radmm"
    taxonomy = Taxonomy(
        paper="Ye et al., ICCV 2019",
        pipeline=Pipeline.AFTER,
        step1="AT (PGD)",
        step2="AT (PGD)",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.LOCAL,
        criterion=Criterion.SOLWM,
        repository="yeshaokai/Robustness-Aware-Pruning-ADMM",
    )
    structures = ("weights", "filters")

    def prune(self, ctx):
        model = ctx.dense
        spec = ctx.preset.prune_train
        steps = math.ceil(spec.epochs * math.ceil(len(ctx.x_train) / spec.batch_size))
        rho = rho_for_budget(TOTAL_PULL, spec.lr, steps, UPDATES, RHO_GROWTH)
        admm = ADMM(model, ctx.structure, ctx.sparsity, rho=rho, growth=RHO_GROWTH)

        def admm_loss(m, x, y, s):
            return robust_loss(m, x, y, s) + admm.penalty()

        for k in range(UPDATES):
            ctx.train(model, spec.with_(epochs=spec.epochs / UPDATES), f"radmm admm {k + 1}/{UPDATES}", part=k,
                      loss_fn=admm_loss)
            admm.update()
            ctx.log(f"radmm admm {k + 1}/{UPDATES}: ||W - Z|| / ||W|| = {admm.primal_residual():.3f}, rho {admm.rho:.3g}")
        masks = admm.hard_prune_masks()
        ctx.train(model, ctx.preset.finetune, "radmm retrain", masks=masks, part=UPDATES)
        return model
