"""Attack-failure indicators: is the robust accuracy of a cell a real measurement or an attack failure?

Each indicator re-checks one way a gradient-based evaluation can fail silently, after Pintor et
al., "Indicators of Attack Failure: Debugging and Improving Optimization of Adversarial
Examples" (NeurIPS 2022, Sec. 3) and Carlini et al., "On Evaluating Adversarial Robustness"
(arXiv 1902.06705, 2019, Sec. 5). They run on the first ``settings.n_points`` evaluation points
(eps in [0, 1] pixel scale, accuracies and rates as fractions) and return one
:class:`Indicator` each: ``passed`` True/False, or None when the indicator does not apply
(e.g. the preset runs no Square attack). Thresholds live in :class:`IndicatorSettings`.

A model whose forward pass is random in eval mode is failed with the reason (``deterministic``):
its numbers would need the randomised protocol (AutoAttack ``version='rand'``, EOT), which this
benchmark does not run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from . import attacks
from .evaluate import Evaluation

NAMES = ("deterministic", "gradients", "loss_progress", "unbounded", "eps_monotone", "black_box",
         "autoattack_warnings", "robust_le_clean", "transfer")


@dataclass(frozen=True)
class IndicatorSettings:
    """Budgets and thresholds of the indicators (part of their cache key).

    ``n_points``: evaluation points used (the first ones). ``steps``: PGD steps of the loss trace,
    the eps grid and the transfer attack (step 2.5 * eps / steps). ``unbounded_eps``/``unbounded_steps``:
    the unbounded attack (eps 1.0 covers the whole [0, 1] box). ``eps_factors``: the grid, in
    multiples of the preset's eps. Thresholds are fractions of points:
    ``max_zero_grad`` of attacked points with an all-zero or non-finite input gradient;
    ``max_stalled`` of not-yet-adversarial points whose PGD loss never rose by more than
    ``stall_rel`` of its start value; ``max_unbounded`` robust accuracy left by the unbounded attack;
    ``monotone_tol`` rise of robust accuracy between consecutive eps; ``square_margin`` points
    Square may break beyond the white-box attacks; ``transfer_margin`` how much lower the transfer
    attack's accuracy may be than the white-box one; ``random_alpha`` the largest L2 difference of
    L2-normalised logits between repeated forward passes (AutoAttack's ``check_randomized`` value).
    """

    n_points: int = 200
    steps: int = 10
    unbounded_eps: float = 1.0
    unbounded_steps: int = 20
    eps_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    repeats: int = 3
    max_zero_grad: float = 0.01
    max_stalled: float = 0.05
    stall_rel: float = 1e-3
    max_unbounded: float = 0.01
    monotone_tol: float = 0.01
    square_margin: float = 0.01
    transfer_margin: float = 0.02
    random_alpha: float = 1e-4
    version: int = 1

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


DEFAULT = IndicatorSettings()


@dataclass
class Indicator:
    """One indicator's result: ``value`` measured against ``threshold`` (same unit, see
    :class:`IndicatorSettings`); ``passed`` None means not run or not applicable (``message`` says why)."""

    name: str
    passed: bool | None
    value: float | None
    threshold: float | None
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Indicator":
        return cls(d["name"], d["passed"], d["value"], d["threshold"], d["message"])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _frac(flags: torch.Tensor) -> float:
    """Fraction of True in a bool tensor, exact in Python floats (0 for an empty tensor)."""
    return int(flags.sum()) / max(1, flags.numel())


# ------------------------------------------------------------------------------ one per indicator


@torch.no_grad()
def deterministic(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: IndicatorSettings) -> Indicator:
    """Repeated forward passes on the same inputs agree (Carlini et al. 2019, Sec. 5.4; AutoAttack's
    randomness check): max over pairs of passes and points of ``|| z1/||z1|| - z2/||z2|| ||_2``."""
    outs = [model(x) for _ in range(s.repeats)]
    unit = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max(float((unit[i] - unit[j]).norm(dim=1).max()) for i in range(len(outs)) for j in range(i + 1, len(outs)))
    flips = max(_frac(o.argmax(1) != outs[0].argmax(1)) for o in outs)
    ok = diff <= s.random_alpha and flips == 0
    msg = (f"{s.repeats} forward passes in eval mode agree (max normalised logit difference {diff:.1e})" if ok else
           f"the forward pass is random in eval mode (max normalised logit difference {diff:.1e} over {s.repeats} "
           f"passes, {_pct(flips)} of predictions flip): a randomised model needs the randomised protocol "
           f"(AutoAttack version='rand', EOT), which pytest-advprune does not run; make forward deterministic in eval mode")
    return Indicator("deterministic", ok, diff, s.random_alpha, msg)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: IndicatorSettings) -> Indicator:
    """Unavailable gradients (Pintor et al. 2022, Sec. 3): fraction of correctly classified points
    whose input gradient of the cross-entropy is all zero or not finite."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        try:
            (grad,) = torch.autograd.grad(loss, x)
        except RuntimeError as exc:  # interrupted graph (no_grad or detach inside forward)
            return Indicator("gradients", False, 1.0, s.max_zero_grad,
                             f"no input gradient: {exc}; gradient-based attacks cannot run on this model")
    correct = (logits.argmax(1) == y).detach()
    if not correct.any():
        return Indicator("gradients", None, None, s.max_zero_grad, "not applicable: no point is classified correctly")
    g = grad[correct].flatten(1)
    bad = _frac((g == 0).all(1) | ~torch.isfinite(g).all(1))
    ok = bad <= s.max_zero_grad
    msg = (f"{_pct(bad)} of {int(correct.sum())} correctly classified points have a zero or non-finite input gradient"
           + ("" if ok else "; gradient-based attacks get no signal there (masked or saturated gradients), so the "
              "robust accuracy is likely overstated"))
    return Indicator("gradients", ok, bad, s.max_zero_grad, msg)


