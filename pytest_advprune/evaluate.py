"""Clean and robust accuracy with per-point outcomes and 95% Wilson intervals.

Robust accuracy of a preset is the point-wise worst case over its fixed attacks: a point counts
as robust only if it is classified correctly clean and under every attack (PGD, AutoAttack and,
when the preset has an FMN spec, FMN-Linf at the preset's eps, see :func:`with_fmn`). Per-point
flags are kept (as ``0``/``1`` strings) so that two models evaluated on the same points can be
compared with a paired test (:mod:`pytest_advprune.stats`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .attacks import pgd_robust_flags, predict, run_autoattack
from .errors import NonFiniteModel
from .fmn import FMNResult, robust_flags
from .presets import Preset
from .speed import prepare_for_eval


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k/n`` as fractions ``(low, high)``; ``(0, 1)`` if n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


@dataclass
class Accuracy:
    """Accuracy of one evaluation on ``n`` points: ``acc`` fraction, ``ci95`` Wilson interval
    (fractions), ``flags`` a string of ``0``/``1`` per point (1 = correct/robust)."""

    name: str
    correct: int
    n: int
    acc: float
    ci95: tuple[float, float]
    flags: str = field(repr=False)

    @classmethod
    def from_flags(cls, name: str, flags: torch.Tensor) -> "Accuracy":
        flags = flags.bool().cpu()
        k, n = int(flags.sum()), len(flags)
        return cls(name, k, n, k / n if n else 0.0, wilson(k, n), "".join("1" if f else "0" for f in flags.tolist()))

    def tensor(self) -> torch.Tensor:
        return torch.tensor([c == "1" for c in self.flags], dtype=torch.bool)


@dataclass
class Evaluation:
    """Clean accuracy, each attack's accuracy (AutoAttack cumulative after each attack of its
    cascade, PGD alone) and the point-wise worst case ``robust``."""

    clean: Accuracy
    attacks: dict[str, Accuracy]
    robust: Accuracy
    warnings: list[str]
    duration_s: float
    fmn: FMNResult | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("fmn")
        if self.fmn is not None:
            d["fmn"] = self.fmn.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        acc = lambda a: Accuracy(a["name"], a["correct"], a["n"], a["acc"], tuple(a["ci95"]), a["flags"])
        fmn = FMNResult.from_dict(d["fmn"]) if d.get("fmn") else None
        return cls(acc(d["clean"]), {k: acc(v) for k, v in d["attacks"].items()}, acc(d["robust"]), d["warnings"],
                   d["duration_s"], fmn)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteModel` naming the first parameter or buffer holding NaN or inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteModel(f"model tensor {name!r} holds NaN or inf values: the method wrote them, or diverged in training (lower its learning rate)")


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    preset: Preset,
    device: torch.device,
    log: Callable[[str], None] = lambda s: None,
    resume: Evaluation | None = None,
) -> Evaluation:
    """Evaluate ``model`` (eval mode, inputs ``x`` [N, C, H, W] in [0, 1]) with the preset's fixed attacks.

    ``resume``: an evaluation of the same model and points under a prefix of the preset's
    AutoAttack cascade (same PGD); its PGD and cascade results are kept and only the remaining
    attacks run.

    Batch sizes are the preset's ``eval_batch`` on every device (AutoAttack reseeds every batch, so
    its random starts depend on the batching); on CUDA the attacks call the model prepared by
    :func:`~pytest_advprune.speed.prepare_for_eval`, at the default fp32/TF32 precision.

    Raises :class:`NonFiniteModel` for NaN/inf weights or logits.
    """
    t0 = time.perf_counter()
    check_finite(model)
    model = model.to(device).eval()
    with torch.no_grad():
        probe = model(x[: min(len(x), preset.eval_batch)].to(device))
    if not torch.isfinite(probe).all():
        raise NonFiniteModel("model outputs NaN or inf logits on clean inputs; the pruned model is broken")
    model = prepare_for_eval(model, device, probe=x[: preset.eval_batch])  # CUDA: channels_last, compiled; CPU: as is
    clean = predict(model, x, preset.eval_batch, device) == y
    attacks: dict[str, Accuracy] = {}
    pgd_name = f"PGD-{preset.pgd_steps}"
    done: dict[str, torch.Tensor] = {}
    if resume is not None:
        pgd_flags = resume.attacks[pgd_name].tensor()
        done = {k[3:]: a.tensor() for k, a in resume.attacks.items() if k.startswith("AA:")}
        log(f"resuming from a cached evaluation with {', '.join(done)}")
    else:
        log(f"PGD-{preset.pgd_steps} on {len(x)} points")
        torch.manual_seed(preset.seed)
        pgd_flags = pgd_robust_flags(model, x, y, preset.eps, preset.pgd_steps, preset.eval_batch, device) & clean
    attacks[pgd_name] = Accuracy.from_flags(pgd_name, pgd_flags)
    outcome = run_autoattack(model, x, y, preset.eps, preset.autoattack, preset.seed, preset.eval_batch, device, log,
                             done=done)
    aa_flags = clean.clone()
    for name, flags in outcome.flags_after.items():
        aa_flags = flags & clean
        attacks[f"AA:{name}"] = Accuracy.from_flags(f"AA:{name}", aa_flags)
    robust = clean & pgd_flags & aa_flags
    return Evaluation(
        clean=Accuracy.from_flags("clean", clean),
        attacks=attacks,
        robust=Accuracy.from_flags("robust", robust),
        warnings=list(dict.fromkeys((resume.warnings if resume else []) + outcome.warnings)),
        duration_s=time.perf_counter() - t0 + (resume.duration_s if resume else 0.0),
    )


FMN_LINF = "FMN-Linf"


def with_fmn(ev: Evaluation, result: FMNResult, eps: float) -> Evaluation:
    """``ev`` with FMN as a further fixed attack: ``attacks["FMN-Linf"]`` (robust iff the point's
    FMN Linf distance is > ``eps``, see :mod:`pytest_advprune.fmn`) and ``robust`` the point-wise
    worst case over PGD, AutoAttack and FMN-Linf. Without a Linf run, only ``fmn`` is attached.
    Raises ValueError if ``result`` covers another number of points than ``ev``."""
    if "linf" not in result.norms:
        return replace(ev, fmn=result)
    flags = robust_flags(result.norms["linf"].distances, eps)
    if len(flags) != ev.clean.n:
        raise ValueError(f"FMN distances for {len(flags)} points, evaluation of {ev.clean.n}")
    flags &= ev.clean.tensor()
    attacks = {**ev.attacks, FMN_LINF: Accuracy.from_flags(FMN_LINF, flags)}
    return replace(ev, attacks=attacks, robust=Accuracy.from_flags("robust", ev.robust.tensor() & flags), fmn=result)
