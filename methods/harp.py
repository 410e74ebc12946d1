"""HARP — Zhao & Wressnegger, ICLR 2023: "Holistic Adversarially Robust Pruning".

Algorithm (paper; facts from intellisec/harp):
  1. start from the adversarially pretrained dense network (the preset's cached dense model);
  2. give every pruned layer l importance scores s_l and one learnable rate logit r_l, with keep rate
     k_l = sigmoid(r_l) * (1 - k_min) + k_min,  k_min = 0.1 * k_target  (``rate_act_func``, alpha 0.1),
     so no layer can fall below k_min; every k_l starts at k_target;
  3. mask: the top-round(k_l * n_l) units of |s_l| in layer l; straight-through backward (``GetSubnet``):
     dL/d|s_l| = dL/dm_l and dL/dk_l = sum of dL/dm_l over the layer, chained to r_l through the sigmoid;
  4. prune phase: weights frozen, scores and rates (and BatchNorm) optimised jointly on
     L = L_adv(w * m(s, k(r))) + gamma_t * L_hw,  L_hw = max(0, (sum_l n_l k_l / sum_l n_l) / k_target - 1)
     (``utils/hw.py::hw_loss``): one global budget, so the learned layer rates can differ widely;
  5. dynamic gamma: gamma_t = (t + 1) * gamma while the budget is unmet, frozen at its current value once
     L_hw rounds to 0 at the end of a period t (``train.py``, ``frozen_gamma``);
  6. fine-tune phase: mask fixed, train the surviving weights under the same adversarial loss.
Units: weights (``weights``) or input channels of every layer but the first (``channels``, per the
counting rule of :mod:`pytest_advprune.sparsity`).

Facts from the repo: all Conv2d/Linear layers are pruned; weight scores use HYDRA's scaled init, channel
scores sqrt(6 / C_in) * L1 / max L1 of each input channel's weights (the repo reshapes the weight to
[C_in, -1] without transposing; we take the true per-channel L1); weight mode prunes int((1 - k) n) (we
round, as the counting rule); the top-k runs on |s|, so the scores get sign(s) * dL/dm; weight decay
(5e-4) also acts on scores and rate logits; BatchNorm trains in the prune phase; the default rate
strategy ``010_uni`` starts every layer at 0.1 kept, i.e. uniform at the 90% target — starting uniform
at k_target is the same idea for every target.

Deviations and why:
* gamma grows per 1/10 of the prune phase (per epoch when the phase has 10 or more epochs, as the repo):
  a preset's prune phase may be a single epoch, where per-epoch growth would never take effect.
* ``channels``: the budget is the same hinge with n_l = the layer's input channels (the counted units),
  not the repo's FLOPs analogue (``hw_flops_loss``), so the learned rates meet the counted channel sparsity.
  ResNet shortcuts learn their own rate (the repo copies the block's rate, ``map_shortcut_rate``).
* bake (our addition): the learned per-layer counts round(k_l * n_l) are fitted to exactly the global
  target. Over budget (the repo's checkpoints may miss it), the kept units above each layer's k_min
  floor shrink in proportion; under budget (the hinge with momentum overshoots, by about 1% of k_target
  in a one-epoch phase), the pruned units shrink in proportion. The conformance suite checks the achieved
  sparsity, and every method is compared at its nominal target.
* short phases learn only mildly non-uniform rates: the rates move as far as lr and steps allow (the
  repo runs 20 epochs at lr 0.1). From the quick preset's dense model with its prune budget on the first
  20k Fashion-MNIST points (157 steps, 90%), the layer keep rates spread from 0.087 to 0.144 around 0.1
  while gamma grew from 0.01 to 0.03 and froze.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import (
    expand_unit_mask, keep_mask, n_to_prune, scaled_score_init, structured_layers, unit_view,
)
from pytest_advprune.training import robust_loss

ALPHA = 0.1  # k_min = ALPHA * k_target (repo ``--alpha``)
GAMMA = 0.01  # base of the dynamic gamma (repo README, CIFAR-10 VGG16 weights; the repo's default arg is 1.0)
GAMMA_PERIODS = 10  # gamma grows at least 10 times over the prune phase


def keep_rate(logit: torch.Tensor, k_min: float) -> torch.Tensor:
    """k = sigmoid(r) * (1 - k_min) + k_min, in [k_min, 1] (repo ``rate_act_func``)."""
    return torch.sigmoid(logit) * (1 - k_min) + k_min


def rate_logit(k: float, k_min: float) -> torch.Tensor:
    """Inverse of :func:`keep_rate`; clipped below 1 - 1e-2 as the repo's ``rate_init_func`` does, so a
    target near k = 1 gives a finite logit (weight decay on an infinite one is NaN)."""
    return torch.logit(torch.tensor((k - k_min) / (1 - k_min)).clamp(max=1 - 1e-2))


def channel_score_init(layer: nn.Module) -> torch.Tensor:
    """Scores ``[C_in]``: sqrt(6 / C_in) * L1 / max L1 of each input channel's weights."""
    l1 = unit_view(layer.weight.detach(), "channels").abs().sum(dim=1)
    return math.sqrt(6.0 / l1.numel()) * l1 / l1.max().clamp_min(1e-12)


