"""One conformance run, without pytest: cells, the dense model, pruning, evaluation, verdicts.

Flow of a cell (method, dataset, arch, structure, sparsity %):
  dense model (cached per preset/arch/seed/training code) -> method.prune (cached per cell,
  preset, method and engine code) -> measure sparsity -> evaluate (cached per pruned model,
  protocol and attack code) -> verdicts. The plugin turns verdicts into test outcomes and calls :meth:`record`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import math
import os
import pickle
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__, compact, data, models, registry, report, speed
from . import checkpoint as ckpt
from .cache import PACKAGE, Cache, code_digest, default_dir, digest, weights_digest
from .errors import AdvPruneError, BadDataset, BadOption, BadPrunedModel, OverBudget
from .evaluate import Evaluation, check_finite, evaluate, with_fmn
from .fmn import FMNResult, run_fmn
from .presets import Preset
from .sparsity import SparsityReport, dense_state_dict, fold_reparametrizations, measure
from .training import TrainSpec, adversarial_train


@dataclass(frozen=True, order=True)
class Cell:
    """The unit of caching, testing and reporting. ``sparsity`` in percent (0 for ``dense``)."""

    method: str
    dataset: str
    arch: str
    structure: str
    sparsity: int

    @property
    def id(self) -> str:
        return f"{self.method}-{self.dataset}-{self.arch}-{self.structure}-{self.sparsity}"


@dataclass
class RunConfig:
    """Everything a run needs, resolved from options. Floors overrides are fractions or None."""

    preset: Preset
    methods: list[str]
    device: str = "auto"
    data_dir: str | None = None
    cache_dir: str = field(default_factory=lambda: str(default_dir()))  # the plugin's default too
    report_path: str | None = None
    min_clean: float | None = None
    min_robust: float | None = None
    sparsity_tol: float | None = None
    checkpoint: "CheckpointSpec | None" = None

    def torch_device(self) -> torch.device:
        """Resolve ``auto``/``cpu``/``cuda``/``cuda:N``; raises :class:`BadOption` if CUDA is asked for but absent."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BadOption(f"--advprune-device={self.device}: no CUDA device here; use --advprune-device=cpu or auto")
            dev = torch.device(self.device)
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise BadOption(f"--advprune-device={self.device}: only {torch.cuda.device_count()} CUDA device(s)")
            return dev
        if self.device == "cpu":
            return torch.device("cpu")
        raise BadOption(f"--advprune-device={self.device}: use auto, cpu, cuda or cuda:N")

    def report_md(self) -> Path:
        return Path(self.report_path) if self.report_path else Path("reports") / f"{self.preset.name}.md"


@dataclass(frozen=True)
class CheckpointSpec:
    """An external pruned checkpoint to evaluate as one cell (``--advprune-checkpoint``).

    ``arch``: a registered architecture or ``path/to/file.py:ClassName``; ``sparsity`` the
    claimed target in percent (the measured sparsity decides the verdict); ``normalization``:
    ``model`` if the model normalises its inputs itself, ``dataset`` if inputs must be normalised
    with the dataset's mean/std before it.
    """

    path: str
    arch: str
    dataset: str
    structure: str
    sparsity: int
    name: str = "checkpoint"
    normalization: str = "model"


