"""Masks: making, applying, enforcing through optimiser steps, counting, exporting.

The counting rule, stated once and used by the tests, the report and the methods:

* Prunable layers are every ``nn.Conv2d`` and ``nn.Linear`` of the model, first conv and last
  linear included (as the survey's HYDRA/HARP/FlyingBird models do). Biases, BatchNorm and the
  in-model normalisation are never pruned and are in neither numerator nor denominator.
* ``weights`` (unstructured) sparsity = zero weights / all weights of the prunable layers.
* ``filters`` sparsity = all-zero output filters (``weight[o]``; rows of a Linear) / all filters,
  over the prunable layers except the last one (its outputs are the classes).
* ``channels`` sparsity = all-zero input channels (``weight[:, i]``; columns of a Linear) / all
  channels, over the prunable layers except the first one (its inputs are the image channels).
* Sparsity is a fraction in [0, 1] everywhere in the engine; cells and reports show percent.
* A target ``s`` on ``n`` elements prunes ``round(s * n)`` of them, so a mask is within half an
  element of the target per layer (local) or in total (global).

Score-based methods (HYDRA, HARP, RST) keep dense weights plus scores; :func:`attach_score_masks`
puts the top-k mask in the forward pass and :func:`bake_score_masks` turns it into zeros, so the
effective weights of the forward pass are what is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

STRUCTURES = ("weights", "filters", "channels")
Masks = dict[str, torch.Tensor]


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def structured_layers(model: nn.Module, structure: str) -> dict[str, nn.Module]:
    """The layers whose units count for ``structure`` (see the module's counting rule).

    Raises ValueError for a structure outside :data:`STRUCTURES`.
    """
    layers = prunable_layers(model)
    names = list(layers)
    if structure == "weights":
        return layers
    if structure == "filters":
        return {n: layers[n] for n in names[:-1]}
    if structure == "channels":
        return {n: layers[n] for n in names[1:]}
    raise ValueError(f"unknown structure {structure!r}; use one of {', '.join(STRUCTURES)}")


def unit_view(weight: torch.Tensor, structure: str) -> torch.Tensor:
    """``weight`` reshaped to ``[units, elements per unit]`` (filters: dim 0; channels: dim 1)."""
    if structure == "filters":
        return weight.flatten(1)
    if structure == "channels":
        return weight.transpose(0, 1).flatten(1)
    raise ValueError(f"structure {structure!r} has no units")


def unit_norms(weight: torch.Tensor, structure: str) -> torch.Tensor:
    """L2 norm of every filter or channel of ``weight``: shape ``[units]``."""
    return unit_view(weight.detach(), structure).norm(dim=1)


def expand_unit_mask(unit_mask: torch.Tensor, weight: torch.Tensor, structure: str) -> torch.Tensor:
    """A per-unit mask ``[units]`` broadcast to ``weight``'s shape."""
    shape = [1] * weight.dim()
    dim = 0 if structure == "filters" else 1
    shape[dim] = -1
    return unit_mask.view(shape).expand_as(weight).to(weight.dtype).contiguous()


def n_to_prune(n: int, sparsity: float) -> int:
    """How many of ``n`` elements a target ``sparsity`` (fraction) removes: ``round(sparsity * n)``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}")
    return int(round(sparsity * n))


def keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape that drops exactly ``n_prune`` lowest scores (ties broken arbitrarily)."""
    flat = scores.detach().flatten()
    n_keep = flat.numel() - n_prune
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    return keep.view_as(scores)


def local_keep(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Per-layer top-k: each tensor of ``scores`` loses ``round(sparsity * numel)`` lowest entries."""
    return {n: keep_mask(s, n_to_prune(s.numel(), sparsity)) for n, s in scores.items()}


def global_keep(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking across all tensors of ``scores``: ``round(sparsity * total)`` lowest entries dropped."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    keep = keep_mask(flat, n_to_prune(flat.numel(), sparsity))
    out, start = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[start : start + k].view_as(scores[n]).to(scores[n].device)
        start += k
    return out


def make_masks(
    model: nn.Module,
    structure: str,
    sparsity: float,
    scores: dict[str, torch.Tensor] | None = None,
    scope: str = "local",
) -> Masks:
    """Weight-shaped float masks (1 keep, 0 prune) for every layer that ``structure`` prunes.

    ``scores`` (higher = keep) default to ``|w|`` for ``weights`` and to the L2 norm of each
    unit for ``filters``/``channels``; for structured pruning they have shape ``[units]``.
    ``scope`` is ``local`` (same fraction in every layer) or ``global`` (one ranking).
    """
    layers = structured_layers(model, structure)
    if scores is None:
        if structure == "weights":
            scores = {n: m.weight.detach().abs() for n, m in layers.items()}
        else:
            scores = {n: unit_norms(m.weight, structure) for n, m in layers.items()}
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    keep = (local_keep if scope == "local" else global_keep)(scores, sparsity)
    masks: Masks = {}
    for n, m in layers.items():
        w = m.weight
        masks[n] = keep[n].to(w.dtype) if structure == "weights" else expand_unit_mask(keep[n], w, structure)
    return masks


def masks_from_model(model: nn.Module) -> Masks:
    """Masks of the non-zero weights of every prunable layer (to fine-tune an already pruned model)."""
    return {n: (m.weight.detach() != 0).to(m.weight.dtype) for n, m in prunable_layers(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place (``weight *= mask``)."""
    layers = prunable_layers(model)
    for n, mask in masks.items():
        layers[n].weight.mul_(mask.to(layers[n].weight.device))


class MaskEnforcer:
    """Keeps pruned weights exactly zero through optimiser steps, momentum and weight decay included.

    Registered as an optimiser step post-hook, so no per-forward hook is needed: after every
    ``step()`` the masked weights and their momentum buffers are multiplied by the mask.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, masks: Masks):
        layers = prunable_layers(model)
        self.pairs = [(layers[n].weight, m.to(layers[n].weight.device)) for n, m in masks.items()]
        self.optimizer = optimizer
        apply_masks(model, masks)
        self.handle = optimizer.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        # one multi-tensor multiply for all layers (few kernel launches on a GPU; the same
        # elementwise products as one mul_ per tensor)
        tensors, masks = [], []
        for w, mask in self.pairs:
            tensors.append(w)
            masks.append(mask)
            state = optimizer.state.get(w, {})
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors.append(state[key])
                    masks.append(mask)
        if tensors:
            torch._foreach_mul_(tensors, masks)

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class SparsityReport:
    """Measured sparsity of a model (fractions in [0, 1]).

    ``sparsity`` is the figure compared with a target of this ``structure``: weight sparsity for
    ``weights``/``dense``, unit sparsity for ``filters``/``channels``. ``per_layer`` maps a layer
    to ``(zero, total)`` counts of the structure's elements.
    """

    structure: str
    sparsity: float
    weight_sparsity: float
    n_weights: int
    n_zero_weights: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)
    layers_counted: list[str] = field(default_factory=list)


@torch.no_grad()
def measure(model: nn.Module, structure: str) -> SparsityReport:
    """Count the sparsity of ``model``'s effective weights under the module's counting rule.

    Score-masked layers are counted on their effective (masked) weights. Zeros are counted
    exactly, in the stored dtype (no cast that could turn tiny weights into zeros).
    """
    layers = prunable_layers(model)
    n_weights = sum(m.weight.numel() for m in layers.values())
    n_zero = sum(int((m.weight == 0).sum()) for m in layers.values())
    weight_sparsity = n_zero / n_weights if n_weights else 0.0
    if structure in ("weights", "dense"):
        per_layer = {n: (int((m.weight == 0).sum()), m.weight.numel()) for n, m in layers.items()}
        return SparsityReport(structure, weight_sparsity, weight_sparsity, n_weights, n_zero, per_layer, list(layers))
    counted = structured_layers(model, structure)
    per_layer = {}
    for n, m in counted.items():
        units = unit_view(m.weight, structure)
        per_layer[n] = (int((units == 0).all(dim=1).sum()), units.shape[0])
    zero_units = sum(z for z, _ in per_layer.values())
    total_units = sum(t for _, t in per_layer.values())
    return SparsityReport(
        structure, zero_units / total_units, weight_sparsity, n_weights, n_zero, per_layer, list(counted)
    )


# ------------------------------------------------------------------ score masks (edge-popup)


def scaled_score_init(layer: nn.Module) -> torch.Tensor:
    """Scores proportional to the weights: s = sqrt(6 / fan_in) * w / max|w|, weight-shaped
    (HYDRA's ``initialize_scaled_score``, Sehwag et al. 2020 Sec. 3.3; reused by HARP)."""
    w = layer.weight.detach()
    return math.sqrt(6.0 / w[0].numel()) * w / w.abs().max().clamp_min(1e-12)


class ScoreMask(nn.Module):
    """Parametrisation ``w -> w * m(s)`` with ``m`` the per-layer top-k of ``|s|`` (Ramanujan et al.
    2020, "What's hidden in a randomly weighted network?"; used by HYDRA, HARP and RST).

    ``scores`` has the weight's shape; ``sparsity`` is the fraction of this layer removed.
    """

    def __init__(self, scores: torch.Tensor, sparsity: float):
        super().__init__()
        self.scores = nn.Parameter(scores.detach().clone())
        self.sparsity = sparsity
        self._cached: tuple[int, torch.Tensor] | None = None

    def mask(self) -> torch.Tensor:
        """Top-k of |scores| in the forward; in the backward the straight-through estimator passes
        dL/dm to |s|, so s receives sign(s) * dL/dm (the reference codes feed ``scores.abs()`` to
        their top-k function). The top-k is recomputed only when the scores change."""
        version = self.scores._version
        if self._cached is None or self._cached[0] != version:
            n_prune = n_to_prune(self.scores.numel(), self.sparsity)
            self._cached = (version, keep_mask(self.scores.detach().abs(), n_prune).to(self.scores.dtype))
        magnitude = self.scores.abs()
        return self._cached[1] + (magnitude - magnitude.detach())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


def attach_score_masks(
    model: nn.Module,
    sparsity: float,
    init: Callable[[nn.Module], torch.Tensor],
    layers: Iterable[str] | None = None,
) -> list[nn.Parameter]:
    """Put a :class:`ScoreMask` on the weight of each prunable layer (or of ``layers``) and
    freeze the weights and biases of those layers. ``init(layer)`` returns the initial scores
    (weight-shaped). Returns the score parameters, to hand to an optimiser.
    """
    all_layers = prunable_layers(model)
    names = list(layers) if layers is not None else list(all_layers)
    scores = []
    for n in names:
        m = all_layers[n]
        sm = ScoreMask(init(m), sparsity)
        parametrize.register_parametrization(m, "weight", sm)
        m.parametrizations.weight.original.requires_grad_(False)
        if getattr(m, "bias", None) is not None:
            m.bias.requires_grad_(False)
        scores.append(sm.scores)
    return scores


def score_mask_layers(model: nn.Module) -> dict[str, ScoreMask]:
    """The :class:`ScoreMask` of every score-masked layer, by layer name."""
    out = {}
    for n, m in prunable_layers(model).items():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, ScoreMask):
                    out[n] = p
    return out


@torch.no_grad()
def bake_score_masks(model: nn.Module) -> Masks:
    """Replace every score-masked weight by its effective weight ``w * m`` (zeros baked in),
    unfreeze it, and return the masks, ready for fine-tuning under a fixed mask."""
    masks = {}
    for n, sm in score_mask_layers(model).items():
        m = prunable_layers(model)[n]
        masks[n] = sm.mask().detach().clone()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        m.weight.requires_grad_(True)
        if getattr(m, "bias", None) is not None:
            m.bias.requires_grad_(True)
    return masks


@torch.no_grad()
def fold_reparametrizations(model: nn.Module) -> nn.Module:
    """Replace, in place, every re-parametrised tensor of ``model`` by the tensor its forward pass uses,
    and return ``model``: ``torch.nn.utils.prune`` hooks (``<p>_orig * <p>_mask``) and
    ``torch.nn.utils.parametrize`` parametrisations (score masks included). What the model computes
    is unchanged; afterwards :func:`dense_state_dict` holds plain weights with the pruned ones as zeros."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(m, hook._tensor_name)
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return model


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state_dict (no masks, no scores) with pruned weights as zeros; tensors on CPU, contiguous.

    Raises ValueError if the model still carries a parametrisation (score masks: bake them first).
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("model still has parametrised weights (score masks); bake them into plain weights first (fold_reparametrizations)")
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
