"""Dynamic sparse training (DST): a sparse topology drawn at random before training and changed by
prune-and-grow while the network trains, shared by Flying Bird and Flying Bird+ (Chen, Zhang, Liu,
Chang, Wang, "Sparsity Winning Twice: Better Robust Generalization from More Efficient Training",
ICLR 2022; repository VITA-Group/Sparsity-Win-Robust-Generalization, ``sparselearning/core.py``).

* Initial topology (:func:`igq_counts`, :func:`random_mask`): every prunable Conv2d/Linear (first
  conv and classifier included) keeps a number of weights given by the IGQ quotas of the repo's
  ``sparselearning/igq.py`` (its default ``--sparse_init igq``), at random positions.
* Topology update (:meth:`DynamicSparsity.update`): per layer, remove the ``ceil(r * nnz)``
  active weights of smallest magnitude and regrow as many at random among the positions that were
  inactive (``--death magnitude --growth random``); regrown weights start at zero. ``r`` is the
  death rate, 0.5 cosine-decayed to 0.005 over all optimiser steps (:func:`death_rate`).
* Schedule (:func:`update_steps`): every ``steps_per_epoch / UPDATES_PER_EPOCH`` optimiser steps in
  the first half of training and 4/3 of that in the second (the repo's ``--dynamic_fre``: 900, then
  1200 iterations).

The masks are handed to the training loop (``ctx.train(..., masks=dst.masks, on_step=dst.on_step)``),
whose :class:`~pytest_advprune.sparsity.MaskEnforcer` keeps the very same tensors (they live on the
weights' device), so the in-place updates of :meth:`DynamicSparsity.update` take effect at the next
optimiser step; a regrown weight's momentum is zero because the enforcer zeroed it while it was pruned.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .sparsity import Masks, n_to_prune, prunable_layers

DEATH_RATE = 0.5  # repo --death-rate
DEATH_RATE_MIN = 0.005  # eta_min of the repo's CosineDecay
UPDATES_PER_EPOCH = 2  # the repo updates every ~2.6 CIFAR epochs of 200; a budget of a few epochs needs more often
SECOND_HALF_PERIOD = 1200 / 900  # repo --dynamic_fre: --second_frequency / --update_frequency

# extras(step, total_steps) -> (prune_ratio, growth_ratio): Flying Bird+'s adaptive extra prune/grow.
Extras = Callable[[int, int], tuple[float, float]]


def igq_counts(sizes: list[int], sparsity: float) -> list[int]:
    """Weights kept per layer for layers of ``sizes`` weights at overall ``sparsity`` (fraction).

    IGQ quotas (repo ``sparselearning/igq.py``): layer l keeps ``N_l / (1 + f * N_l)``, with the
    force ``f`` found by bisection, so small layers stay denser. Rounded by largest remainder so the
    total is exactly ``sum(sizes) - round(sparsity * sum(sizes))`` (the repo stops at a tolerance).
    """
    total = sum(sizes)
    keep = total - n_to_prune(total, sparsity)
    if keep in (0, total):
        return [0 if keep == 0 else n for n in sizes]

    def kept(force: float) -> float:
        return sum(n / (1 + force * n) for n in sizes)

    lo, hi = 0.0, len(sizes) / keep  # kept(f) < len(sizes) / f, so kept(hi) < keep <= kept(lo)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) > keep else (lo, mid)
    quotas = [n / (1 + lo * n) for n in sizes]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: keep - sum(counts)]:
        counts[i] += 1
    return counts


def random_mask(weight: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """A float mask of ``weight``'s shape, dtype and device with exactly ``keep`` ones at uniformly random positions."""
    mask = torch.zeros(weight.numel(), dtype=weight.dtype)
    mask[torch.randperm(weight.numel(), generator=generator)[:keep]] = 1
    return mask.view_as(weight).to(weight.device)


def death_rate(step: int, total_steps: int, initial: float = DEATH_RATE, final: float = DEATH_RATE_MIN) -> float:
    """Fraction of a layer's active weights replaced at optimiser step ``step`` of ``total_steps``:
    cosine decay from ``initial`` to ``final`` (the repo's ``CosineDecay``, stepped every iteration)."""
    return final + (initial - final) * (1 + math.cos(math.pi * step / total_steps)) / 2


def update_steps(total_steps: int, steps_per_epoch: int, per_epoch: int = UPDATES_PER_EPOCH) -> list[int]:
    """The 1-based optimiser steps after which the topology changes: every ``steps_per_epoch /
    per_epoch`` steps in the first half of training, :data:`SECOND_HALF_PERIOD` times that in the
    second; never after the last step, so every regrown weight trains at least one step."""
    first = max(1, round(steps_per_epoch / per_epoch))
    second = max(1, round(first * SECOND_HALF_PERIOD))
    steps, s = [], first
    while s < total_steps:
        steps.append(s)
        s += first if s < total_steps / 2 else second
    return steps