def loss_progress(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, s: IndicatorSettings) -> Indicator:
    """The attack loss improves (Pintor et al. 2022, "incomplete optimisation"): PGD with a loss trace;
    fraction of points still not adversarial at the end whose cross-entropy never rose above its
    start value by more than ``stall_rel`` of it."""
    trace: list[torch.Tensor] = []
    x_adv = attacks.pgd(model, x, y, eps, 2.5 * eps / s.steps, s.steps, trace=trace)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    if not robust.any():
        return Indicator("loss_progress", True, 0.0, s.max_stalled, "PGD broke every point; no loss trace to judge")
    losses = torch.stack(trace)[:, robust]
    rise = losses.max(0).values - losses[0]
    stalled = _frac(rise <= s.stall_rel * losses[0].abs())
    ok = stalled <= s.max_stalled
    msg = (f"PGD-{s.steps} at eps {eps:g}: the loss of {_pct(stalled)} of {int(robust.sum())} unbroken points never rose"
           + ("" if ok else "; the attack is stuck (zero, saturated or masked gradients), so these points are not "
              "shown robust"))
    return Indicator("loss_progress", ok, stalled, s.max_stalled, msg)


def _pgd_acc(model, x, y, eps: float, steps: int) -> torch.Tensor:
    x_adv = attacks.pgd(model, x, y, eps, 2.5 * eps / steps, steps)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: IndicatorSettings) -> Indicator:
    """Unconstrained attack failure (Pintor et al. 2022; Carlini et al. 2019, Sec. 5.2): PGD with
    eps ``unbounded_eps`` on the correctly classified points must leave ~0% robust accuracy."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    if not correct.any():
        return Indicator("unbounded", None, None, s.max_unbounded, "not applicable: no point is classified correctly")
    left = _frac(_pgd_acc(model, x[correct], y[correct], s.unbounded_eps, s.unbounded_steps))
    ok = left <= s.max_unbounded
    msg = (f"PGD-{s.unbounded_steps} at eps {s.unbounded_eps:g} leaves {_pct(left)} of {int(correct.sum())} points robust"
           + ("" if ok else "; an attack that cannot break points with an unbounded budget is failing (gradient "
              "masking or a broken loss), so the bounded robust accuracy is not trustworthy"))
    return Indicator("unbounded", ok, left, s.max_unbounded, msg)


def monotone_violation(eps_grid: list[float], accs: list[float]) -> float:
    """Largest rise of robust accuracy from one eps of the increasing ``eps_grid`` to a larger one (0 if none)."""
    return max([0.0] + [accs[j] - accs[i] for i in range(len(accs)) for j in range(i + 1, len(accs))])


def eps_monotone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, s: IndicatorSettings,
                 seed: int = 0) -> Indicator:
    """Robust accuracy does not rise with eps (Carlini et al. 2019, Sec. 5.2): PGD at ``eps_factors`` x eps."""
    grid = [f * eps for f in s.eps_factors]
    accs = []
    for e in grid:
        torch.manual_seed(seed)  # the same random start for every eps
        accs.append(_frac(_pgd_acc(model, x, y, e, s.steps)))
    rise = monotone_violation(grid, accs)
    ok = rise <= s.monotone_tol
    curve = ", ".join(f"eps {e:.3g}: {_pct(a)}" for e, a in zip(grid, accs))
    msg = (f"PGD-{s.steps} robust accuracy {curve}"
           + ("" if ok else f"; it rises by {_pct(rise)} at a larger eps, so the attack fails at larger budgets "
              "(step size, gradient masking)"))
    return Indicator("eps_monotone", ok, rise, s.monotone_tol, msg)


def square_only(ev: Evaluation) -> torch.Tensor:
    """Bool ``[N]``: the points classified correctly and robust to every attack of ``ev`` but Square
    (PGD, AutoAttack's gradient attacks, FMN), yet broken by Square (``AA:square``, which must be present)."""
    white = ev.clean.tensor().clone()
    for name, acc in ev.attacks.items():
        if name != "AA:square":
            white &= acc.tensor()
    return white & ~ev.attacks["AA:square"].tensor()


def black_box(ev: Evaluation, s: IndicatorSettings) -> Indicator:
    """White-box beats black-box (Carlini et al. 2019, Sec. 5.5; AutoAttack's ``check_square_sr``):
    fraction of evaluation points robust to every white-box attack (PGD and AutoAttack's gradient
    attacks) yet broken by Square (:func:`square_only`), read from the cumulative ``AA:<name>`` flags."""
    if "AA:square" not in ev.attacks:
        return Indicator("black_box", None, None, s.square_margin,
                         "not run: the preset's attacks include no gradient-free attack (Square)")
    gain = _frac(square_only(ev))
    ok = gain <= s.square_margin
    msg = (f"Square breaks {_pct(gain)} of the points beyond the white-box attacks"
           + ("" if ok else "; a gradient-free attack beating gradient attacks means their gradients mislead them "
              "(gradient masking): the white-box robust accuracy is overstated"))
    return Indicator("black_box", ok, gain, s.square_margin, msg)


def autoattack_warnings(ev: Evaluation, s: IndicatorSettings) -> Indicator:
    """AutoAttack's own flags (Croce & Hein 2020, ``flags_doc.md``), as captured during the evaluation.
    Every flag fails, except the zero-gradient flag of APGD-DLR/APGD-T when it concerns no more
    than ``max_zero_grad`` of the evaluated points (the ``gradients`` threshold). ``note:`` lines
    are pytest-advprune's own remarks, not flags."""
    flags = [w for w in ev.warnings if not w.startswith("note:")]
    failing = []
    for w in flags:
        if w.startswith("there are ") and "points with zero gradient" in w:
            count = int(w.split()[2])
            if count <= s.max_zero_grad * ev.clean.n:
                continue
        failing.append(w)
    ok = not failing
    msg = ("no AutoAttack flag" if not flags else "AutoAttack flagged: " + " | ".join(flags)) + \
        ("" if ok else "; the evaluation is unreliable until the flagged cause is fixed")
    return Indicator("autoattack_warnings", ok, float(len(failing)), 0.0, msg)


@torch.no_grad()
def robust_le_clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ev: Evaluation, s: IndicatorSettings) -> Indicator:
    """Robust accuracy <= clean accuracy (Carlini et al. 2019, Sec. 5.1), point-wise and in aggregate,
    against a fresh clean prediction of the model: points counted robust but misclassified clean."""
    n = min(len(x), ev.clean.n)
    fresh = attacks.predict(model, x[:n], n, x.device) == y[:n].cpu()
    robust = ev.robust.tensor()[:n]
    bad = _frac(robust & ~(fresh & ev.clean.tensor()[:n]))
    over = [k for k, a in {"robust": ev.robust, **ev.attacks}.items() if a.acc > ev.clean.acc + 1e-12]
    ok = bad == 0 and not over
    msg = (f"robust {_pct(ev.robust.acc)} vs clean {_pct(ev.clean.acc)}; {_pct(bad)} of points robust but misclassified"
           + ("" if ok else f" (above clean: {', '.join(over) or 'none'}); the evaluation counts points the model "
              "gets wrong without any attack, so it is inconsistent (random model or stale results)"))
    return Indicator("robust_le_clean", ok, bad, 0.0, msg)


