"""Method registry: a method is a class registered by name with its survey taxonomy entry.

Sources of methods, loaded in this order: the in-repo collection (``methods/``, shipped as
``pytest_advprune.methods``), the entry-point group ``pytest_advprune.methods`` (each entry
point names a module to import), and ``--advprune-methods-dir`` (every ``*.py`` in a folder).
A method module registers its class with the :func:`register` decorator on import.

Taxonomy columns follow Piras et al. 2024 (survey), Table "taxonomy": pipeline A/B/D,
pretraining/finetuning (A) or pruning/training step (B) or training step (D), one-shot or
iterative, structured/unstructured, local/global, criterion.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .errors import AdvPruneError, UnknownMethod

if TYPE_CHECKING:
    from torch import nn
    from .session import PruneContext


class Pipeline(str, enum.Enum):
    AFTER = "A"  # prune after (adversarial) training, then fine-tune
    BEFORE = "B"  # find the mask before training, then train the sparse net
    DURING = "D"  # sparsity imposed while training
    NONE = "-"  # reference baselines that do not prune (dense)


class Schedule(str, enum.Enum):
    ONE_SHOT = "1S"
    ITERATIVE = "IT"
    NONE = "-"


class Locality(str, enum.Enum):
    LOCAL = "L"
    GLOBAL = "G"
    NONE = "-"


class Criterion(str, enum.Enum):
    LWM = "LWM"  # lowest weight magnitude
    SOLWM = "SOLWM"  # solver-based LWM (ADMM)
    RELWM = "RELWM"  # regularisation-based LWM
    LIS = "LIS"  # least importance score
    HGM = "HGM"  # highest gradient magnitude
    BCS = "BCS"  # Bayesian connectivity sampling
    RANDOM = "random"  # baseline: no criterion
    NONE = "-"


@dataclass(frozen=True)
class Taxonomy:
    """One row of the survey's taxonomy table.

    ``step1``/``step2``: for pipeline A the pretraining and finetuning kind; for B the pruning
    and training step; for D ``step1`` is ``-`` and ``step2`` the training step. Values like
    ``"AT (PGD)"``, ``"AT (TRADES)"``, ``"KD"``, ``"None"``.
    """

    paper: str
    pipeline: Pipeline
    step1: str
    step2: str
    schedule: Schedule
    locality: Locality
    criterion: Criterion
    repository: str = ""

    def row(self, structures: tuple[str, ...]) -> dict[str, str]:
        kinds = []
        if "weights" in structures:
            kinds.append("US")
        structured = [s for s in structures if s in ("filters", "channels")]
        if structured:
            kinds.append(f"S ({', '.join(structured)})")
        return {
            "pipeline": self.pipeline.value,
            "pretrain / prune step": self.step1,
            "finetune / train step": self.step2,
            "1S/IT": self.schedule.value,
            "S/US": ", ".join(kinds) or "-",
            "L/G": self.locality.value,
            "criterion": self.criterion.value,
            "paper": self.paper,
        }


class Method:
    """Base class of an AP method. Subclasses set ``name``, ``taxonomy``, ``structures`` and
    implement :meth:`prune`.

    ``structures`` lists what the method prunes, among ``weights`` (unstructured), ``filters``
    and ``channels``; the reference ``dense`` baseline uses ``("dense",)``.

    ``known_failures`` maps a preset name (every cell of that preset) or ``"<preset>:<structure>-<sparsity
    percent>"`` (one cell) to the reason the method is known to miss the accuracy floors there. The
    suite then marks those cells' clean and robust checks as expected failures: a failing check is
    reported ``XFAIL`` with its numbers and the reason; a check that passes after all shows as
    XPASS in pytest's summary and counts as passed. Sparsity is never excused. Editing this
    declaration, or the module's comments and docstrings, does not re-key the method's cached
    models (it changes verdicts or words, not weights).
    """

    name: ClassVar[str]
    taxonomy: ClassVar[Taxonomy]
    structures: ClassVar[tuple[str, ...]]
    known_failures: ClassVar[dict[str, str]] = {}

    def prune(self, ctx: "PruneContext") -> "nn.Module":
        """Return the pruned model for ``ctx.structure`` at ``ctx.sparsity`` (fraction), with pruned
        weights as exact zeros in plain Conv2d/Linear weights (no masks or scores left)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``.

    Raises AdvPruneError if the class lacks ``name``/``taxonomy``/``structures`` or if another
    class already holds the name.
    """
    for attr in ("name", "taxonomy", "structures"):
        if not hasattr(cls, attr):
            raise AdvPruneError(f"method class {cls.__qualname__} has no {attr!r}; set it as a class attribute")
    if not isinstance(cls.taxonomy, Taxonomy):
        raise AdvPruneError(f"method {cls.name!r}: taxonomy must be a pytest_advprune.registry.Taxonomy")
    bad = [s for s in cls.structures if s not in ("weights", "filters", "channels", "dense")]
    if bad or not cls.structures:
        raise AdvPruneError(f"method {cls.name!r}: structures must be among weights, filters, channels, dense; got {cls.structures}")
    other = _REGISTRY.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise AdvPruneError(f"method name {cls.name!r} is registered twice ({other.__module__} and {cls.__module__}); rename one")
    _REGISTRY[cls.name] = cls
    return cls


def load_builtin() -> None:
    """Import the in-repo methods and the entry-point group (once per process)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pytest_advprune.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="pytest_advprune.methods"):
        ep.load()