def prune_and_grow(
    weight: torch.Tensor, mask: torch.Tensor, n_prune: int, n_grow: int, generator: torch.Generator
) -> torch.Tensor:
    """A new mask (shape and dtype of ``mask``): the ``n_prune`` active weights of smallest ``|w|``
    removed, ``n_grow`` positions that were inactive in ``mask`` added at random.

    Raises ValueError if there are fewer than ``n_prune`` active or ``n_grow`` inactive positions.
    """
    flat = mask.flatten()
    active = (flat != 0).nonzero().squeeze(1)
    inactive = (flat == 0).nonzero().squeeze(1)
    if n_prune > len(active) or n_grow > len(inactive):
        raise ValueError(f"cannot prune {n_prune} of {len(active)} active and grow {n_grow} of {len(inactive)} inactive weights")
    magnitude = weight.detach().flatten()[active].abs()
    removed = active[torch.topk(magnitude, n_prune, largest=False).indices]
    grown = inactive[torch.randperm(len(inactive), generator=generator)[:n_grow].to(inactive.device)]
    new = flat.clone()
    new[removed] = 0
    new[grown] = 1
    return new.view_as(mask)


class DynamicSparsity:
    """The changing sparse topology of ``model`` at ``sparsity`` (fraction of all prunable weights).

    ``masks`` (layer name -> float mask on the weight's device) start as :func:`igq_counts` random
    masks; ``quota`` holds each layer's initial count, which no update exceeds. ``steps_per_epoch``
    sets the update period (:func:`update_steps`); ``extras`` (Flying Bird+) returns the extra
    prune/grow ratios at an update; ``seed`` fixes the initial positions and the regrowth draws.
    """

    def __init__(self, model: nn.Module, sparsity: float, steps_per_epoch: int, seed: int,
                 log: Callable[[str], None] = lambda s: None, extras: Extras | None = None):
        self.layers = prunable_layers(model)
        self.generator = torch.Generator().manual_seed(seed)
        counts = igq_counts([m.weight.numel() for m in self.layers.values()], sparsity)
        self.quota = dict(zip(self.layers, counts))
        self.masks: Masks = {n: random_mask(m.weight, self.quota[n], self.generator) for n, m in self.layers.items()}
        self.steps_per_epoch, self.log, self.extras = steps_per_epoch, log, extras
        self._schedule: tuple[int, set[int]] = (-1, set())

    def active(self) -> int:
        """Active (unmasked) weights over all layers."""
        return sum(int(m.sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        """Fraction of prunable weights currently masked."""
        total = sum(m.numel() for m in self.masks.values())
        return 1 - self.active() / total

    @torch.no_grad()
    def update(self, rate: float, prune_ratio: float = 0.0, growth_ratio: float = 0.0) -> tuple[int, int]:
        """One prune-and-grow step in every layer; returns ``(removed, grown)`` weights in total.

        Per layer with ``nnz`` active and ``free`` inactive weights: ``death = min(ceil(rate * nnz),
        free)`` removed by magnitude and regrown at random (a dense layer is left alone, as in the
        repo); Flying Bird+ removes ``ceil(rate * prune_ratio * nnz)`` more and grows
        ``int(growth_ratio * death)`` more, the growth capped at the layer's initial quota. Removed
        weights are zeroed now, so the next forward already uses the new topology.
        """
        removed = grown = 0
        for n, layer in self.layers.items():
            mask = self.masks[n]
            nnz = int(mask.sum())
            free = mask.numel() - nnz
            if free == 0:  # a dense layer is left alone, as in the repo's magnitude_death
                continue
            death = min(math.ceil(rate * nnz), free)
            extra_prune = min(math.ceil(rate * prune_ratio * nnz), nnz - death)
            extra_grow = min(int(growth_ratio * death), self.quota[n] - nnz + extra_prune, free - death)
            mask.copy_(prune_and_grow(layer.weight, mask, death + extra_prune, death + extra_grow, self.generator))
            layer.weight.mul_(mask)
            removed, grown = removed + death + extra_prune, grown + death + extra_grow
        return removed, grown

    def on_step(self, step: int, total_steps: int) -> None:
        """The training loop's ``on_step``: update the topology at the steps of :func:`update_steps`."""
        if self._schedule[0] != total_steps:
            self._schedule = (total_steps, set(update_steps(total_steps, self.steps_per_epoch)))
        if step not in self._schedule[1]:
            return
        rate = death_rate(step, total_steps)
        prune_ratio, growth_ratio = self.extras(step, total_steps) if self.extras else (0.0, 0.0)
        removed, grown = self.update(rate, prune_ratio, growth_ratio)
        self.log(f"step {step}/{total_steps}: death rate {rate:.3f}, removed {removed}, regrown {grown}, "
                 f"sparsity {self.sparsity():.4%}")