@dataclass
class PruneContext:
    """What a method's ``prune`` receives.

    ``dense`` is a private copy of the adversarially pretrained dense model (on ``device``);
    ``sparsity`` the target as a fraction; ``x_train``/``y_train`` the training split;
    ``preset.prune_train`` / ``preset.finetune`` the phase budgets. :meth:`train` runs the shared
    adversarial training loop with this run's seed, device and progress log.

    Budget accounting (reported per cell): every :meth:`train` call adds its epochs to
    ``trained_epochs``; work a method does outside it is added with :meth:`charge`. A method that
    prunes before or during training starts from :meth:`fresh_model` instead of ``dense`` and
    should spend at most :attr:`budget_epochs`, the total an after-training method gets (dense
    pretraining + prune phase + fine-tune).
    """

    dense: nn.Module
    structure: str
    sparsity: float
    preset: Preset
    x_train: torch.Tensor
    y_train: torch.Tensor
    device: torch.device
    seed: int
    log: Callable[[str], None]
    arch: str = "cnn"
    trained_epochs: float = 0.0
    from_scratch: bool = False

    @property
    def budget_epochs(self) -> float:
        """Training epochs an after-training method spends in all: dense pretraining + prune + fine-tune."""
        p = self.preset
        return p.dense_train.epochs + p.prune_train.epochs + p.finetune.epochs

    def fresh_model(self) -> nn.Module:
        """A randomly initialised model of this cell's architecture (seeded), on ``device``, for
        methods that prune before or during training; the cell is then accounted as trained from scratch."""
        self.from_scratch = True
        return models.build(self.arch, self.preset.dataset, self.seed).to(self.device)

    def train(self, model: nn.Module, spec: TrainSpec, desc: str, *, part: int = 0, **kwargs) -> list[float]:
        """:func:`~pytest_advprune.training.adversarial_train` on the training split. A budget split
        into parts (rounds, ADMM segments) passes ``part`` = 0, 1, ... so each part draws its own
        data order (seed + part) instead of replaying the start of the same permutation.

        Raises :class:`~pytest_advprune.errors.OverBudget`, before training, if the epochs would take
        the cell past :attr:`budget_epochs` (the one budget every method gets)."""
        if self.from_scratch and model is self.dense:
            raise OverBudget(f"{desc}: trains ctx.dense, which is pretrained, after ctx.fresh_model() made the cell "
                             "from scratch; train the fresh model")
        self.charge(spec.epochs, desc)
        return adversarial_train(
            model, self.x_train, self.y_train, spec, seed=self.seed + part, device=self.device, log=self.log,
            desc=desc, augment=data.DATASETS[self.preset.dataset].augment, **kwargs,
        )

    def charge(self, epochs: float, desc: str) -> None:
        """Count ``epochs`` against the cell's budget: :meth:`train` charges its own; a method charges
        here, before doing it, the training-equivalent work it runs outside :meth:`train` (e.g. MAD's
        saliency pass, in epochs of the prune phase it replaces), so the report's budget is complete.

        Raises :class:`~pytest_advprune.errors.OverBudget` if ``epochs`` would take the cell past
        :attr:`budget_epochs`, and ValueError if ``epochs`` is negative or not finite."""
        if not math.isfinite(epochs) or epochs < 0:
            raise ValueError(f"{desc}: cannot charge {epochs!r} epochs; charge the work's length in epochs, >= 0")
        if self.pretrain_epochs + self.trained_epochs + epochs > self.budget_epochs + 1e-6:  # 1e-6: epoch fractions
            raise OverBudget(f"{desc}: {epochs:g} more epochs would make {self.pretrain_epochs:g} + "
                             f"{self.trained_epochs + epochs:g} of the preset's budget of {self.budget_epochs:g} "
                             f"(dense pretraining + prune phase + fine-tune); split the budget between the phases")
        self.trained_epochs += epochs

    @property
    def pretrain_epochs(self) -> float:
        """The dense model's training epochs, which the cell inherits unless it trains from scratch."""
        return 0.0 if self.from_scratch else self.preset.dense_train.epochs

    def budget(self) -> dict[str, float]:
        """Epochs spent: ``pretrain`` (:attr:`pretrain_epochs`), ``method``, ``total``."""
        pretrain = self.pretrain_epochs
        return {"pretrain": pretrain, "method": self.trained_epochs, "total": pretrain + self.trained_epochs}


@dataclass
class Verdict:
    """Outcome of one conformance check: ``passed`` True/False, or None when not applicable (skip)."""

    passed: bool | None
    message: str