USER_PACKAGE = "advprune_user_methods"


def load_dir(path: str | Path) -> list[str]:
    """Import every ``*.py`` in ``path`` as a method module; return the names it registered.

    The folder is the package ``advprune_user_methods``, so a method file imports a helper beside
    it as ``from .helper import f`` or ``from advprune_user_methods.helper import f``, whatever the
    file names' order; each file is imported once. Raises AdvPruneError if ``path`` is not a folder
    or a module fails to import.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdvPruneError(f"--advprune-methods-dir={path}: not a folder; pass a folder of method files")
    package = sys.modules.get(USER_PACKAGE)
    if package is None:
        package = sys.modules[USER_PACKAGE] = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec(USER_PACKAGE, None, is_package=True))
        package.__path__ = []
    where = str(folder.resolve())
    package.__path__[:] = [where] + [p for p in package.__path__ if p != where]
    files = sorted(folder.glob("*.py"))
    for file in files:  # a same-named file of another folder loaded earlier must not stand in for this one
        loaded = sys.modules.get(f"{USER_PACKAGE}.{file.stem}")
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != file.resolve():
            del sys.modules[loaded.__name__]
    importlib.invalidate_caches()
    before = set(_REGISTRY)
    for file in files:
        try:
            importlib.import_module(f"{USER_PACKAGE}.{file.stem}")
        except AdvPruneError as exc:
            raise type(exc)(f"{file}: {exc}") from exc
        except Exception as exc:
            raise AdvPruneError(f"{file}: importing the method file failed: {type(exc).__name__}: {exc}") from exc
    return sorted(set(_REGISTRY) - before)


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The class registered as ``name``; raises :class:`UnknownMethod` listing the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; registered: {', '.join(names())}") from None


def resolve(spec: str) -> list[str]:
    """Method names from ``--advprune-method``: one name, a comma list, or ``all``."""
    if spec.strip() == "all":
        return names()
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    if not chosen:
        raise UnknownMethod(f"--advprune-method is empty; registered: {', '.join(names())}")
    for n in chosen:
        get(n)
    return list(dict.fromkeys(chosen))


def listing() -> str:
    """The registered methods with their taxonomy, as a plain-text table."""
    from tabulate import tabulate

    rows = []
    for name in names():
        cls = _REGISTRY[name]
        row = cls.taxonomy.row(cls.structures)
        rows.append([name] + list(row.values()))
    headers = ["method"] + list(Taxonomy("", Pipeline.NONE, "", "", Schedule.NONE, Locality.NONE, Criterion.NONE).row(()).keys())
    return tabulate(rows, headers)
