"""RST — Fu, Yu, Zhang, Wu, Ouyang, Cox, Lin, "Drawing Robust Scratch Tickets: Subnetworks with
Inborn Robustness Are Found within Randomly Initialized Networks", NeurIPS 2021 (repository
GATECH-EIC/Robust-Scratch-Ticket).

Algorithm (edge-popup search under the adversarial loss; the weights are never trained):
  1. a randomly initialised network (``ctx.fresh_model()``) gets "signed constant" weights
     w = sign(w_init) * gain / sqrt(fan_in), gain = sqrt(2) for ReLU, i.e. +-sqrt(2 / fan_in) per layer;
  2. every Conv2d/Linear weight gets a score tensor s of its shape (kaiming-uniform, a = sqrt(5));
     the forward uses w * m(s), m keeping the top-k of |s| in that layer (local, same k everywhere),
     with the straight-through estimator in the backward (s receives sign(s) * dL/dm);
  3. only the scores are trained, on the PGD-AT loss min_s E[max_delta CE(f(x + delta; w * m(s)), y)];
  4. the found subnetwork is the model: the mask is baked into the frozen signed-constant weights.

Facts from the repo (``utils/builder.py::_init_conv``, ``utils/conv_type.py::SubnetConv``,
``utils/bn_type.py``, ``config_rst/{resnet18,vgg16}-usc-unsigned-cifar.yaml``): ``init: signed_constant``,
``mode: fan_in``, ``nonlinearity: relu``, no ``scale_fan``; the sign is taken of the layer's default PyTorch
init (methods.md's "sign(kaiming_normal)" has the same law: a fair random sign); scores use
``kaiming_uniform_(a=sqrt(5))``; the top-k runs on ``scores.abs()``; every conv is a ``SubnetConv``
(first layer and the classifier, a 1x1 conv, included: ``--first-layer-dense`` / ``--last-layer-dense``
are off), all with ``bias=False``; BatchNorm is ``NonAffineBatchNorm`` (affine=False; running statistics
still update); 160 epochs, SGD lr 0.1, momentum 0.9, weight decay 5e-4 on the scores (the only trainable
parameters).

Budget: the whole ``ctx.budget_epochs`` is one score search with the preset's dense-training recipe
(``preset.dense_train``: its attack, lr and weight decay); the paper has no weight-training phase to map.

Deviations and why:
* scores start kaiming-uniform as the repo, not with :func:`~pytest_advprune.sparsity.scaled_score_init`
  (HYDRA's): scores proportional to signed-constant weights all have the same |s| in a layer, so the
  initial top-k would be decided by tie-breaking alone.
* biases: our Conv2d/Linear layers may carry biases (the SmallCNN does); they are set to zero and frozen,
  which is the repo's bias-free network.
* BatchNorm (ResNet18/VGG16): our layers are affine, so their weight and bias stay frozen at the fresh
  init (1 and 0), which computes exactly what a non-affine BatchNorm computes; running statistics update
  in training as in the repo. The SmallCNN has no BatchNorm.
* rounding: each layer prunes round(s * n) weights (the counting rule), the repo int(s * n).
* a sign of exactly 0 (probability zero under the default init) is mapped to +1 so every weight is
  +-sqrt(2 / fan_in); ``torch.sign`` would leave a 0.
Expected outcome: far below the methods that train weights (survey leaderboard: CIFAR-10 ResNet18 about
15% AutoAttack), so accuracy floors may fail; the method is not tuned to pass them.
"""

import math

import torch
from torch import nn

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import attach_score_masks, bake_score_masks, prunable_layers


@torch.no_grad()
def signed_constant_(model: nn.Module) -> None:
    """Every Conv2d/Linear weight w <- sign(w) * sqrt(2 / fan_in), fan_in = elements of one output
    filter (repo ``signed_constant``, ReLU gain sqrt(2), mode fan_in); a zero sign counts as +1."""
    for layer in prunable_layers(model).values():
        w = layer.weight
        w.copy_(torch.where(w >= 0, 1.0, -1.0) * math.sqrt(2.0 / w[0].numel()))


def kaiming_scores(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """Weight-shaped scores, kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (repo ``SubnetConv.__init__``); drawn on the CPU from ``generator`` so the search is seeded."""
    scores = torch.empty(layer.weight.shape)
    nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
    return scores.to(layer.weight.device, layer.weight.dtype)


def scratch_ticket(model: nn.Module, sparsity: float, seed: int) -> list[nn.Parameter]:
    """Turn a freshly initialised ``model`` into RST's search space in place: signed-constant weights,
    zero biases, BatchNorm affine parameters frozen at 1 and 0, and a score mask (per-layer top-k at
    ``sparsity``, a fraction removed) on every Conv2d/Linear. Returns the scores, the only trainable
    parameters left."""
    signed_constant_(model)
    for layer in prunable_layers(model).values():
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            # A fresh BatchNorm's affine map is the identity (weight 1, bias 0): frozen, it is the repo's
            # NonAffineBatchNorm.
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    return attach_score_masks(model, sparsity, init=lambda layer: kaiming_scores(layer, generator))


@register
class RST(Method):
    name = "rst"
    taxonomy = Taxonomy(
        paper="Fu et al., NeurIPS 2021",
        pipeline=Pipeline.BEFORE,
        step1="AT (PGD)",
        step2="None",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.LOCAL,
        criterion=Criterion.LIS,
        repository="GATECH-EIC/Robust-Scratch-Ticket",
    )
    structures = ("weights",)
    known_failures = {
        "smoke": "no weight is ever trained (the paper's point); on smoke's 3000 images and 5 epochs of score "
        "search the scratch ticket reached 39.5% clean / 26.0% robust at 90%, below the 50% clean floor",
        "quick:weights-90": "no weight is ever trained (the paper's point; the survey also found RST far below the "
        "other methods): after the preset's 7 epochs of score search the scratch ticket reached 72.5% clean / 45.7% "
        "robust (worst case of AutoAttack and FMN) at 90%, below the 77% / 65% floors",
        "quick:weights-95": "no weight is ever trained: after the preset's 7 epochs of score search the scratch ticket "
        "reached 59.2% clean / 35.5% robust (worst case) at 95%, below the 72% / 61% floors",
        "quick:weights-99": "the paper's per-layer top-k leaves conv1 1 of its 144 signed-constant weights (and fc2 13 "
        "of 1280) at 99%; with no weight training the scratch ticket stays at chance after 7 epochs of score search "
        "(10.7% clean and robust), below the 42% / 29% floors",
    }

    def prune(self, ctx):
        model = ctx.fresh_model()
        scores = scratch_ticket(model, ctx.sparsity, ctx.seed)
        ctx.train(model, ctx.preset.dense_train.with_(epochs=ctx.budget_epochs), "rst score search", params=scores)
        # Zeros baked into the frozen signed-constant weights; bake_score_masks marks them trainable again
        # (for methods that fine-tune), which RST never does: the subnetwork is returned as found.
        bake_score_masks(model)
        return model
