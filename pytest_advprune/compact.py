"""Physical compaction of structured-pruned models, and what it buys: parameters, FLOPs, latency.

A structured mask leaves a model of the dense shape whose pruned filters (``filters``) or input
channels (``channels``) are zero (see :mod:`pytest_advprune.sparsity`). :func:`compact` removes
them for real, with Torch-Pruning's dependency graph (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023; package ``torch-pruning``): one *group* per set of coupled
feature-map channels (a layer's filters, the BatchNorm after it, the input channels of every
layer that reads them, and for ResNet the whole residual stream of a stage).

A channel of a group is removed only when the outputs provably stay the same:

* nobody reads it: every consumer (Conv2d/Linear input channel) of the channel is zero; or
* it is a constant: every producer filter of the channel is zero. Such a channel is not zero in
  general: the BatchNorm shift or bias after the zero filter (and the residual sums and ReLU
  after that) make it a constant ``v`` per channel, which its consumers read. Its contribution
  is folded before removal: into the consumer's bias where the consumer sees a constant (Linear
  layers, convolutions without zero padding); for a zero-padded convolution a constant input
  contributes less at the image border than inside, so no bias reproduces it, and the group
  keeps one constant channel as a *carrier* whose consumer weights absorb the others' (scaled
  by the ratio of the constants). ``v`` is read from a forward pass of the masked model.

In a residual group a channel goes only if every member allows it (all producers zero, or all
consumers zero), so the physically removed fraction can be below the mask's sparsity:
:attr:`Compaction.removed_fraction` reports it under the same counting rule as the sparsity.

Every compaction is verified: the compacted and the masked model must give the same logits
(float64, eval mode, random inputs in [0, 1]); :class:`CompactionMismatch` is raised otherwise.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from .errors import AdvPruneError
from .sparsity import prunable_layers, structured_layers
from .speed import synchronize

Shape = tuple[int, ...]


class CompactionError(AdvPruneError):
    """A model that cannot be compacted (parametrised weights, a layer kind the folding does not support)."""


class CompactionMismatch(CompactionError):
    """The compacted model's outputs differ from the masked model's."""


@dataclass
class Compaction:
    """A compacted model and what was removed.

    ``model`` is the compacted copy (CPU, float32, eval mode); ``units_before``/``units_after`` map
    every prunable layer to its ``(output units, input units)`` (filters/channels of a Conv2d,
    rows/columns of a Linear); ``carriers`` counts the channels kept only to carry folded
    constants; ``max_abs_diff`` is the verified largest logit difference to the masked model;
    ``counted`` names the layers each structure's sparsity counts.
    """

    model: nn.Module
    units_before: dict[str, tuple[int, int]]
    units_after: dict[str, tuple[int, int]]
    carriers: int
    max_abs_diff: float
    counted: dict[str, list[str]]

    def removed_fraction(self, structure: str) -> float:
        """Fraction (in [0, 1]) of ``structure``'s units physically removed, counted over the layers
        the sparsity rule counts (filters: all prunable layers but the last; channels: all but the first)."""
        dim = 0 if structure == "filters" else 1
        names = self.counted[structure]
        before = sum(self.units_before[n][dim] for n in names)
        after = sum(self.units_after[n][dim] for n in names)
        return (before - after) / before if before else 0.0


def _units(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for n, m in prunable_layers(model).items():
        out[n] = (m.out_channels, m.in_channels) if isinstance(m, nn.Conv2d) else (m.out_features, m.in_features)
    return out


# ------------------------------------------------------------------ planning


@dataclass
class _Fold:
    """One folding step on ``module`` (a consumer), in original (uncompacted) input indices.

    ``bias``: add ``sum_i W[:, i] * value_i`` (summed over the kernel) to the bias, for inputs that are
    constants seen as constants. ``carry``: add ``ratio * W[:, src]`` to ``W[:, dst]`` (a carrier channel)."""

    module: nn.Module
    bias: list[tuple[int, float]] = field(default_factory=list)
    carry: list[tuple[int, int, float]] = field(default_factory=list)


def _zero_padded(m: nn.Module) -> bool:
    """Does ``m`` pad its input with zeros (so a constant input does not give a constant output)?"""
    if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros":
        return False
    if isinstance(m.padding, str):
        return m.padding == "same" and any(k > 1 for k in m.kernel_size)
    return any(p != 0 for p in m.padding)


@torch.no_grad()
def _input_ranges(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per input unit of each of ``layers``: ``(min, max)`` over the batch (and space) of one forward on ``x``."""
    out = {}

    def hook(m, args):
        a = args[0].detach()
        a = a.movedim(1, 0) if isinstance(m, nn.Conv2d) else a.movedim(-1, 0)
        a = a.flatten(1)
        out[m] = (a.min(dim=1).values, a.max(dim=1).values)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _plan_group(group, dg, ranges) -> tuple[list[int], list[_Fold], int]:
    """Root channels of ``group`` to remove, the folds that keep the outputs, and the number of carriers."""
    producers, consumers = [], []
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(m)
        pairs = list(zip(item.idxs, item.root_idxs))
        if item.dep.handler == pruner.prune_out_channels:
            producers.append((m, pairs))
        elif item.dep.handler == pruner.prune_in_channels:
            consumers.append((m, pairs))
    roots = sorted({r for _, pairs in producers + consumers for _, r in pairs})
    if not producers or not consumers:
        return [], [], 0
    for m, _ in producers + consumers:
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.transposed):
            raise CompactionError(f"grouped or transposed convolution {m} is not supported by the constant folding")

    all_zero = dict.fromkeys(roots, True)  # every producer filter of the channel is zero
    for m, pairs in producers:
        zero_rows = (m.weight.detach().flatten(1) == 0).all(dim=1)
        for i, r in pairs:
            all_zero[r] = all_zero[r] and bool(zero_rows[i])
    read = dict.fromkeys(roots, False)  # some consumer weight on the channel is non-zero
    nonzero_cols = {}
    for m, pairs in consumers:
        cols = (m.weight.detach().transpose(0, 1).flatten(1) != 0).any(dim=1)
        nonzero_cols[m] = cols
        for i, r in pairs:
            read[r] = read[r] or bool(cols[i])
    value = {}  # (consumer, input index) -> the constant it reads, for channels with all producers zero
    constant = dict(all_zero)
    for m, pairs in consumers:
        lo, hi = ranges[m]
        for i, r in pairs:
            if all_zero[r]:
                if lo[i] != hi[i]:  # not constant after all (an input path outside the group): keep it
                    constant[r] = False
                value[m, i] = float(lo[i])
    removable = [r for r in roots if not read[r] or constant[r]]

    # Zero-padded consumers need a carrier for the non-zero constants they read.
    padded = [(m, pairs) for m, pairs in consumers if _zero_padded(m)]
    need = {}
    for m, pairs in padded:
        need[m] = {r for i, r in pairs if r in removable and constant[r] and nonzero_cols[m][i] and value[m, i] != 0}
    index = {(m, r): i for m, pairs in consumers for i, r in pairs}
    carriers: list[int] = []

    def covered(m):
        return any(value[m, index[m, k]] != 0 for k in carriers)

    while True:
        uncovered = [m for m, _ in padded if need[m] - set(carriers) and not covered(m)]
        if not uncovered:
            break
        candidates = [r for r in removable if constant[r] and r not in carriers]
        carriers.append(max(candidates, key=lambda r: sum(value[m, index[m, r]] != 0 for m in uncovered)))
    removed = [r for r in removable if r not in carriers]
    if len(removed) == len(roots):  # a layer keeps at least one channel
        removed = removed[1:]

    folds = []
    gone = set(removed)
    for m, pairs in consumers:
        fold = _Fold(m)
        for i, r in pairs:
            if r not in gone or not constant[r] or not nonzero_cols[m][i] or value[m, i] == 0:
                continue
            if m in need:
                k = max((k for k in carriers if value[m, index[m, k]] != 0), key=lambda k: abs(value[m, index[m, k]]))
                fold.carry.append((i, index[m, k], value[m, i] / value[m, index[m, k]]))
            else:
                fold.bias.append((i, value[m, i]))
        if fold.bias or fold.carry:
            folds.append(fold)
    return removed, folds, len(carriers)