class TopKRate(torch.autograd.Function):
    """HARP's ``GetSubnet``: forward returns ``hard`` (bool top-k of ``scores``, computed by the caller so
    it can be cached) as a float mask; backward sends g to ``scores`` and sum(g) to the scalar ``k``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        return hard.to(scores.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, g.sum(), None


class RateMask(nn.Module):
    """Parametrisation ``w -> w * m`` with m the top-round(k * n) of |scores| and k = keep_rate(rate, k_min).

    ``scores`` has the weight's shape (``weights``) or ``[C_in]`` (``channels``, expanded over the weight).
    """

    def __init__(self, scores: torch.Tensor, structure: str, k_init: float, k_min: float):
        super().__init__()
        self.scores = nn.Parameter(scores.detach().clone())
        self.rate = nn.Parameter(rate_logit(k_init, k_min).to(scores.device))
        self.structure = structure
        self.k_min = k_min
        self._cached: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def units(self) -> int:
        return self.scores.numel()

    def keep(self) -> torch.Tensor:
        """k_l, a scalar with its graph to the rate logit."""
        return keep_rate(self.rate, self.k_min)

    def n_keep(self) -> int:
        return int(round(float(self.keep().detach()) * self.units))

    def hard_mask(self, n_keep: int) -> torch.Tensor:
        """Bool top-``n_keep`` of |scores|."""
        return keep_mask(self.scores.detach().abs(), self.units - n_keep)

    def unit_mask(self) -> torch.Tensor:
        # The top-k changes only when an optimiser step changes scores or rate: cache it across
        # the attack's forward passes of one step.
        key = (self.scores._version, self.rate._version)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.hard_mask(self.n_keep()))
        return TopKRate.apply(self.scores.abs(), self.keep(), self._cached[1])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.unit_mask()
        if self.structure == "channels":
            mask = expand_unit_mask(mask, weight, "channels")
        return weight * mask


def attach_rate_masks(model: nn.Module, structure: str, k_target: float) -> dict[str, RateMask]:
    """Put a :class:`RateMask` (rate initialised at ``k_target``) on every layer that ``structure``
    counts and freeze those layers' weights and biases. Returns the masks by layer name."""
    init = scaled_score_init if structure == "weights" else channel_score_init
    masks = {}
    for name, layer in structured_layers(model, structure).items():
        rm = RateMask(init(layer), structure, k_target, ALPHA * k_target)
        parametrize.register_parametrization(layer, "weight", rm)
        layer.parametrizations.weight.original.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        masks[name] = rm
    return masks


def kept_fraction(masks: dict[str, RateMask]) -> torch.Tensor:
    """sum_l n_l k_l / sum_l n_l, n_l = units of layer l: the global keep rate the rates imply."""
    units = sum(rm.units for rm in masks.values())
    return sum(rm.units * rm.keep() for rm in masks.values()) / units


def hw_loss(masks: dict[str, RateMask], k_target: float) -> torch.Tensor:
    """L_hw = max(0, kept_fraction / k_target - 1) (repo ``utils/hw.py::hw_loss``)."""
    return torch.relu(kept_fraction(masks) / k_target - 1)


class DynamicGamma:
    """gamma_t = base * (t + 1) in period t (0-based) of ``periods`` equal parts of the phase; frozen at
    its current value when L_hw (rounded to 4 decimals, as the repo) is 0 at the end of a period.
    After the last period :attr:`value` is the last one used."""

    def __init__(self, base: float, periods: int):
        self.base, self.periods = base, periods
        self.done = 0  # periods completed
        self.frozen: float | None = None

    @property
    def value(self) -> float:
        return self.frozen if self.frozen is not None else self.base * min(self.done + 1, self.periods)

    def update(self, step: int, total: int, hw: float) -> None:
        """After optimiser step ``step`` (1-based) of ``total``, with the current L_hw ``hw``."""
        done = step * self.periods // total
        if done > self.done:
            if self.frozen is None and round(hw, 4) == 0:
                self.frozen = self.value
            self.done = done


