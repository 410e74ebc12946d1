"""ADMM for training under a sparsity constraint, shared by R-ADMM and PwoA.

Problem: minimise L(W) subject to W_l in S_l, where S_l holds the tensors of layer l with at most
``(1 - sparsity)`` of their weights (or filters, or channels) non-zero. ADMM (Boyd et al. 2011;
for pruning Zhang et al., ECCV 2018, eq. 3-7) splits it with an auxiliary Z_l and a scaled dual U_l:

* W-step (every optimiser step): minimise L(W) + sum_l rho/2 ||W_l - Z_l + U_l||_F^2  (:meth:`ADMM.penalty`);
* Z-step (every few epochs): Z_l <- Proj_S_l(W_l + U_l), the Euclidean projection: keep the
  largest-magnitude weights (or largest-L2 filters/channels) of the layer  (:meth:`ADMM.update`);
* U-step: U_l <- U_l + W_l - Z_l; then rho <- rho * growth ("multi-rho" in both reference codes)
  and U_l <- U_l / growth, so the unscaled dual rho * U_l is unchanged by the new rho (Boyd et al.
  2011, Sec. 3.4.1). The reference codes skip this rescaling, which is harmless at their
  lr * rho of about 1e-5; with rho scaled to a short budget (:func:`rho_for_budget`) the dual then
  grows 1.3x per update on top of its own increments and PwoA's 90%-filters run on ``quick``
  diverged (max |w| 1.2 -> 1.2e5 over two updates); with it, W reaches the sparse set (relative
  residual 0.017 after 16 updates).

After the last update, W is hard-pruned with the same projection (:meth:`ADMM.hard_prune_masks`) and
retrained under the fixed mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sparsity import Masks, make_masks, structured_layers, unit_norms


# SGD with momentum 0.9 on the quadratic penalty is stable while lr * rho * (1 / (1 - 0.9)) stays
# well under 2; keeping lr * rho <= 0.1 at the last update leaves a factor-2 margin.
MAX_LR_RHO = 0.1


def rho_for_budget(total_pull: float, lr: float, steps: int, updates: int, growth: float) -> float:
    """Initial rho giving the penalty the same total pull on W as a reference schedule.

    One SGD step on rho/2 ||W - Z + U||^2 moves W toward Z - U by a fraction lr * rho; over a phase
    of ``steps`` steps whose cosine learning rate averages ``lr / 2``, split into ``updates``
    segments with rho growing by ``growth`` per segment, the summed fraction is
    ``rho * lr / 2 * steps / updates * sum_k growth^k``. Returns the rho that makes it ``total_pull``,
    so a short budget still moves W as far toward the sparse set as the paper's long one did,
    capped so that the last segment's ``lr * rho`` stays at most :data:`MAX_LR_RHO` (a larger
    value makes the penalty's own SGD dynamics diverge on very short budgets).
    Raises ValueError if ``lr``, ``steps`` or ``updates`` is not positive.
    """
    if min(lr, steps, updates) <= 0:
        raise ValueError("lr, steps and updates must be positive")
    growth_sum = sum(growth**k for k in range(updates))
    rho = total_pull / (lr / 2 * steps / updates * growth_sum)
    return min(rho, MAX_LR_RHO / lr / growth ** (updates - 1))


class ADMM:
    """State of ADMM pruning for the layers that ``structure`` prunes (see :mod:`pytest_advprune.sparsity`).

    ``sparsity`` is the per-layer fraction removed (both reference codes prune layer by layer);
    ``rho`` the initial penalty, multiplied by ``growth`` at each :meth:`update`.
    At creation Z = Proj(W) and U = 0, as in both reference codes.
    """

    def __init__(self, model: nn.Module, structure: str, sparsity: float, rho: float, growth: float = 1.3):
        self.model, self.structure, self.sparsity = model, structure, sparsity
        self.rho, self.growth = rho, growth
        self.layers = structured_layers(model, structure)
        weights = {n: m.weight.detach() for n, m in self.layers.items()}
        self.Z = self.project(weights)
        self.U = {n: torch.zeros_like(w) for n, w in weights.items()}

    def project(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Euclidean projection of each layer's tensor onto its sparse set: the tensor times its top-k mask."""
        masks = make_masks(self.model, self.structure, self.sparsity, scores=self._scores(tensors), scope="local")
        return {n: t * masks[n] for n, t in tensors.items()}

    def _scores(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.structure == "weights":
            return {n: t.abs() for n, t in tensors.items()}
        return {n: unit_norms(t, self.structure) for n, t in tensors.items()}

    def penalty(self) -> torch.Tensor:
        """sum_l rho/2 ||W_l - Z_l + U_l||_F^2, differentiable in W (a scalar)."""
        terms = [(m.weight - self.Z[n] + self.U[n]).pow(2).sum() for n, m in self.layers.items()]
        return self.rho / 2 * torch.stack(terms).sum()

    @torch.no_grad()
    def update(self) -> None:
        """Z-step, U-step, then rho *= growth with U /= growth (the unscaled dual rho * U is kept)."""
        w_plus_u = {n: m.weight.detach() + self.U[n] for n, m in self.layers.items()}
        self.Z = self.project(w_plus_u)
        for n, m in self.layers.items():
            self.U[n] += m.weight.detach() - self.Z[n]
        self.rho *= self.growth
        for u in self.U.values():
            u /= self.growth

    @torch.no_grad()
    def primal_residual(self) -> float:
        """||W - Z|| / ||W|| over all layers: how far W still is from the sparse set (0 = feasible)."""
        diff = sum(float((m.weight - self.Z[n]).pow(2).sum()) for n, m in self.layers.items())
        norm = sum(float(m.weight.pow(2).sum()) for m in self.layers.values())
        return math.sqrt(diff / max(norm, 1e-30))

    def hard_prune_masks(self) -> Masks:
        """Masks of the final hard prune: the projection of the current W (largest magnitudes kept)."""
        return make_masks(self.model, self.structure, self.sparsity, scores=self._scores(
            {n: m.weight.detach() for n, m in self.layers.items()}), scope="local")
