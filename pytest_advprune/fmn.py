"""Minimum-norm robustness: per-point smallest adversarial distances with FMN, tuned per model.

FMN is the Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021), run through ``secml-torch``'s
native implementation (``secmlt.adv.evasion.fmn.FMN``). Its loss, optimiser and step-size scheduler
are chosen per model on a small tuning split disjoint from the evaluated points, as HO-FMN does
(Mura et al., 2024, "HO-FMN: Hyperparameter optimization for fast minimum-norm attacks"), but with a
small exhaustive grid instead of Bayesian optimisation; the score of a configuration is the median
distance it finds (lower is better; a failed point counts +inf).

Per-point distance ``d`` (``||x_adv - x||_p``, pixel scale [0, 1]) of an evaluated point:

* ``0`` if the model misclassifies the clean point (it is not robust at any eps);
* ``+inf`` if FMN found no adversarial example. ``secml-torch`` returns the clean input for such a
  point, which would read as distance 0; every returned point is therefore re-classified here and
  only a misclassified one counts (see /work/shared/docs/evaluation.md, section 1).

Robust accuracy at eps is the fraction of points with ``d > eps``. Tie rule: ``d == eps`` counts as
broken, since the threat model's ball ``||delta|| <= eps`` is closed (as in PGD and AutoAttack). The
security curve (robust accuracy against an eps grid) is the empirical survival function of ``d``.

Device: ``secml-torch`` 1.5's FMN keeps its bookkeeping tensors on the CPU, so inputs stay on the
CPU and only the model's forward/backward pass runs on ``device`` (logits come back to the CPU).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

NORMS = {"linf": float("inf"), "l2": 2.0}
LOSSES = ("logit", "ce")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("cosine", "none")
DIGITS = 6  # significant digits kept for a distance; robust flags are always computed from the rounded values


@dataclass(frozen=True)
class FMNConfig:
    """One FMN configuration.

    ``loss``: ``logit`` (logit difference, the FMN paper's) or ``ce`` (cross-entropy); ``optimizer``:
    ``sgd`` or ``adam``; ``scheduler``: ``cosine`` (cosine annealing of the step size to
    ``step_size / 100``, the FMN paper's) or ``none``; ``step_size``: the optimiser's learning rate
    (SGD moves ``step_size`` in L2 along the L2-normalised gradient; Adam moves about ``step_size``
    per pixel); ``gamma``: FMN's initial rate of change of the eps-ball radius.
    """

    loss: str = "logit"
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    step_size: float = 1.0
    gamma: float = 0.05

    def label(self) -> str:
        return f"{self.loss}/{self.optimizer}/{self.scheduler} lr {self.step_size:g}"


@dataclass(frozen=True)
class FMNSpec:
    """How a preset runs FMN (part of the preset, so it never depends on the device).

    ``steps``: FMN iterations of the final attack; ``norms``: ``linf`` and/or ``l2`` (``linf`` is
    the one that enters the robust verdict). Tuning: every configuration of :meth:`grid` runs
    ``tune_steps`` iterations on ``tune_points`` points of ``tune_split``: ``test`` = the test points
    right after the preset's ``n_eval`` evaluated ones, ``train`` = the first training points (for a
    preset that evaluates the whole test split). ``step_sizes``: ``(norm, optimizer, sizes)`` triples;
    the grid is ``losses x optimizers x schedulers x sizes``.
    """

    steps: int
    tune_steps: int
    tune_points: int
    tune_split: str
    step_sizes: tuple[tuple[str, str, tuple[float, ...]], ...]
    norms: tuple[str, ...] = ("linf", "l2")
    losses: tuple[str, ...] = LOSSES
    optimizers: tuple[str, ...] = OPTIMIZERS
    schedulers: tuple[str, ...] = SCHEDULERS

    def __post_init__(self):
        bad = [n for n in self.norms if n not in NORMS] + [v for v in self.losses if v not in LOSSES] \
            + [v for v in self.optimizers if v not in OPTIMIZERS] + [v for v in self.schedulers if v not in SCHEDULERS]
        if bad or self.tune_split not in ("test", "train"):
            raise ValueError(f"FMNSpec: unknown {bad or self.tune_split!r}; norms {tuple(NORMS)}, losses {LOSSES}, "
                             f"optimizers {OPTIMIZERS}, schedulers {SCHEDULERS}, tune_split test|train")

    def grid(self, norm: str) -> list[FMNConfig]:
        """The tuning grid for ``norm``, in a fixed order (ties go to the earlier configuration)."""
        sizes = {(n, o): s for n, o, s in self.step_sizes}
        return [FMNConfig(loss, opt, sched, size)
                for loss, opt, sched in itertools.product(self.losses, self.optimizers, self.schedulers)
                for size in sizes.get((norm, opt), ())]

    def tuning_cost(self) -> int:
        """Forward+backward passes of one point spent on tuning, per model (all norms)."""
        return sum(len(self.grid(n)) for n in self.norms) * self.tune_steps * self.tune_points

    def label(self) -> str:
        sizes = "; ".join(f"{n} {o} {'|'.join(f'{v:g}' for v in s)}" for n, o, s in self.step_sizes if n in self.norms)
        grid = ", ".join(f"{norm} {len(self.grid(norm))}" for norm in self.norms)
        return (f"FMN ({', '.join(self.norms)}), {self.steps} steps; tuned per model over {grid} configurations "
                f"(loss {'|'.join(self.losses)}, optimiser {'|'.join(self.optimizers)}, scheduler "
                f"{'|'.join(self.schedulers)}, step size {sizes}) x {self.tune_steps} steps on {self.tune_points} "
                f"{self.tune_split} points disjoint from the evaluated ones")


@dataclass
class NormResult:
    """FMN in one norm. ``distances``: per evaluated point (rounded to :data:`DIGITS` significant
    digits; 0 = misclassified clean, inf = no adversarial found); ``config``: the tuned configuration;
    ``tuning``: ``(label, median distance)`` per grid configuration; ``unverified``: points FMN
    reported as adversarial that re-classification did not confirm (counted +inf); seconds spent."""

    norm: str
    distances: list[float]
    config: FMNConfig
    tuning: list[tuple[str, float]]
    unverified: int
    attack_s: float
    tune_s: float

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.distances, dtype=torch.float64)

    def median(self) -> float:
        return float(self.tensor().median()) if self.distances else math.inf


@dataclass
class FMNResult:
    """FMN in every norm of a spec, for one model on the evaluated points."""

    norms: dict[str, NormResult] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(r.attack_s + r.tune_s for r in self.norms.values())

    def to_dict(self) -> dict:
        """JSON-safe: every +inf (distance or median) is written as ``None`` (JSON has no infinity)."""
        out = {}
        for norm, r in self.norms.items():
            d = asdict(r)
            d["distances"] = [_json_float(v) for v in r.distances]
            d["tuning"] = [[label, _json_float(m)] for label, m in r.tuning]
            out[norm] = d
        return {"norms": out}

    @classmethod
    def from_dict(cls, d: dict) -> "FMNResult":
        norms = {}
        for norm, r in d["norms"].items():
            norms[norm] = NormResult(
                norm, [_from_json(v) for v in r["distances"]], FMNConfig(**r["config"]),
                [(label, _from_json(m)) for label, m in r["tuning"]], r["unverified"], r["attack_s"], r["tune_s"])
        return cls(norms)


def _json_float(v: float) -> float | None:
    return None if math.isinf(v) else v


def _from_json(v: float | None) -> float:
    return math.inf if v is None else float(v)


def _round(v: float) -> float:
    return v if v in (0.0, math.inf) else float(f"{v:.{DIGITS}g}")


def robust_flags(distances: torch.Tensor | list[float], eps: float) -> torch.Tensor:
    """Per-point robustness (bool ``[N]``) at ``eps``: ``d > eps`` (``d == eps`` counts as broken)."""
    return torch.as_tensor(distances, dtype=torch.float64) > eps


def security_curve(distances: torch.Tensor | list[float], eps_grid: torch.Tensor | list[float]) -> torch.Tensor:
    """Robust accuracy (fraction, ``[len(eps_grid)]``) at each eps of ``eps_grid``; non-increasing in eps."""
    d = torch.as_tensor(distances, dtype=torch.float64)
    grid = torch.as_tensor(eps_grid, dtype=torch.float64)
    if len(d) == 0:
        return torch.zeros(len(grid), dtype=torch.float64)
    return (d[None, :] > grid[:, None]).double().mean(1)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for the attack, so it leaves no ``.grad`` behind."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, req in flags:
            p.requires_grad_(req)


def _attack(norm: str, config: FMNConfig, steps: int):
    """secml-torch's native FMN with ``config``'s loss, optimiser and scheduler swapped in."""
    from secmlt.adv.evasion.fmn import FMN
    from secmlt.optimization.optimizer_factory import OptimizerFactory
    from secmlt.optimization.scheduler_factory import LRSchedulerFactory

    attack = FMN(perturbation_model=norm, num_steps=steps, step_size=config.step_size, gamma=config.gamma)
    if config.loss == "ce":
        attack.loss_function = nn.CrossEntropyLoss  # the setter builds it with reduction="none"
    attack.optimizer_cls = OptimizerFactory.create_from_name(config.optimizer, lr=config.step_size)
    if config.scheduler == "none":
        attack.scheduler_cls = LRSchedulerFactory.create_no_scheduler()
        attack.scheduler_kwargs = {}  # T_max/eta_min belong to cosine annealing only
    return attack


def fmn_distances(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, config: FMNConfig, steps: int,
    batch_size: int, device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Smallest adversarial ``norm`` distances (float64 ``[N]``) FMN finds for ``x`` ``[N, C, H, W]``
    in [0, 1] with labels ``y`` ``[N]``, and how many returned points failed re-classification.

    Misclassified clean points get 0 and are not attacked; a point whose returned example the model
    still classifies correctly gets +inf. ``model`` must be in eval mode on ``device``.
    """
    from secmlt.models.pytorch.base_pytorch_nn import BasePyTorchClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from .attacks import predict

    x, y = x.detach().cpu(), y.cpu()
    dist = torch.zeros(len(x), dtype=torch.float64)
    correct = predict(model, x, batch_size, device) == y
    idx = correct.nonzero().flatten()
    if len(idx) == 0:
        return dist, 0
    wrapped = BasePyTorchClassifier(model, postprocessing=lambda scores: scores.cpu())
    parts = []
    with _frozen(model):
        for start in range(0, len(idx), batch_size):
            # a fresh attack per batch: secml-torch 1.5 keeps the last batch's eps-ball radii in the attack
            # and fails on a batch of another size
            batch = idx[start : start + batch_size]
            loader = DataLoader(TensorDataset(x[batch], y[batch]), batch_size=len(batch))
            parts += [xa.detach().cpu() for xa, _ in _attack(norm, config, steps)(wrapped, loader, stream=True)]
    x_adv = torch.cat(parts)
    adversarial = predict(model, x_adv, batch_size, device) != y[idx]
    d = (x_adv.double() - x[idx].double()).flatten(1).norm(p=NORMS[norm], dim=1)
    claimed = d > 0  # FMN returns the clean input where it found nothing
    dist[idx] = torch.where(adversarial, d, torch.full_like(d, math.inf))
    return dist, int((claimed & ~adversarial).sum())


def tune(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, spec: FMNSpec, batch_size: int,
    device: torch.device, log: Callable[[str], None] = lambda s: None,
) -> tuple[FMNConfig, list[tuple[str, float]]]:
    """The configuration of ``spec.grid(norm)`` with the lowest median distance on the tuning points
    ``(x, y)`` (their correctly classified ones; +inf counts as worst; ties go to the earlier
    configuration), and ``(label, median)`` for every configuration. Tuning points must be disjoint
    from the evaluated points. With one configuration, or no correctly classified tuning point,
    the first configuration is returned untried."""
    grid = spec.grid(norm)
    if not grid:
        raise ValueError(f"FMNSpec has no step sizes for norm {norm!r}")
    from .attacks import predict

    keep = predict(model, x, batch_size, device) == y.cpu()
    x, y = x[keep], y.cpu()[keep]
    if len(grid) == 1 or len(x) == 0:
        return grid[0], []
    scores = []
    for config in grid:
        d, _ = fmn_distances(model, x, y, norm, config, spec.tune_steps, batch_size, device)
        scores.append((config.label(), float(d.median())))
        log(f"FMN-{norm} tuning {config.label()}: median {scores[-1][1]:.4g}")
    best = min(range(len(grid)), key=lambda i: scores[i][1])
    return grid[best], scores


def run_fmn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_tune: torch.Tensor, y_tune: torch.Tensor,
    spec: FMNSpec, batch_size: int, device: torch.device, seed: int,
    log: Callable[[str], None] = lambda s: None,
) -> FMNResult:
    """Tune FMN on ``(x_tune, y_tune)`` and run it on the evaluated points ``(x, y)`` in every norm
    of ``spec``. ``x``/``x_tune``: ``[N, C, H, W]`` in [0, 1]. Deterministic for a given ``seed``."""
    model = model.to(device).eval()
    out = FMNResult()
    for norm in spec.norms:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        config, scores = tune(model, x_tune, y_tune, norm, spec, batch_size, device, log)
        t1 = time.perf_counter()
        log(f"FMN-{norm} ({config.label()}, {spec.steps} steps) on {len(x)} points")
        d, unverified = fmn_distances(model, x, y, norm, config, spec.steps, batch_size, device)
        out.norms[norm] = NormResult(norm, [_round(v) for v in d.tolist()], config, scores, unverified,
                                     time.perf_counter() - t1, t1 - t0)
    return out
