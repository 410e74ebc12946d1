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
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """L-inf PGD on the cross-entropy loss; returns ``x_adv`` (same shape as ``x``, in [0, 1]).

    ``eps`` and ``step_size`` are in pixel scale. With ``steps=1``, ``random_start=True`` and
    ``step_size=1.25*eps`` this is FGSM with random start (Wong et al., ICLR 2020).
    The model's train/eval mode is left as the caller set it; parameter gradients are untouched.
    ``trace``, when given, receives the per-point cross-entropy (``[N]``, detached) at the start
    point and after every step (``steps + 1`` tensors), for the attack-failure indicators.
    """
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp_(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y)
        if trace is not None:
            trace.append(F.cross_entropy(logits.detach(), y, reduction="none"))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step_size * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp_(0, 1) - x)
    if trace is not None:
        with torch.no_grad():
            trace.append(F.cross_entropy(model(x + delta), y, reduction="none"))
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

    AutoAttack's built-in checks (randomised model, softmax output, dynamic defence, class count,
    zero gradients inside APGD-DLR/APGD-T) log warnings on the ``auto-attack`` logger; they are
    collected into :attr:`AutoAttackOutcome.warnings`. Its "Square beat the white-box attacks"
    check never fires here (it needs the whole cascade in one call); the attack-failure
    indicators make that comparison. Models with fewer than 4 classes get the attack set of
    :func:`attacks_for_classes` (a ``note: ...`` line says so), never an IndexError.
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
            n_classes = model(x[:1].to(device)).shape[1]
        flags_after: dict[str, torch.Tensor] = {}
        attacks = ("apgd-ce", "apgd-t", "fab-t", "square") if spec.version == "standard" else spec.attacks
        attacks, note = attacks_for_classes(attacks, n_classes)
        notes = [note] if note else []
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
                _configure(aa, spec, n_classes)
                _, y_adv = aa.run_standard_evaluation(x[idx].to(device), y[idx].to(device), batch_size=batch_size)
                robust = robust.clone()
                robust[idx] = (y_adv.cpu() == y[idx])
            flags_after[name] = robust.clone()
        return AutoAttackOutcome(flags_after, notes + list(dict.fromkeys(capture.messages)))
    finally:
        aa_logger.removeHandler(capture)
        aa_logger.setLevel(previous_level)


def attacks_for_classes(attacks: tuple[str, ...], n_classes: int) -> tuple[tuple[str, ...], str | None]:
    """The attacks of ``attacks`` that are defined for a ``n_classes``-class model, and a note saying
    what changed (None if nothing did).

    AutoAttack's DLR loss divides by ``z_pi1 - z_pi3`` and its targeted DLR loss by
    ``z_pi1 - (z_pi3 + z_pi4) / 2`` (Croce & Hein, ICML 2020, eqs. 5-6): they need 3 and 4 classes.
    With 3 classes APGD-T becomes APGD-DLR (untargeted); with 2 classes both DLR attacks are
    dropped, since the only target class is the untargeted attack's and APGD-CE covers it.
    """
    out: list[str] = []
    for name in attacks:
        if name == "apgd-t" and n_classes < 4:
            name = "apgd-dlr"
        if name == "apgd-dlr" and n_classes < 3:
            continue
        if name not in out:
            out.append(name)
    if tuple(out) == tuple(attacks):
        return tuple(attacks), None
    return tuple(out), (f"note: the model has {n_classes} classes; AutoAttack's DLR loss needs 3 and its targeted "
                        f"DLR loss 4, so {', '.join(attacks)} ran as {', '.join(out) or 'nothing'}")


def _configure(aa, spec: AutoAttackSpec, n_classes: int) -> None:
    """Set the sub-attacks' budgets. For ``standard`` these are AutoAttack's own standard values;
    target classes are capped at ``n_classes - 1`` (there are no more)."""
    if spec.version == "standard":
        n_iter, n_targets, queries = 100, 9, 5000
    else:
        n_iter, n_targets, queries = spec.apgd_iters, spec.n_target_classes, spec.square_queries
    n_targets = max(1, min(n_targets, n_classes - 1))
    aa.apgd.n_iter = n_iter
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_iter = n_iter
    aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = n_targets
    aa.fab.n_restarts = 1
    aa.fab.n_target_classes = n_targets
    aa.square.n_queries = queries
    aa.square.n_restarts = 1
