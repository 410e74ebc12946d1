"""Projected device time of a run's grid, before any work starts (``--advprune-estimate``).

The unit of work is one *pass*: a forward and backward pass of one sample through the preset's
architecture (what one PGD step or one training step costs per sample). Counts, from the preset:

* adversarial training, per epoch: ``n_train x (attack_steps + 1)`` passes (the attack's steps plus
  the training step). Dense pretraining: ``dense_train``, once per architecture. A cell of a method
  that prunes after training: ``prune_train + finetune`` epochs; before or during training: the
  whole budget ``dense_train + prune_train + finetune`` (:attr:`PruneContext.budget_epochs`); the
  ``dense`` reference: none.
* evaluation, per point: a third of a pass for the clean forward, ``pgd_steps`` passes for the
  PGD check (on every point), then AutoAttack's cascade: APGD-CE ``iters``, APGD-T and FAB-T
  ``iters x targets`` passes each, Square ``queries / 3`` (forwards only). As in AutoAttack, the
  first attack sees the correctly classified points and each later one the points still robust:
  the cell's clean and robust floors stand in for those fractions.

Seconds per pass come from a timed forward+backward of the architecture on the selected device
(about a second, measured on the spot). Data loading, optimiser steps and the rest are left out,
so read the result as a projection within a factor of about two, not a promise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tabulate import tabulate

from . import models
from .data import DATASETS
from .indicators import DEFAULT as INDICATORS, IndicatorSettings
from .registry import Pipeline, get as get_method
from .speed import synchronize
from .training import TrainSpec

#: Training-split sizes (``n_train=None`` in a preset means all of them).
TRAIN_SIZES = {"fashion_mnist": 60000, "cifar10": 50000, "svhn": 73257}
#: Standard AutoAttack's budgets (the same numbers pytest_advprune.attacks configures).
_STANDARD = {"attacks": ("apgd-ce", "apgd-t", "fab-t", "square"), "iters": 100, "targets": 9, "queries": 5000}


def train_passes(spec: TrainSpec, n_train: int) -> float:
    """Passes of ``spec.epochs`` epochs of adversarial training on ``n_train`` points."""
    return spec.epochs * n_train * (spec.attack_steps + 1)


def eval_passes(preset, clean_frac: float, robust_frac: float) -> float:
    """Passes of one cell's evaluation on the preset's ``n_eval`` points; ``clean_frac`` and
    ``robust_frac`` (fractions in [0, 1]) are the shares of points the first and the later attacks see.

    Counts the AutoAttack cascade and PGD, FMN (each norm's attack on the correct points, plus its
    tuning grid) and the attack-failure indicators (:func:`indicator_passes`)."""
    aa = preset.autoattack
    if aa.version == "standard":
        attacks, iters, targets, queries = _STANDARD["attacks"], _STANDARD["iters"], _STANDARD["targets"], _STANDARD["queries"]
    else:
        attacks, iters, targets, queries = aa.attacks, aa.apgd_iters, aa.n_target_classes, aa.square_queries
    cost = {"apgd-t": iters * targets, "fab-t": iters * targets, "square": queries / 3}
    per_point = 1 / 3 + preset.pgd_steps
    for i, name in enumerate(attacks):
        per_point += (clean_frac if i == 0 else robust_frac) * cost.get(name, iters)
    total = preset.n_eval * per_point
    if preset.fmn is not None:
        total += len(preset.fmn.norms) * clean_frac * preset.n_eval * preset.fmn.steps + preset.fmn.tuning_cost()
    return total + indicator_passes(preset.n_eval)


def indicator_passes(n_eval: int, settings: IndicatorSettings = INDICATORS) -> float:
    """Passes of the attack-failure indicators on the first ``min(n_eval, settings.n_points)`` points:
    repeated and single forwards (a third of a pass each), one gradient, the PGD loss trace, the
    unbounded attack, PGD at every eps of the grid and the transfer attack on the dense model."""
    forwards = (settings.repeats + 2) / 3
    attacks = 1 + settings.steps * (2 + len(settings.eps_factors)) + settings.unbounded_steps
    return min(n_eval, settings.n_points) * (forwards + attacks)


def seconds_per_pass(arch: str, dataset: str, batch_size: int, device: torch.device, budget_s: float = 1.0) -> float:
    """Measured seconds of one forward+backward pass of one sample through ``arch`` on ``device``
    (random inputs, a batch of ``batch_size``, gradients for inputs and weights, after one warm-up
    batch), timed for about ``budget_s`` seconds."""
    info = DATASETS[dataset]
    model = models.build(arch, dataset, 0).to(device).train()
    x = torch.rand(batch_size, info.channels, info.size, info.size, device=device, requires_grad=True)
    y = torch.randint(0, info.n_classes, (batch_size,), device=device)

    def step():
        F.cross_entropy(model(x), y).backward()

    step()
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < budget_s:
        step()
        n += 1
        synchronize(device)
    return (time.perf_counter() - t0) / (n * batch_size)


@dataclass
class Phase:
    """One row of the projection: ``passes`` of work, of which ``todo_passes`` are not cached yet."""

    name: str
    work: str
    passes: float
    todo_passes: float
    cached: str
    arch: str


@dataclass
class Estimate:
    """The projection of a run; seconds per pass per architecture in ``speed``."""

    preset: str
    device: str
    methods: list[str]
    phases: list[Phase]
    speed: dict[str, float]
    notes: list[str] = field(default_factory=list)
    n_cells: int = 0

    def hours(self, phase: Phase, todo: bool = False) -> float:
        return (phase.todo_passes if todo else phase.passes) * self.speed[phase.arch] / 3600

    @property
    def total_h(self) -> float:
        return sum(self.hours(p) for p in self.phases)

    @property
    def todo_h(self) -> float:
        return sum(self.hours(p, todo=True) for p in self.phases)

    def per_cell_h(self) -> float:
        """Device-hours of one pruned cell (prune/fine-tune + evaluation), averaged over the grid."""
        cell = [p for p in self.phases if p.name != "dense pretraining"]
        return sum(self.hours(p) for p in cell) / max(self.n_cells, 1)

    def render(self) -> str:
        rows = [[p.name, p.arch, p.work, f"{p.passes:.3g}", _duration(self.hours(p) * 3600), p.cached] for p in self.phases]
        rows.append(["total", "", "", "", _duration(self.total_h * 3600), f"{_duration(self.todo_h * 3600)} still to run"])
        speed = ", ".join(f"{a} {1 / s:,.0f} samples/s" for a, s in self.speed.items())
        lines = [
            f"advprune estimate: preset {self.preset}, methods {', '.join(self.methods)}, device {self.device} "
            f"(nothing is trained)",
            f"throughput (forward+backward passes, measured now): {speed}",
            tabulate(rows, ["phase", "arch", "work", "passes", "device time", "cached"], tablefmt="simple",
                     disable_numparse=True),
            *self.notes,
            f"projected: {self.total_h:.3g} device-hours for the grid, {self.todo_h:.3g} device-hours still to run "
            f"on {self.device} (divide by N with -n N on N devices)",
        ]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _method_epochs(method: str, preset) -> float:
    pipeline = get_method(method).taxonomy.pipeline
    if pipeline == Pipeline.NONE:
        return 0.0
    if pipeline == Pipeline.AFTER:
        return preset.prune_train.epochs + preset.finetune.epochs
    return preset.dense_train.epochs + preset.prune_train.epochs + preset.finetune.epochs


def _eval_cached(session, cell) -> bool:
    """Whether ``cell``'s evaluation is cached (its key needs the cached pruned weights)."""
    hit = session.cache.load_state("pruned", session.pruned_key(cell))
    if hit is None:
        return False
    model = models.build(cell.arch, session.preset.dataset, session.preset.seed)
    model.load_state_dict(hit[0], strict=True)
    return session.cache.has("eval", session.eval_key(session.model_identity(model, cell.arch)))