@torch.no_grad()
def _fold_constants(folds: list[_Fold]) -> None:
    """Apply the planned folds in place (float64 arithmetic, stored in the weights' dtype)."""
    for f in folds:
        w = f.module.weight
        if f.bias:
            if f.module.bias is None:
                f.module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            idx = torch.tensor([i for i, _ in f.bias], device=w.device)
            vals = torch.tensor([v for _, v in f.bias], dtype=torch.float64, device=w.device)
            cols = w.double().index_select(1, idx).reshape(w.shape[0], len(idx), -1).sum(2)  # [out, n]: kernel summed
            f.module.bias.add_((cols @ vals).to(w.dtype))
        for src, dst, ratio in f.carry:
            w[:, dst] = (w[:, dst].double() + ratio * w[:, src].double()).to(w.dtype)


# ------------------------------------------------------------------ compaction


def compact(model: nn.Module, input_shape: Shape, *, n_verify: int = 2, seed: int = 0) -> Compaction:
    """Physically remove the pruned filters and channels of ``model`` (see the module docstring).

    ``model``: a masked model with plain weights (pruned units as exact zeros, as the engine
    stores them); it is not changed. ``input_shape``: one input's ``(C, H, W)``. Returns a
    :class:`Compaction` whose model gives the same outputs. Raises :class:`CompactionError` for
    score-masked (parametrised) weights or unsupported layers, :class:`CompactionMismatch` if the
    verification on ``n_verify`` random inputs (seeded by ``seed``) fails.
    """
    import torch_pruning as tp

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise CompactionError("model has parametrised (score-masked) weights; bake them into plain weights first "
                              "(sparsity.bake_score_masks)")
    masked = copy.deepcopy(model).float().cpu().eval()
    work = copy.deepcopy(masked)
    for p in work.parameters():
        p.requires_grad_(True)  # the dependency graph traces autograd
    before = _units(work)
    example = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(work, example, verbose=False)
    layers = prunable_layers(work)
    classifier = list(layers.values())[-1]
    groups = [g for g in dg.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d, nn.Linear))
              if not any(item.dep.target.type == tp.ops.OPTYPE.OUTPUT for item in g)]
    probe = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(seed + 1))
    ranges = _input_ranges(work, list(layers.values()), probe)
    plans, n_carriers = [], 0
    with torch.no_grad():
        for g in groups:
            removed, folds, carriers = _plan_group(g, dg, ranges)
            plans.append((g[0].dep.target.module, g[0].dep.handler, removed, folds))
            n_carriers += carriers
    _fold_constants([f for *_, folds in plans for f in folds])
    for root, handler, removed, _ in plans:
        if removed:
            dg.get_pruning_group(root, handler, removed).prune()
    for p in work.parameters():
        p.requires_grad_(False)
    work.eval()
    diff = verify_same_outputs(masked, work, input_shape, n=n_verify, seed=seed)
    counted = {s: list(structured_layers(masked, s)) for s in ("filters", "channels")}
    return Compaction(work, before, _units(work), n_carriers, diff, counted)


