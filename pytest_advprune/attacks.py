"""Attacks in the L-inf threat model, eps in [0, 1] pixel scale.

* :func:`pgd` — projected gradient descent (Madry et al., ICLR 2018, eq. 2), used for adversarial
  training and as a reference evaluation attack.
* :func:`trades_example` — the inner maximisation of TRADES (Zhang et al., ICML 2019, eq. 5):
  maximise KL(p(x) || p(x')) in the eps-ball.
* :func:`run_autoattack` — AutoAttack (Croce & Hein, ICML 2020) through the ``pyautoattack``
  package, run attack by attack as its cascade does, so each attack's effect is kept per point.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """L-inf PGD on the cross-entropy loss; returns ``x_adv`` (same shape as ``x``, in [0, 1]).

    ``eps`` and ``step_size`` are in pixel scale. With ``steps=1``, ``random_start=True`` and
    ``step_size=1.25*eps`` this is FGSM with random start (Wong et al., ICLR 2020).
    The model's train/eval mode is left as the caller set it; parameter gradients are untouched.
    """
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp_(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step_size * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp_(0, 1) - x)
    return (x + delta).detach()


def trades_example(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """TRADES adversarial example: start at ``x + 0.001 * N(0, I)``, ascend KL(p(x) || p(x')) with
    signed steps, project on the eps-ball and [0, 1]. Returns ``x_adv`` shaped like ``x``."""
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = torch.min(torch.max(x + 0.001 * torch.randn_like(x), x - eps), x + eps).clamp_(0, 1).requires_grad_(True)
    for _ in range(steps):
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv += step_size * grad.sign()
            x_adv.copy_(torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1))
    return x_adv.detach()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted labels ``[N]`` (on CPU) for ``x`` in batches."""
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def pgd_robust_flags(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, batch_size: int,
    device: torch.device, step_size: float | None = None,
) -> torch.Tensor:
    """Per-point robustness (bool ``[N]``) under PGD-``steps`` with random start; step 2.5*eps/steps."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    flags = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        x_adv = pgd(model, xb, yb, eps, alpha, steps)
        with torch.no_grad():
            flags.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(flags)


@dataclass(frozen=True)
class AutoAttackSpec:
    """Which AutoAttack attacks run and how, fixed by a preset (never by the device).

    ``attacks`` in cascade order, names as in AutoAttack (``apgd-ce``, ``apgd-t``, ``apgd-dlr``,
    ``fab-t``, ``square``, ...). ``version='standard'`` runs AutoAttack standard unchanged.
    """

    version: str = "standard"
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
    apgd_iters: int = 100
    n_target_classes: int = 9
    square_queries: int = 5000

    def __post_init__(self):
        # A budget of an attack that does not run takes its default, so two specs that run the same
        # attacks with the same budgets are equal (and share cache keys); see :meth:`prefix`.
        runs = set(("apgd-ce", "apgd-t", "fab-t", "square") if self.version == "standard" else self.attacks)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not runs & {"apgd-ce", "apgd-t", "apgd-dlr"}:
            object.__setattr__(self, "apgd_iters", defaults["apgd_iters"])
        if not runs & {"apgd-t", "fab-t"}:
            object.__setattr__(self, "n_target_classes", defaults["n_target_classes"])
        if "square" not in runs:
            object.__setattr__(self, "square_queries", defaults["square_queries"])

    def prefixes(self) -> list["AutoAttackSpec"]:
        """The specs running the first ``k`` attacks of this cascade, longest first (``k < len``).

        AutoAttack runs each attack only on the points still robust after the previous ones, with
        its own seeded randomness, so a cached evaluation under a prefix can be resumed: only the
        remaining attacks need to run. Empty for ``standard``."""
        if self.version == "standard":
            return []
        return [dataclasses.replace(self, attacks=self.attacks[:k]) for k in range(len(self.attacks) - 1, 0, -1)]

    def label(self) -> str:
        if self.version == "standard":
            return "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)"
        parts = []
        for a in self.attacks:
            if a == "apgd-t":
                parts.append(f"APGD-T ({self.apgd_iters} it, {self.n_target_classes} targets)")
            elif a.startswith("apgd"):
                parts.append(f"{a.upper()} ({self.apgd_iters} it)")
            elif a == "square":
                parts.append(f"Square ({self.square_queries} queries)")
            else:
                parts.append(a.upper())
        return "AutoAttack custom: " + ", ".join(parts)


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class AutoAttackOutcome:
    """Cumulative per-point robustness after each attack of the cascade (bool ``[N]`` each, CPU),
    and the warnings AutoAttack's built-in checks emitted."""

    flags_after: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    spec: AutoAttackSpec,
    seed: int,
    batch_size: int,
    device: torch.device,
    log: Callable[[str], None] = lambda s: None,
    done: dict[str, torch.Tensor] | None = None,
) -> AutoAttackOutcome:
    """Run AutoAttack's cascade on ``(x, y)`` (``x`` in [0, 1], ``[N, C, H, W]``), one attack at a time.

    Every attack starts from the clean input and only sees the points still robust, as in
    AutoAttack's own ``run_standard_evaluation``; points misclassified clean are never attacked.
    Per-point flags come from the returned labels, never from parsed log text.
    ``done``: cumulative flags (bool ``[N]``) of the cascade's first attacks, in order, from an
    earlier run on the same model and points (see :meth:`AutoAttackSpec.prefixes`); those attacks
    are not run again. Raises ValueError if ``done`` is not a prefix of the cascade.
    """
    from pyautoattack import AutoAttack

    aa_logger = logging.getLogger("auto-attack")
    capture = _LogCapture()
    aa_logger.addHandler(capture)
    previous_level = aa_logger.level
    aa_logger.setLevel(logging.WARNING)
    try:
        with torch.no_grad():
            robust = predict(model, x, batch_size, device) == y
        flags_after: dict[str, torch.Tensor] = {}
        attacks = ("apgd-ce", "apgd-t", "fab-t", "square") if spec.version == "standard" else spec.attacks
        done = done or {}
        if tuple(done) != attacks[: len(done)]:
            raise ValueError(f"cached attacks {tuple(done)} are not a prefix of the cascade {attacks}")
        for name, flags in done.items():
            robust = flags.bool().cpu() & robust
            flags_after[name] = robust.clone()
        for name in attacks[len(done):]:
            idx = robust.nonzero().flatten()
            if len(idx) > 0:
                log(f"{name} on {len(idx)} points")
                aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=[name], seed=seed, device=device)
                aa.verbose = False
                _configure(aa, spec)
                _, y_adv = aa.run_standard_evaluation(x[idx].to(device), y[idx].to(device), batch_size=batch_size)
                robust = robust.clone()
                robust[idx] = (y_adv.cpu() == y[idx])
            flags_after[name] = robust.clone()
        return AutoAttackOutcome(flags_after, list(dict.fromkeys(capture.messages)))
    finally:
        aa_logger.removeHandler(capture)
        aa_logger.setLevel(previous_level)


def _configure(aa, spec: AutoAttackSpec) -> None:
    """Set the sub-attacks' budgets. For ``standard`` these are AutoAttack's own standard values."""
    if spec.version == "standard":
        n_iter, n_targets, queries = 100, 9, 5000
    else:
        n_iter, n_targets, queries = spec.apgd_iters, spec.n_target_classes, spec.square_queries
    aa.apgd.n_iter = n_iter
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_iter = n_iter
    aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = n_targets
    aa.fab.n_restarts = 1
    aa.fab.n_target_classes = n_targets
    aa.square.n_queries = queries
    aa.square.n_restarts = 1