def transfer(model: nn.Module, source: nn.Module | None, x: torch.Tensor, y: torch.Tensor, ev: Evaluation,
             eps: float, s: IndicatorSettings) -> Indicator:
    """White-box beats transfer (Pintor et al. 2022, "transfer failure"; Carlini et al. 2019, Sec. 5.5):
    PGD examples crafted on ``source`` (the preset's dense model) evaluated on ``model``; fails when
    their robust accuracy is below the evaluation's (white-box worst case) by more than ``transfer_margin``."""
    if source is None:
        return Indicator("transfer", None, None, s.transfer_margin,
                         "not applicable: no dense source model (the evaluated model is the dense one, or it is not cached)")
    n = min(len(x), ev.robust.n)
    x_adv = attacks.pgd(source, x[:n], y[:n], eps, 2.5 * eps / s.steps, s.steps)
    with torch.no_grad():
        transfer_robust = (model(x_adv).argmax(1) == y[:n]).cpu() & ev.clean.tensor()[:n]
    white = ev.robust.tensor()[:n]
    gap = _frac(white) - _frac(transfer_robust)
    ok = gap <= s.transfer_margin
    msg = (f"transfer from the dense model leaves {_pct(_frac(transfer_robust))} robust vs white-box "
           f"{_pct(_frac(white))}; {int((white & ~transfer_robust).sum())} points broken only by transfer"
           + ("" if ok else "; the model's own gradients are worse guides than a surrogate's (gradient masking), so its "
              "white-box robust accuracy is overstated"))
    return Indicator("transfer", ok, gap, s.transfer_margin, msg)