def _shrink(values: list[int], total: int) -> list[int]:
    """Integers proportional to ``values``, each at most its value, summing to ``total`` (<= sum)."""
    share = torch.tensor(values, dtype=torch.float64) * total / sum(values)
    whole = share.floor()
    whole[torch.argsort(share - whole, descending=True)[: total - int(whole.sum())]] += 1
    return [int(w) for w in whole]


def fit_budget(counts: list[int], floors: list[int], sizes: list[int], budget: int) -> list[int]:
    """Per-layer kept counts summing to exactly ``budget``, as close to the learned ``counts`` as the
    budget allows: over budget, the kept units above each layer's ``floors`` (k_min) shrink in
    proportion; under budget, the pruned units shrink in proportion (never above ``sizes``)."""
    if sum(counts) > budget:
        extra = _shrink([c - f for c, f in zip(counts, floors)], budget - sum(floors))
        return [f + e for f, e in zip(floors, extra)]
    if sum(counts) < budget:
        pruned = _shrink([n - c for n, c in zip(sizes, counts)], sum(sizes) - budget)
        return [n - p for n, p in zip(sizes, pruned)]
    return list(counts)


@torch.no_grad()
def bake(model: nn.Module, masks: dict[str, RateMask], sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the pruned weights at the learned counts fitted by :func:`fit_budget` to the global target
    ``sparsity``, remove the parametrisations, unfreeze the layers; returns weight-shaped float masks
    for fine-tuning. Every layer keeps at least one unit (at 99% k_min * n rounds to 0 in a small stem)."""
    layers = structured_layers(model, next(iter(masks.values())).structure)
    units = sum(rm.units for rm in masks.values())
    counts = fit_budget(
        [rm.n_keep() for rm in masks.values()],
        [max(1, int(round(rm.k_min * rm.units))) for rm in masks.values()],  # an emptied layer cuts the network
        [rm.units for rm in masks.values()],
        units - n_to_prune(units, sparsity),
    )
    out = {}
    for (name, rm), n in zip(masks.items(), counts):
        hard = rm.hard_mask(n)
        layer = layers[name]
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        w = layer.weight
        mask = hard.to(w.dtype) if rm.structure == "weights" else expand_unit_mask(hard, w, "channels")
        w.mul_(mask)
        w.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
        out[name] = mask
    return out


@register
class Harp(Method):
    name = "harp"
    taxonomy = Taxonomy(
        paper="Zhao & Wressnegger, ICLR 2023",
        pipeline=Pipeline.AFTER,
        step1="AT (TRADES)",
        step2="AT (TRADES)",
        schedule=Schedule.ONE_SHOT,
        locality=Locality.GLOBAL,
        criterion=Criterion.LIS,
        repository="intellisec/harp",
    )
    structures = ("weights", "channels")

    def prune(self, ctx):
        model = ctx.dense
        k_target = 1 - ctx.sparsity
        masks = attach_rate_masks(model, ctx.structure, k_target)
        spec = ctx.preset.prune_train.with_(loss="trades")
        gamma = DynamicGamma(GAMMA, max(GAMMA_PERIODS, math.ceil(spec.epochs)))

        def loss_fn(m, xb, yb, s):
            return robust_loss(m, xb, yb, s) + gamma.value * hw_loss(masks, k_target)

        def on_step(step, total):
            gamma.update(step, total, float(hw_loss(masks, k_target).detach()))

        batchnorm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        params = [p for rm in masks.values() for p in (rm.scores, rm.rate)] + batchnorm
        ctx.train(model, spec, "harp score and rate search", params=params, loss_fn=loss_fn, on_step=on_step)
        phase_kept = float(kept_fraction(masks).detach())
        fixed = bake(model, masks, ctx.sparsity)
        learned = ", ".join(f"{n} {1 - float(m.mean()):.3f}" for n, m in fixed.items())
        ctx.log(
            f"harp: phase ended at keep rate {phase_kept:.4f} (target {k_target:.4f}, gamma {gamma.value:g}); "
            f"learned layer sparsities {learned}"
        )
        ctx.train(model, ctx.preset.finetune.with_(loss="trades"), "harp fine-tune", masks=fixed, part=1)
        return model