@dataclass
class CellResult:
    cell: Cell
    sparsity: SparsityReport | None
    evaluation: Evaluation | None
    duration_s: float
    skip_reason: str | None = None
    error: str | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    budget: dict[str, float] | None = None
    known_failure: str | None = None
    inference: dict | None = None
    eval_key: str | None = None
    indicators: dict | None = None  # name -> indicators.Indicator, once computed
    # stage (model: trained or pruned; evaluation; fmn; indicators) -> where and when that artefact was computed
    # (:meth:`AdvPruneSession.built`), None when unknown (a cache entry written before this was recorded)
    provenance: dict[str, dict | None] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Versions that affect results: python, torch, torchvision, pyautoattack, torch-pruning, secml-torch, this
    package, and torch's CPU thread count (CPU float results depend on it)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "pytest-advprune": __version__, "torch": torch.__version__,
           "cpu threads": str(torch.get_num_threads())}
    for pkg in ("torchvision", "pyautoattack", "torch-pruning", "secml-torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


# A trained model depends on the training loop and the built-in models; an evaluated artefact on
# the test split's loading and the models' forward.
_TRAINING_CODE = (f"{PACKAGE}.training", f"{PACKAGE}.models")
_SPLIT_AND_FORWARD = (f"{PACKAGE}.data", f"{PACKAGE}.models")


def method_code_digest(cls: type) -> str:
    """:func:`~pytest_advprune.cache.code_digest` of a method class's module, with the engine a
    method trains through (``PruneContext.train``, ``fresh_model``): its pruned models' code key."""
    return code_digest(cls.__module__, *_TRAINING_CODE)


def load_checkpoint_model(spec: CheckpointSpec, seed: int = 0) -> nn.Module:
    """The model of an external checkpoint, folded to plain weights with zeros, strictly loaded,
    in eval mode, float32. Raises :class:`~pytest_advprune.checkpoint.CheckpointError` or
    :class:`~pytest_advprune.errors.NonFiniteModel` with a one-line message naming the file."""
    state = ckpt.fold(ckpt.read_state_dict(spec.path), spec.sparsity / 100)
    ckpt.check_finite_state(state, spec.path)
    info = data.DATASETS[spec.dataset]
    if spec.arch in models.ARCHITECTURES:
        model = models.build(spec.arch, spec.dataset, seed)
        if "normalize.mean" not in state:  # foreign checkpoint of our architecture: set its normalisation
            identity = spec.normalization == "model"
            state["normalize.mean"] = torch.zeros(1, info.channels, 1, 1) if identity else model.normalize.mean.clone()
            state["normalize.std"] = torch.ones(1, info.channels, 1, 1) if identity else model.normalize.std.clone()
        ckpt.load_into(model, state, spec.path)
        return model.float().eval()
    model = ckpt.user_architecture(spec.arch)()
    ckpt.load_into(model, state, spec.path)
    model = ckpt.FirstOutput(model)
    if spec.normalization == "dataset":
        model = nn.Sequential(models.Normalize(info.mean, info.std), model)
    return model.float().eval()


class AdvPruneSession:
    """Builds each cell once, keeps results, writes the report. Knows nothing of pytest."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = lambda s: None):
        self.config = config
        self.preset = config.preset
        self.log = log
        self.device = config.torch_device()
        speed.configure_threads()  # env ADVPRUNE_THREADS; by default torch's thread count stays
        speed.FastPath.for_device(self.device)  # a bad ADVPRUNE_COMPILE is a usage error now, not per cell
        self.notices: list[str] = []
        self.cache = Cache(config.cache_dir, self.notice)  # a corrupt entry rebuilt is said under -q too
        self._results: dict[Cell, CellResult] = {}
        self._data: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense: dict[str, nn.Module] = {}
        self._dense_built: dict[str, dict | None] = {}
        self.started = _dt.datetime.now(_dt.timezone.utc)

    # ---------------------------------------------------------------- grid

    def cells(self) -> list[Cell]:
        """Every cell of the selected methods on the preset's grid, structured cells included even
        for methods without structured support (those are skipped with the reason)."""
        p = self.preset
        ck = self.config.checkpoint
        if ck is not None:
            return [Cell(ck.name, ck.dataset, ck.arch, ck.structure, ck.sparsity)]
        out = []
        for name in self.config.methods:
            cls = registry.get(name)
            for arch in p.archs:
                if "dense" in cls.structures:
                    out.append(Cell(name, p.dataset, arch, "dense", 0))
                    continue
                out += [Cell(name, p.dataset, arch, "weights", s) for s in p.weights_sparsities]
                structured = next((s for s in cls.structures if s in ("filters", "channels")), "filters")
                out += [Cell(name, p.dataset, arch, structured, s) for s in p.structured_sparsities]
        return out

    def skip_reason(self, cell: Cell) -> str | None:
        if self.config.checkpoint is not None:
            return None
        cls = registry.get(cell.method)
        if cell.structure != "dense" and cell.structure not in cls.structures:
            return f"{cell.method} does not support {cell.structure} pruning (supports: {', '.join(cls.structures)})"
        if self.preset.needs_gpu and self.device.type != "cuda":
            return f"preset {self.preset.name} needs a GPU (protocol of the survey); run it with --advprune-device=cuda"
        return None

    def known_failure(self, cell: Cell) -> str | None:
        """The reason this cell is expected to fail its accuracy checks (the method's
        ``known_failures`` entry for this preset or this cell), or None."""
        if self.config.checkpoint is not None:
            return None
        entries = registry.get(cell.method).known_failures
        key = f"{self.preset.name}:{cell.structure}-{cell.sparsity}"
        return entries.get(key) or entries.get(self.preset.name)

    def floors(self, cell: Cell) -> tuple[float, float, float]:
        """``(sparsity tolerance, min clean, min robust)`` for ``cell``, CLI overrides applied."""
        clean, robust = self.preset.floors.for_cell(cell.structure, cell.sparsity)
        c = self.config
        return (
            self.preset.floors.sparsity_tol if c.sparsity_tol is None else c.sparsity_tol,
            clean if c.min_clean is None else c.min_clean,
            robust if c.min_robust is None else c.min_robust,
        )

    # ---------------------------------------------------------------- cache keys

    def _augmentation(self) -> dict[str, str]:
        """The training augmentation's part of a key: none for datasets trained without one (so
        their keys predate augmentation), else its kind."""
        kind = data.DATASETS[self.preset.dataset].augment
        return {} if kind == "none" else {"augment": kind}

    def dense_key(self, arch: str) -> str:
        """Cache key of the preset's dense model for ``arch`` (kind ``dense``): the preset's data and
        dense training, the architecture, the training augmentation and the training code."""
        p = self.preset
        return digest({"kind": "dense", "preset": p.fingerprint("dataset", "n_train", "eps", "seed", "dense_train"), "arch": arch,
                       "code": code_digest(*_TRAINING_CODE), **self._augmentation()})

    def pruned_key(self, cell: Cell) -> str:
        """Cache key of ``cell``'s pruned model (kind ``pruned``): cell, method and engine code
        (:func:`method_code_digest`), training budgets and augmentation."""
        return digest({
            "kind": "pruned", "cell": cell.id, "code": method_code_digest(registry.get(cell.method)),
            "preset": self.preset.fingerprint("dataset", "n_train", "eps", "seed", "dense_train", "prune_train", "finetune"),
            **self._augmentation(),
        })

    def model_identity(self, model: nn.Module, arch: str) -> str:
        """What identifies an evaluated model in cache keys: its :func:`weights_digest`, plus, for a
        user architecture (``path/to/file.py:Class``), the class name and the sha256 of that file,
        since the forward code is not in the weights. Built-in architectures' code enters the
        evaluation keys through ``models`` in their code digests, so their identity is the weights alone."""
        weights = weights_digest(model)
        if arch in models.ARCHITECTURES:
            return weights
        file, _, name = arch.rpartition(":")
        return f"{weights}:{name}:{hashlib.sha256(Path(file).read_bytes()).hexdigest()}"

    def eval_key(self, identity: str, preset: Preset | None = None) -> str:
        """Cache key of an evaluation (kind ``eval``): the model's :meth:`model_identity`, the
        attack protocol (of ``preset``, default the run's) and the evaluation code."""
        return digest({"kind": "eval", "model": identity, "code": code_digest(f"{PACKAGE}.evaluate", *_SPLIT_AND_FORWARD),
                       "protocol": (preset or self.preset).fingerprint("dataset", "n_eval", "eps", "seed", "autoattack",
                                                                        "pgd_steps")})

    # ---------------------------------------------------------------- building

    def built(self) -> dict:
        """Provenance stored with every artefact this process builds: ``device``, UTC ``date`` and
        :func:`versions`. A cache shared between machines serves artefacts built elsewhere, so each
        record reports its artefacts' provenance, not the device of the run that reads them."""
        return {"device": str(self.device), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions()}

    def check_data(self) -> None:
        """Load the test split now if any cell will run, so a missing dataset is one error before any
        cell (:class:`~pytest_advprune.errors.DatasetNotFound`), not an ERROR replacing every cell's
        earlier result in the report."""
        if any(self.skip_reason(c) is None for c in self.cells()):
            self._split(False)

    def _split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The preset's training or test points. Raises :class:`~pytest_advprune.errors.DatasetNotFound`
        or, for files that are present but unreadable, :class:`~pytest_advprune.errors.BadDataset` (one
        line: the file, what is wrong, the fix)."""
        if train not in self._data:
            p = self.preset
            limit = p.n_train if train else p.n_eval
            info = data.DATASETS[p.dataset]
            hint = f"reinstall it (`apt-get install --reinstall {info.debian_package}`) or " if info.debian_package else ""
            fix = f"fix: {hint}point --advprune-data-dir=DIR (or {data.ENV_VAR}) at an intact copy in torchvision's format"
            try:
                x, y = data.load(p.dataset, train, self.config.data_dir, Path(self.config.cache_dir) / "data", limit)
            except (ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as exc:
                raise BadDataset(f"dataset {p.dataset}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                 f"{fix}") from exc
            split, shape = "train" if train else "test", (info.channels, info.size, info.size)
            labels_ok = y.dim() == 1 and (not len(y) or 0 <= int(y.min()) <= int(y.max()) < info.n_classes)
            if tuple(x.shape[1:]) != shape or not labels_ok:
                raise BadDataset(f"dataset {p.dataset} ({split} split): images of shape {tuple(x.shape)} and labels of shape "
                                 f"{tuple(y.shape)}, not [N, {', '.join(map(str, shape))}] and [N] in 0-{info.n_classes - 1} "
                                 f"(images and labels files swapped, or another dataset's files?); {fix}")
            self._data[train] = x, y
        return self._data[train]

    def dense_model(self, arch: str) -> nn.Module:
        """The preset's adversarially pretrained dense model for ``arch`` (trained once, then cached)."""
        if arch in self._dense:
            return self._dense[arch]
        p = self.preset
        key = self.dense_key(arch)

        def build():
            x, y = self._split(True)
            model = models.build(arch, p.dataset, p.seed)
            t0 = time.perf_counter()
            self.log(f"training the dense {arch} on {p.dataset} ({p.dense_train.label()}); cached afterwards")
            adversarial_train(model, x, y, p.dense_train, seed=p.seed, device=self.device, log=self.log, desc=f"dense {arch}",
                              augment=data.DATASETS[p.dataset].augment)
            check_finite(model)
            return model.state_dict(), {"train_s": time.perf_counter() - t0, "built": self.built()}

        state, meta, _ = self.cache.state("dense", key, build)
        model = models.build(arch, p.dataset, p.seed)
        model.load_state_dict(state, strict=True)
        self._dense[arch] = model.to(self.device).eval()
        self._dense_built[arch] = meta.get("built")
        return self._dense[arch]

    def _cached_dense(self, arch: str) -> nn.Module | None:
        """The preset's dense model for ``arch`` if already loaded or cached, else None: never trains
        one that was never built, but rebuilds a cached one found corrupt (the cache deletes it)."""
        if arch not in self._dense and not self.cache.has("dense", self.dense_key(arch)):
            return None
        return self.dense_model(arch)

    def _pruned(self, cell: Cell) -> tuple[nn.Module, dict]:
        p = self.preset
        if self.config.checkpoint is not None:
            return load_checkpoint_model(self.config.checkpoint, p.seed).to(self.device).eval(), {"prune_s": 0.0}
        cls = registry.get(cell.method)
        key = self.pruned_key(cell)
        model = models.build(cell.arch, p.dataset, p.seed)  # the architecture the state must fit, then the loaded model

        def build():
            dense = self.dense_model(cell.arch)
            if cell.structure == "dense":
                epochs = p.dense_train.epochs
                return dense.state_dict(), {"prune_s": 0.0, "budget": {"pretrain": epochs, "method": 0.0, "total": epochs},
                                            "built": self._dense_built.get(cell.arch)}
            x, y = self._split(True)
            ctx = PruneContext(
                copy.deepcopy(dense), cell.structure, cell.sparsity / 100, p, x, y, self.device, p.seed,
                lambda s: self.log(f"[{cell.id}] {s}"), arch=cell.arch,
            )
            t0 = time.perf_counter()
            pruned = cls().prune(ctx)
            if not isinstance(pruned, nn.Module):
                raise TypeError(f"{cell.method}.prune returned {type(pruned).__name__}, not the pruned model; "
                                "return the nn.Module (e.g. ctx.dense after pruning it)")
            check_finite(pruned)
            state = dense_state_dict(fold_reparametrizations(pruned))
            problem = ckpt.state_mismatch(model.state_dict(), state)
            if problem:  # checked before caching, so the cache never holds a model that cannot load
                raise BadPrunedModel(f"{cell.method}.prune returned a model that does not fit the {cell.arch} "
                                     f"architecture: {problem}; prune ctx.dense in place and return it")
            return state, {"prune_s": time.perf_counter() - t0, "budget": ctx.budget(), "built": self.built()}

        state, meta, _ = self.cache.state("pruned", key, build)
        model.load_state_dict(state, strict=True)
        return model.to(self.device).eval(), meta

    def result(self, cell: Cell, evaluated: bool = True) -> CellResult:
        """Build (once) and return the cell's result; the evaluation only when ``evaluated``
        (a sparsity check alone needs no attacks). Errors are kept on the result, not raised."""
        res = self._results.get(cell)
        if res is None:
            reason = self.skip_reason(cell)
            res = self._results[cell] = CellResult(cell, None, None, 0.0, skip_reason=reason,
                                                   known_failure=self.known_failure(cell))
            if not reason:
                self._guard(res, lambda: self._build_pruned(res))
        if evaluated and res.evaluation is None and not (res.skip_reason or res.error):
            self._guard(res, lambda: self._build_evaluation(res))
        return res

    def _guard(self, res: CellResult, step: Callable[[], None]) -> None:
        try:
            step()
        except (AdvPruneError, FloatingPointError) as exc:
            res.error = str(exc)
        except Exception as exc:  # a method's own bug: keep it on the cell, with where it happened
            where = traceback.extract_tb(exc.__traceback__)[-1]
            res.error = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"

    def _build_pruned(self, res: CellResult) -> None:
        model, meta = self._pruned(res.cell)
        res.model = model
        res.sparsity = measure(model, res.cell.structure)
        res.duration_s = meta.get("prune_s", 0.0)
        res.budget = meta.get("budget")
        res.provenance["model"] = meta.get("built")
        info = data.DATASETS[res.cell.dataset]  # parameters, FLOPs, latency: measured, never cached, never failing
        res.inference = compact.inference_cost(model, res.cell.structure, (info.channels, info.size, info.size), self.device)

    def _build_evaluation(self, res: CellResult) -> None:
        x, y = self._split(False)
        log = lambda s: self.log(f"[{res.cell.id}] {s}")
        identity = self.model_identity(res.model, res.cell.arch)

        def build():
            # A cached evaluation under a prefix of the cascade (e.g. before the preset gained Square) is resumed.
            prefixes = (dataclasses.replace(self.preset, autoattack=a) for a in self.preset.autoattack.prefixes())
            earlier = next(filter(None, (self.cache.load_json("eval", self.eval_key(identity, p)) for p in prefixes)), None)
            resume = Evaluation.from_dict(earlier) if earlier else None
            return {**evaluate(res.model, x, y, self.preset, self.device, log, resume=resume).to_dict(), "built": self.built()}

        key = self.eval_key(identity)
        payload, _ = self.cache.json("eval", key, build)
        res.evaluation = Evaluation.from_dict(payload)
        res.provenance["evaluation"] = payload.get("built")
        res.duration_s += res.evaluation.duration_s
        if self.preset.fmn is not None:
            result, res.provenance["fmn"] = self._fmn(res.model, identity, log)
            res.evaluation = with_fmn(res.evaluation, result, self.preset.eps)
            res.duration_s += result.seconds

        res.eval_key = key

    def fmn_key(self, identity: str) -> str:
        """Cache key of an FMN run (kind ``fmn``): the model's :meth:`model_identity`, the evaluated
        points, the preset's FMN spec and the FMN code."""
        p = self.preset
        return digest({"kind": "fmn", "model": identity, "code": code_digest(f"{PACKAGE}.fmn", *_SPLIT_AND_FORWARD),
                       "data": p.fingerprint("dataset", "n_eval", "seed"), "fmn": dataclasses.asdict(p.fmn)})

    def _fmn(self, model: nn.Module, identity: str, log: Callable[[str], None]) -> tuple[FMNResult, dict | None]:
        """FMN distances of ``model`` on the evaluated points, cached in their own kind (``fmn``) by
        the model's :meth:`model_identity`, the preset's FMN spec and the FMN code, so the
        AutoAttack evaluations stay valid; with where they were computed (:meth:`built`, None if unknown)."""
        p = self.preset
        key = self.fmn_key(identity)

        def build() -> dict:
            x, y = self._split(False)
            x_tune, y_tune = self._tuning_split()
            return {**run_fmn(model, x, y, x_tune, y_tune, p.fmn, p.eval_batch, self.device, p.seed, log).to_dict(),
                    "built": self.built()}

        payload, _ = self.cache.json("fmn", key, build)
        return FMNResult.from_dict(payload), payload.get("built")

    def _tuning_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FMN's tuning points, disjoint from the evaluated ones: the test points right after the
        first ``n_eval``, or the first training points (``tune_split``). Raises :class:`BadOption`
        when the test split has too few points."""
        p, spec = self.preset, self.preset.fmn
        if spec.tune_split == "train":
            x, y = self._split(True)
            return x[: spec.tune_points], y[: spec.tune_points]
        need = p.n_eval + spec.tune_points
        x, y = data.load(p.dataset, False, self.config.data_dir, Path(self.config.cache_dir) / "data", need)
        if len(x) < need:
            raise BadOption(f"preset {p.name}: FMN tuning needs test points {p.n_eval}..{need - 1} but {p.dataset}'s test "
                            f"split has {len(x)}; set the preset's FMNSpec(tune_split='train')")
        return x[p.n_eval:], y[p.n_eval:]

    def indicators_key(self, eval_key: str, source_key: str | None) -> str:
        """Cache key of a cell's attack-failure indicators (kind ``indicators``): the evaluation's
        key, the transfer source's weights digest, the indicator settings and code."""
        from . import indicators

        return digest({"kind": "indicators", "eval": eval_key, "source": source_key,
                       "settings": indicators.DEFAULT.fingerprint(),
                       "code": code_digest(indicators.__name__, *_SPLIT_AND_FORWARD)})

    def _build_indicators(self, res: CellResult) -> None:
        """The attack-failure indicators of an evaluated cell, cached in their own kind, keyed by the
        evaluation's key, the transfer source's weights, the indicator settings and code, with where and
        when they were computed (``res.provenance["indicators"]``)."""
        from . import indicators

        x, y = self._split(False)
        arch = res.cell.arch if self.config.checkpoint is None else self.preset.archs[0]
        source = None if res.cell.structure == "dense" else self._cached_dense(arch)
        source_key = None if source is None else weights_digest(source)[:24]
        key = self.indicators_key(res.eval_key, source_key)
        log = lambda s: self.log(f"[{res.cell.id}] {s}")
        payload, _ = self.cache.json("indicators", key, lambda: {
            **{k: v.to_dict() for k, v in indicators.compute(res.model, x, y, res.evaluation, self.preset.eps,
                                                             self.preset.seed, self.device, source, log=log).items()},
            "built": self.built()})
        # an entry cached before provenance was stored has no "built": its provenance is unknown (None)
        res.provenance["indicators"] = payload.get("built")
        res.indicators = {k: indicators.Indicator.from_dict(v) for k, v in payload.items() if k != "built"}

    # ---------------------------------------------------------------- verdicts

    def check(self, cell: Cell, kind: str) -> Verdict:
        """Verdict of ``kind`` in ``sparsity``/``clean``/``robust``/``indicator:<name>`` for ``cell``
        (names in :data:`pytest_advprune.indicators.NAMES`)."""
        res = self.result(cell, evaluated=kind != "sparsity")
        if res.skip_reason:
            return Verdict(None, res.skip_reason)
        if res.error:
            return Verdict(False, res.error)
        if kind.startswith("indicator:"):
            if res.indicators is None:
                self._guard(res, lambda: self._build_indicators(res))
                if res.error:
                    return Verdict(False, res.error)
            ind = res.indicators[kind.split(":", 1)[1]]
            return Verdict(ind.passed, f"{ind.name}: {ind.message}")
        tol, min_clean, min_robust = self.floors(cell)
        ev = res.evaluation
        if kind == "sparsity":
            if cell.structure == "dense":
                return Verdict(None, "not applicable: the dense reference model is not pruned")
            target = cell.sparsity / 100
            got = res.sparsity.sparsity
            ok = got >= target - tol
            return Verdict(ok, f"{cell.structure} sparsity {got:.2%} vs target {target:.0%} (tolerance {tol:.2%}); "
                               f"weight sparsity {res.sparsity.weight_sparsity:.2%}")
        if kind == "clean":
            a = ev.clean
            return Verdict(a.acc >= min_clean, f"clean accuracy {a.acc:.2%} (95% CI {a.ci95[0]:.1%}-{a.ci95[1]:.1%}, "
                                               f"n={a.n}) vs floor {min_clean:.0%}")
        if kind == "robust":
            a = ev.robust
            per = ", ".join(f"{k} {v.acc:.1%}" for k, v in ev.attacks.items())
            return Verdict(a.acc >= min_robust, f"robust accuracy {a.acc:.2%} (95% CI {a.ci95[0]:.1%}-{a.ci95[1]:.1%}, "
                                                f"n={a.n}; {per}) vs floor {min_robust:.0%}")
        raise ValueError(f"unknown check {kind!r}")

    def record(self, cell: Cell, kind: str, outcome: str) -> None:
        """Remember a test outcome (``passed``/``failed``/``skipped``) for the report."""
        self.result(cell, evaluated=False).outcomes[kind] = outcome

    # ---------------------------------------------------------------- reporting

    def records(self) -> list[dict]:
        out = []
        vers = versions()
        for cell, res in sorted(self._results.items()):
            out.append(report.make_record(cell, res, self, vers))
        return out

    def run_records(self) -> list[dict]:
        """Records of the cells this process ran checks of (cells never reached are left out)."""
        return [r for r in self.records() if r["status"] != "not run"]

    def notice(self, message: str) -> None:
        """Keep a message about the report (a record kept or moved aside) for the end of the run; unlike
        :attr:`log`'s progress lines it is shown under ``-q`` too."""
        self.notices.append(message)

    def finish(self, records: list[dict] | None = None) -> tuple[Path, Path] | None:
        """Merge ``records`` (default: this process's :meth:`run_records`; a pytest-xdist controller
        passes its workers') into the report files; returns their paths, or None if there are none."""
        recs = self.run_records() if records is None else records
        if not recs:
            return None
        md = self.config.report_md()
        try:
            return report.write(md, recs, self)
        except (AdvPruneError, OSError) as exc:  # nothing is lost: the records go aside, ready to merge into the report
            aside = (Path(self.config.cache_dir) / "unwritten-reports"
                     / f"{self.preset.name}-{self.started:%Y%m%dT%H%M%S}-{os.getpid()}.json")
            try:
                report.save_aside(aside, recs, self)
            except OSError as err:
                raise report.ReportMismatch(f"{exc}; saving this run's records to {aside} failed too ({err})") from None
            into = f"{md.with_suffix('.json')} " if md.with_suffix(".json").exists() else ""
            raise report.ReportMismatch(f"{exc}; this run's records are saved in {aside}: add them to the report with "
                                        f"python -m pytest_advprune.report merge {into}{aside} -o {md}") from None