# ------------------------------------------------------------------------------ all of them


def compute(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ev: Evaluation,
    eps: float,
    seed: int,
    device: torch.device,
    source: nn.Module | None = None,
    settings: IndicatorSettings = DEFAULT,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Indicator]:
    """Every indicator of :data:`NAMES` for ``model`` (eval mode) evaluated as ``ev`` on ``(x, y)``
    (``x`` ``[N, C, H, W]`` in [0, 1], the evaluation's points in order) at ``eps``.

    ``source`` is the dense model for the transfer check (None: not applicable). Attack randomness
    is seeded with ``seed`` inside a forked RNG, so the caller's random state is untouched.
    """
    model = model.to(device).eval()
    n = min(settings.n_points, len(x))
    xs, ys = x[:n].to(device), y[:n].to(device)
    log(f"attack-failure indicators on {n} points")
    out: dict[str, Indicator] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out["deterministic"] = deterministic(model, xs, ys, settings)
        out["gradients"] = gradients(model, xs, ys, settings)
        out["loss_progress"] = loss_progress(model, xs, ys, eps, settings)
        out["unbounded"] = unbounded(model, xs, ys, settings)
        out["eps_monotone"] = eps_monotone(model, xs, ys, eps, settings, seed)
        out["black_box"] = black_box(ev, settings)
        out["autoattack_warnings"] = autoattack_warnings(ev, settings)
        out["robust_le_clean"] = robust_le_clean(model, xs, ys, ev, settings)
        torch.manual_seed(seed)
        out["transfer"] = transfer(model, None if source is None else source.to(device).eval(), xs, ys, ev, eps, settings)
    return out
