"""TwinRep — Li, Qiu, Zhang, Guo, Cheng, "Learning Adversarially Robust Sparse Networks via Weight
Reparameterization", AAAI 2023 (repository UCAS-LCH/Twin-Rep).

Algorithm (repo ``train.py``, ``models/layers.py``):
  1. train from scratch (``ctx.fresh_model()``) with the Conv2d/Linear weights reparameterised as an
     effective weight W_eff = R(W, A) * M, M a mask (all ones until the prune):
       weights  (``TwinConv``/``TwinLinear``): W_eff = W * A, A a twin of W's shape (Hadamard product);
       channels (our analogue of ``ChannelConv``, see below): W_eff[:, p] = sum_q A[p, q] W[:, q];
  2. adversarial training of W, A, biases and BatchNorm together, weight decay on all of them: on a
     product, weight decay on both factors is an implicit sparsity regulariser (for balanced W * A it is
     an L1 penalty on W_eff, so small effective weights are driven to zero, not just shrunk);
  3. after ``PRUNE_AT`` of the training steps, prune once, globally on W_eff: weights — the round(s * N)
     smallest |W_eff| over all layers; channels — the input channels of smallest L2 norm of W_eff over all
     counted layers, each layer keeping at least its strongest channel;
  4. continue adversarial training under the mask to the end; then W_eff is baked into plain weights.

Facts from the repo: W keeps the layer's default init and A is ``kaiming_uniform_(a=sqrt(5))``, the same
law U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the twin, so the factors start balanced; every conv and
linear layer, first and last included, is reparameterised and in the global unstructured ranking
(threshold at the (round(N * p) + 1)-th smallest |W_eff|, so round(N * p) are cut); one SGD optimiser
over all parameters (lr 0.1, momentum 0.9, weight decay 2e-4 on W and A alike); ``--pruning-epoch 10``
of 100: the prune runs at the start of epoch 10, after 9 epochs, and the same optimiser and learning-rate
schedule continue; structured pruning ranks per-filter L2 norms of W_eff of the conv layers globally and
caps each layer's cut at all but one filter.

Budget: one adversarial training run of ``ctx.budget_epochs`` epochs with the preset's dense-training
recipe (``preset.dense_train``: attack, lr, weight decay) under one cosine schedule, the prune applied
after step round(0.09 * steps) from an ``on_step`` hook: the repo's 9 dense epochs of 100; as in the
repo, the optimiser state and the schedule run on through the prune.

Deviations and why:
* twin scale: the repo's networks put BatchNorm after every conv, so the scale of W * A does not matter
  there. The product of two U(-1/sqrt(fan_in), 1/sqrt(fan_in)) factors is sqrt(3 fan_in) times smaller
  than a default weight (70x for the SmallCNN's fc1), and stacked layers without BatchNorm after them (the
  SmallCNN; VGG16's three-layer Linear head) then start at the constant-prediction saddle: with the
  repo's init, the quick recipe on 5000 Fashion-MNIST points kept the loss at 2.30 and 10% accuracy for
  280 steps. So W and A, drawn as in the repo, are both multiplied by (3 fan_in)^(1/4): still balanced
  (one law for both, which the implicit L1 regulariser needs) and W_eff starts at the default init's scale;
  the whole method on the same data then reached 69% clean / 48% PGD-10 accuracy at 90% weights (500 test
  points). Applied to every layer, BatchNorm or not, to keep one rule.
* channels: the repo's structured mode (``ChannelConv``) mixes the *output* filters, W_eff = A W with A
  [C_out, C_out], and zeros whole filters of the conv layers. Our ``channels`` structure counts the
  *input* channels of every Conv2d/Linear but the first (see :mod:`pytest_advprune.sparsity`), Linear
  columns included. So the same construction is applied to the counted unit: A [C_in, C_in] mixes the
  input channels (W_eff = W x_1 A; its scale is W's / sqrt(3) whatever C_in, so no rescaling), the implicit
  regulariser then acts across input channels, and the cut ranks input-channel norms of W_eff over every
  counted layer, Linear included (the repo leaves Linear layers unpruned in this mode). The first layer is
  not reparameterised: it is never pruned, and mixing its 1-3 image channels is degenerate (for grey
  images A is one random scalar, 0.0075 at seed 0, which all but switched conv1 off). Computing W_eff of a
  wide Linear costs C_out * C_in^2 per forward (the SmallCNN's fc1: 128 * 1568^2, about 315M MACs), which
  nearly doubles a CPU training step; the same 5000-point run reached 76% clean / 58% PGD-10 at 50%.
* the global cut removes exactly round(s * N) units (the counting rule); for channels each layer's
  strongest unit is kept out of the ranking, so the at-least-one rule moves the cut to other layers
  instead of leaving the total below target as the repo's per-layer cap does.
* weight decay is the preset's (5e-4 for every preset) instead of the repo's 2e-4, as every method's dense
  training here; the repo's piecewise lr (x0.1 at 70%, x0.01 at 85%) is the engine's cosine decay.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import Masks, make_masks, prunable_layers, structured_layers, unit_norms

PRUNE_AT = 0.09  # share of the training steps before the prune (repo: start of epoch 10 of 100)


def _kaiming(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> nn.Parameter:
    """``scale`` * kaiming_uniform_(a=sqrt(5)) (the repo's twin init), drawn on the CPU from ``generator``."""
    a = torch.empty(shape)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return nn.Parameter((scale * a).to(like.device, like.dtype))


class Twin(nn.Module):
    """Parametrisation W -> W * A * M (repo ``TwinConv``/``TwinLinear``): ``twin`` A and the ``mask`` M
    have W's shape. A is drawn like W's default init and scaled by ``scale``."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator, scale: float = 1.0):
        super().__init__()
        self.twin = _kaiming(tuple(weight.shape), weight, generator, scale)
        self.register_buffer("mask", torch.ones_like(weight))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.twin * self.mask


class ChannelMix(nn.Module):
    """Parametrisation W -> (W x_1 A) * M: W_eff[:, p] = sum_q A[p, q] W[:, q], ``twin`` A of shape
    [C_in, C_in] (the input-channel analogue of the repo's ``ChannelConv``, which mixes output filters);
    ``mask`` M has W's shape. Works for Conv2d ([C_out, C_in, k, k]) and Linear ([out, in]) weights."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.twin = _kaiming((weight.shape[1], weight.shape[1]), weight, generator)
        self.register_buffer("mask", torch.ones_like(weight))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pq,oq...->op...", self.twin, weight) * self.mask


def balanced_scale(weight: torch.Tensor) -> float:
    """(3 fan_in)^(1/4): W and A drawn from the repo's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and both multiplied
    by it give W * A the standard deviation of the default init, 1/sqrt(3 fan_in)."""
    return (3 * weight[0].numel()) ** 0.25


def reparameterise(model: nn.Module, structure: str, seed: int) -> dict[str, nn.Module]:
    """Reparameterise ``model``'s Conv2d/Linear weights in place, twins drawn from ``seed``: a :class:`Twin`
    on every layer (``weights``; W and A both scaled by :func:`balanced_scale`), or a :class:`ChannelMix`
    on every layer whose input channels are counted (``channels``: all but the first). Returns the
    parametrisations by layer name; afterwards ``layer.weight`` is W_eff and W is
    ``layer.parametrizations.weight.original``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in structured_layers(model, structure).items():
        if structure == "weights":
            scale = balanced_scale(layer.weight)
            with torch.no_grad():
                layer.weight.mul_(scale)
            out[name] = Twin(layer.weight.detach(), generator, scale)
        else:
            out[name] = ChannelMix(layer.weight.detach(), generator)
        parametrize.register_parametrization(layer, "weight", out[name])
    return out


@torch.no_grad()
def global_prune_masks(model: nn.Module, structure: str, sparsity: float) -> Masks:
    """Weight-shaped masks of one global cut of the effective weights (``layer.weight``): the
    round(sparsity * N) smallest |W_eff| (``weights``), or input channels of smallest L2 norm of W_eff
    (``channels``) with every layer's strongest channel kept (repo ``structured_pruning``)."""
    if structure == "weights":
        return make_masks(model, structure, sparsity, scope="global")
    scores = {}
    for name, layer in structured_layers(model, structure).items():
        norms = unit_norms(layer.weight, structure)
        norms[norms.argmax()] = math.inf
        scores[name] = norms
    return make_masks(model, structure, sparsity, scores=scores, scope="global")


def bake(model: nn.Module) -> None:
    """Replace every reparameterised weight by its W_eff (mask included) as a plain parameter; the twins
    and masks go with the parametrisations."""
    for layer in prunable_layers(model).values():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


@register
class TwinRep(Method):
    name = "twinrep"
    taxonomy = Taxonomy(
        paper="Li et al., AAAI 2023",
        pipeline=Pipeline.DURING,
        step1="-",
        step2="AT (PGD)",
        schedule=Schedule.NONE,
        locality=Locality.GLOBAL,
        criterion=Criterion.RELWM,
        repository="UCAS-LCH/Twin-Rep",
    )
    structures = ("weights", "channels")

    def prune(self, ctx):
        model = ctx.fresh_model()
        twins = reparameterise(model, ctx.structure, ctx.seed)

        def prune_once(step: int, total: int) -> None:
            if step == max(1, round(PRUNE_AT * total)):
                for name, mask in global_prune_masks(model, ctx.structure, ctx.sparsity).items():
                    twins[name].mask.copy_(mask)
                ctx.log(f"twinrep: pruned {ctx.sparsity:.0%} of the {ctx.structure} at step {step}/{total}")

        spec = ctx.preset.dense_train.with_(epochs=ctx.budget_epochs)
        ctx.train(model, spec, "twinrep adversarial training", on_step=prune_once)
        bake(model)
        return model
