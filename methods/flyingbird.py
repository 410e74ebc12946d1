"""Flying Bird — Chen, Zhang, Liu, Chang, Wang, "Sparsity Winning Twice: Better Robust
Generalization from More Efficient Training", ICLR 2022 (repository
VITA-Group/Sparsity-Win-Robust-Generalization, root ``main_adv.py`` with ``--fb``, ``sparselearning/core.py``).

Algorithm (pruning during training, dynamic sparse training; machinery in :mod:`pytest_advprune.dst`):
  1. start from a randomly initialised network (not the pretrained dense model);
  2. draw a random sparse topology at the target density: per-layer densities from the repo's
     default ``--sparse_init igq`` quotas over every Conv2d/Linear weight, biases excluded;
  3. adversarially train the sparse network (PGD-AT in the paper), the mask re-applied after every
     optimiser step;
  4. every update period, in every layer: remove the ceil(r * nnz) active weights of smallest |w|
     and regrow as many at random among the inactive positions, the death rate r cosine-decayed
     from 0.5 to 0.005 over all steps; regrown weights start at zero, the density stays constant.

Facts from the repo: ``scripts/fb.sh`` runs ``--fb --dynamic_fre --density 0.2`` (ResNet18,
CIFAR-10); defaults ``--growth random``, ``--death magnitude``, ``--death-rate 0.5``,
``--update_frequency 900`` iterations (1200 after half the epochs), 200 epochs of PGD-10 AT
(eps 8/255, step 2/255), SGD lr 0.1 x0.1 at epochs 100 and 150, momentum 0.9, wd 5e-4.

Budget: one run of the preset's dense-training recipe (``ctx.preset.dense_train``, its adversarial
training and cosine learning rate) for all ``ctx.budget_epochs`` epochs: the paper's single 200-epoch
sparse AT phase is the whole method.

Deviations, with reasons:
  * the topology changes every half epoch (then 2/3 epoch in the second half), not every ~2.6 CIFAR
    epochs: over a budget of a few epochs the repo's period would allow one or two updates;
  * exactly ceil(r * nnz) weights are regrown per layer (the repo draws a Bernoulli number with that
    mean) and only at positions inactive before the update (the repo's draw may revive a weight it
    has just removed), so the density is exactly constant and every regrown weight is new;
  * all training points are used for training and the last model is returned: the repo holds out
    5k CIFAR-10 images only to select its best-robust-accuracy checkpoint (which of its checkpoints
    the benchmark used is not stated);
  * the learning rate follows the preset's cosine schedule instead of the paper's step schedule.

Sparsity: the masks keep exactly the target number of weights (IGQ quotas rounded to the exact
total) after every update. A weight regrown at zero whose inputs stay dead receives no gradient and
remains exactly zero, so the measured sparsity, which counts zeros, can exceed the target slightly
(90.14% for a 90% target on the smoke preset).
Repo note (read, not run): ``Masking.truncate_weights`` reads ``args.dynamic_sparse``, which
``main_adv.py`` never defines; as published it would stop at the first topology update.
"""

import math

from pytest_advprune.dst import DynamicSparsity
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register


@register
class FlyingBird(Method):
    name = "flyingbird"
    taxonomy = Taxonomy(
        paper="Chen et al., ICLR 2022",
        pipeline=Pipeline.DURING,
        step1="-",
        step2="AT (PGD)",
        schedule=Schedule.NONE,
        locality=Locality.GLOBAL,
        criterion=Criterion.LWM,
        repository="VITA-Group/Sparsity-Win-Robust-Generalization",
    )
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.fresh_model()
        spec = ctx.preset.dense_train.with_(epochs=ctx.budget_epochs)
        steps_per_epoch = math.ceil(len(ctx.x_train) / spec.batch_size)
        dst = DynamicSparsity(model, ctx.sparsity, steps_per_epoch, ctx.seed, log=lambda s: ctx.log(f"flyingbird {s}"))
        ctx.train(model, spec, "flyingbird sparse AT", masks=dst.masks, on_step=dst.on_step)
        ctx.log(f"flyingbird: final mask sparsity {dst.sparsity():.4%} (target {ctx.sparsity:.2%})")
        return model