def estimate(session, budget_s: float = 1.0, batch: int | None = None) -> Estimate:
    """The projection of ``session``'s grid (an :class:`~pytest_advprune.session.AdvPruneSession`
    of methods, not of a checkpoint, that has built nothing) on its device. Reads the cache to say
    what is done; writes nothing. Throughput is timed for ``budget_s`` seconds per architecture on
    batches of ``batch`` (default: the preset's training batch, the size most passes run at; on a
    CPU shared with other work a smaller batch over-states the per-sample cost several times)."""
    p = session.preset
    n_train = p.n_train or TRAIN_SIZES[p.dataset]
    cells = [c for c in session.cells() if c.structure == "dense" or c.structure in get_method(c.method).structures]
    unsupported = len(session.cells()) - len(cells)
    device = session.device
    if batch is None:
        batch = p.dense_train.batch_size
    archs = sorted({c.arch for c in cells})
    speed = {a: seconds_per_pass(a, p.dataset, batch, device, budget_s) for a in archs}
    phases = []
    for arch in archs:
        done = session.cache.has("dense", session.dense_key(arch))
        passes = train_passes(p.dense_train, n_train)
        phases.append(Phase("dense pretraining", f"{p.dense_train.label()} x {n_train} points", passes,
                            0.0 if done else passes, "yes" if done else "no", arch))
        mine = [c for c in cells if c.arch == arch]
        pruned = [c for c in mine if _method_epochs(c.method, p) > 0]
        per = {c: _method_epochs(c.method, p) * n_train * (p.finetune.attack_steps + 1) for c in pruned}
        todo = [c for c in pruned if not session.cache.has("pruned", session.pruned_key(c))]
        epochs = sorted({_method_epochs(c.method, p) for c in pruned})
        phases.append(Phase("prune + fine-tune", f"{len(pruned)} cells x {'/'.join(f'{e:g}' for e in epochs) or 0} "
                            f"epochs x {n_train} points", sum(per.values()), sum(per[c] for c in todo),
                            f"{len(pruned) - len(todo)} of {len(pruned)}", arch))
        ev = {c: eval_passes(p, *session.floors(c)[1:]) for c in mine}
        todo = [c for c in mine if not _eval_cached(session, c)]
        phases.append(Phase("evaluation", f"{len(mine)} cells x {p.n_eval} points ({p.autoattack.label()})",
                            sum(ev.values()), sum(ev[c] for c in todo), f"{len(mine) - len(todo)} of {len(mine)}", arch))
    est = Estimate(p.name, str(device), list(session.config.methods), phases, speed, n_cells=len(cells))
    if unsupported:
        est.notes.append(f"{unsupported} cell(s) the methods do not support are skipped and cost nothing")
    if p.needs_gpu and device.type != "cuda":
        est.notes.append(f"preset {p.name} needs a GPU: on {device} its cells are skipped; the projection is for "
                         f"running them here anyway")
    return est