@torch.no_grad()
def verify_same_outputs(reference: nn.Module, candidate: nn.Module, input_shape: Shape, *, n: int = 2,
                        seed: int = 0, rtol: float = 1e-4) -> float:
    """Largest absolute logit difference of ``candidate`` to ``reference`` on ``n`` random inputs
    (uniform in [0, 1], shape ``[n, *input_shape]``), computed in float64 on CPU in eval mode.

    Raises :class:`CompactionMismatch` if it exceeds ``rtol * max(1, max |reference logit|)``.
    """
    x = torch.rand((n, *input_shape), generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    ref = copy.deepcopy(reference).double().cpu().eval()(x)
    got = copy.deepcopy(candidate).double().cpu().eval()(x)
    if got.shape != ref.shape:
        raise CompactionMismatch(f"compacted model outputs shape {tuple(got.shape)}, the masked model {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= rtol * scale:
        raise CompactionMismatch(f"compacted model differs from the masked model: max |logit difference| {diff:.3g} > "
                                 f"{rtol * scale:.3g} on {n} random inputs; the compaction is wrong for this model")
    return diff


# ------------------------------------------------------------------ measurements


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element of every parameter, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Parameters minus the zero weights of the prunable layers: what sparse storage of an
    unstructured-pruned model keeps (biases, BatchNorm and normalisation counted in full)."""
    zeros = sum(int((m.weight.detach() == 0).sum()) for m in prunable_layers(model).values())
    return count_params(model) - zeros


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Shape) -> int:
    """FLOPs of one forward of one input ``(C, H, W)`` as ``torch.utils.flop_counter.FlopCounterMode``
    counts them (2 per multiply-accumulate of convolutions and matrix products; BatchNorm, ReLU and
    pooling are not counted)."""
    m = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros((1, *input_shape))
    with FlopCounterMode(display=False) as counter:
        m(x)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(models: dict[str, nn.Module], input_shape: Shape, batch: int, device: torch.device | str,
                    *, warmup: int = 3, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Median wall-clock seconds of one forward of a batch ``[batch, *input_shape]`` per model,
    in eval mode under ``no_grad``. The models are timed interleaved (one forward each per round)
    so drifts of a shared machine hit all alike; on CUDA every timing is bracketed by synchronisation.
    The models are moved to ``device``."""
    device = torch.device(device)
    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    ms = {k: m.to(device).eval() for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in ms}
    for i in range(warmup + repeats):
        for k, m in ms.items():
            synchronize(device)
            t0 = time.perf_counter()
            m(x)
            synchronize(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def inference_cost(model: nn.Module, structure: str, input_shape: Shape, device: torch.device | str, *,
                   batch: int = 16, warmup: int = 2, repeats: int = 7) -> dict:
    """Parameters, FLOPs (batch 1) and measured latency of a pruned ``model`` against its dense shape.

    Returns the keys of a cell's report record: ``params`` and ``flops`` (of the compacted model for
    ``filters``/``channels``; for ``weights``/``dense`` the non-zero parameters and the dense FLOPs),
    ``dense_params``, ``dense_flops``, ``latency_speedup`` (dense / compacted median latency of a
    batch of ``batch``; None when no physical speedup is claimed or compaction failed) and
    ``inference`` (details: latencies in ms, batch, repeats, device and CPU threads, removed
    fraction, carriers, verification, a note, or the reason it was not measured). Never raises:
    a model the compaction or the counters cannot handle (e.g. a library limitation) is recorded
    with the reason, so the cell itself stands.
    """
    out = {"params": None, "flops": None, "latency_speedup": None, "dense_params": count_params(model),
           "dense_flops": None}
    try:
        out["dense_flops"] = count_flops(model, input_shape)
        if structure not in ("filters", "channels"):
            out.update(params=count_nonzero_params(model), flops=out["dense_flops"])
            note = ("dense reference" if structure == "dense" else "unstructured: params are the non-zero parameters, "
                    "FLOPs the dense model's; no physical speedup is claimed (nominal sparsity only)")
            out["inference"] = {"note": note}
            return out
        t0 = time.perf_counter()
        c = compact(model, input_shape)
        compact_s = time.perf_counter() - t0
        device = torch.device(device)
        lat = measure_latency({"dense": copy.deepcopy(model), "compact": c.model}, input_shape, batch, device,
                              warmup=warmup, repeats=repeats)
    except Exception as exc:  # recorded on the cell, never failing it
        out["inference"] = {"error": f"not compacted: {type(exc).__name__}: {exc}"}
        return out
    out.update(params=count_params(c.model), flops=count_flops(c.model, input_shape),
               latency_speedup=lat["dense"] / lat["compact"])
    out["inference"] = {
        "dense_ms": 1000 * lat["dense"], "compact_ms": 1000 * lat["compact"], "batch": batch, "warmup": warmup,
        "repeats": repeats, "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "removed_fraction": c.removed_fraction(structure), "carriers": c.carriers, "max_abs_diff": c.max_abs_diff,
        "compact_s": round(compact_s, 3),
    }
    return out
