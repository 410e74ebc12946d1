"""pytest hooks of pytest-advprune; each hook is a few lines that call the engine.

Without ``--advprune-method`` (or ``--advprune-list``) the plugin adds nothing to a run. Heavy
imports (torch, attacks) happen only when the plugin is active, so ``pytest --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

SUITE = Path(__file__).parent / "conformance" / "test_conformance.py"
CHECKS = {"test_sparsity": "sparsity", "test_clean_accuracy": "clean", "test_robust_accuracy": "robust"}
_SESSION = pytest.StashKey["object"]()

_OPTIONS = [
    # (name, help, default) — every option is also readable from [tool.pytest.ini_options] as advprune_<name>
    ("method", "method(s) to run: a name, a comma list, or 'all'", None),
    ("preset", "benchmark preset: smoke, quick (default), cifar10, svhn", None),
    ("device", "auto (GPU when present), cpu, cuda or cuda:N", "auto"),
    ("data-dir", "folder with the datasets in torchvision's format (also env ADVPRUNE_DATA_DIR)", None),
    ("cache-dir", "folder of cached dense/pruned models and evaluations (also env ADVPRUNE_CACHE_DIR; "
     "default ~/.cache/pytest-advprune)", None),
    ("report", "markdown report path; the JSON goes beside it (default reports/<preset>.md under rootdir)", None),
    ("methods-dir", "import every *.py in this folder as method modules", None),
    ("min-clean", "override the preset's clean-accuracy floor, in percent", None),
    ("min-robust", "override the preset's robust-accuracy floor, in percent", None),
    ("sparsity-tol", "override the preset's sparsity tolerance, in percentage points", None),
    ("checkpoint", "evaluate this pruned checkpoint (state_dict .pt/.pth or .safetensors) as one cell", None),
    ("arch", "checkpoint architecture: cnn, resnet18, vgg16, or path/to/file.py:ClassName", None),
    ("dataset", "checkpoint dataset: fashion_mnist, cifar10, svhn (picks the preset of that dataset)", None),
    ("structure", "checkpoint structure: weights, filters or channels", "weights"),
    ("sparsity", "checkpoint target sparsity in percent (also the k of HYDRA-style score layers)", None),
    ("name", "row name of the checkpoint in the report", "checkpoint"),
    ("normalization", "'model' if the checkpoint's model normalises inputs itself, 'dataset' if it expects "
     "inputs normalised with the dataset mean/std", "model"),
]
_DATASET_PRESET = {"fashion_mnist": "quick", "cifar10": "cifar10", "svhn": "svhn"}


_PATH_OPTIONS = ("data-dir", "cache-dir", "report", "methods-dir", "checkpoint", "compare")


def _opt(config: pytest.Config, name: str):
    """The option's command-line value, else its ``[tool.pytest.ini_options]`` value (a relative path
    there is taken from the ini file's folder, as pytest does for its own path settings), else None."""
    value = config.getoption("advprune_" + name.replace("-", "_"))
    if value is not None:
        return value
    value = config.getini("advprune_" + name.replace("-", "_")) or None
    if value and name in _PATH_OPTIONS and config.inipath is not None:
        value = str(config.inipath.parent / value)  # an absolute value stays as it is
    return value


def _given(config: pytest.Config, name: str) -> str:
    """Option ``name`` as the user gave it, for error messages: ``--advprune-NAME=VALUE`` from the
    command line, else ``advprune_NAME = VALUE in <ini file>`` (the file is where to fix it), else
    ``--advprune-NAME (not given)``."""
    key = "advprune_" + name.replace("-", "_")
    if config.getoption(key) is not None:
        return f"--advprune-{name}={config.getoption(key)}"
    if config.getini(key):
        return f"{key} = {config.getini(key)} in {config.inipath.name if config.inipath else 'the ini file'}"
    return f"--advprune-{name} (not given)"


def _percent(config: pytest.Config, name: str) -> float | None:
    raw = _opt(config, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{_given(config, name)}: not a number; give a percentage such as 50") from None
    if not 0 <= value <= 100:
        raise pytest.UsageError(f"{_given(config, name)}: must be a percentage in [0, 100]")
    return value / 100


def _log(config: pytest.Config):
    """Progress lines on the terminal, shown through output capturing, silent under -q."""

    def log(message: str) -> None:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if tr is None or config.get_verbosity() < 0:
            return
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            tr.write_line(f"[advprune] {message}")

    return log


def _load_methods(config: pytest.Config) -> None:
    from . import registry
    from .errors import AdvPruneError

    try:
        registry.load_builtin()
        if _opt(config, "methods-dir"):
            registry.load_dir(_opt(config, "methods-dir"))
    except AdvPruneError as exc:
        raise pytest.UsageError(str(exc)) from None


def _build_session(config: pytest.Config, writes_report: bool = True):
    from . import presets, registry
    from .cache import default_dir
    from .errors import AdvPruneError
    from .report import check_target
    from .session import AdvPruneSession, RunConfig

    _load_methods(config)
    cache = _opt(config, "cache-dir") or default_dir()
    try:
        checkpoint = _checkpoint_spec(config)
        default = _DATASET_PRESET[checkpoint.dataset] if checkpoint else "quick"
        preset = presets.get(_opt(config, "preset") or default)
        if checkpoint and checkpoint.dataset != preset.dataset:
            raise pytest.UsageError(f"{_given(config, 'dataset')} does not match preset {preset.name} "
                                    f"({preset.dataset}); use --advprune-preset={default}")
        data_dir = _opt(config, "data-dir")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise pytest.UsageError(f"{_given(config, 'data-dir')}: no such folder; pass the folder that holds the "
                                    "dataset in torchvision's format, or leave the option out")
        report = _opt(config, "report") or config.rootpath / "reports" / f"{preset.name}.md"
        if writes_report:
            check_target(Path(report), preset.name)
        run = RunConfig(
            preset=preset, methods=[] if checkpoint else registry.resolve(_opt(config, "method")),
            checkpoint=checkpoint, device=_device(config),
            data_dir=data_dir, cache_dir=str(cache), report_path=str(report),
            min_clean=_percent(config, "min-clean"), min_robust=_percent(config, "min-robust"),
            sparsity_tol=_percent(config, "sparsity-tol"),
        )
        session = AdvPruneSession(run, _log(config))
    except AdvPruneError as exc:
        raise pytest.UsageError(str(exc)) from None
    if session.device.type == "cuda" and session.device.index is not None:
        import torch

        torch.cuda.set_device(session.device)  # libraries that use "the current GPU" follow this worker's pin
    return session


def _worker(config: pytest.Config) -> str | None:
    """This process's pytest-xdist worker id (``gw0``, ...), or None outside a worker."""
    return getattr(config, "workerinput", {}).get("workerid") or os.environ.get("PYTEST_XDIST_WORKER")


def _device(config: pytest.Config) -> str:
    """--advprune-device, with ``auto``/``cuda`` spread round-robin over the GPUs by xdist worker."""
    import torch

    from .parallel import worker_device

    return worker_device(_opt(config, "device"), _worker(config), torch.cuda.device_count())


def _active(config: pytest.Config) -> bool:
    return bool(_opt(config, "method") or _opt(config, "checkpoint")) and not config.getoption("advprune_list")


def _checkpoint_spec(config: pytest.Config):
    from . import registry
    from .data import DATASETS
    from .models import ARCHITECTURES
    from .session import CheckpointSpec

    path = _opt(config, "checkpoint")
    if not path:
        given = [f"--advprune-{n}" for n in ("arch", "dataset", "sparsity", "structure", "normalization", "name")
                 if config.getoption("advprune_" + n) is not None]
        if given:
            raise pytest.UsageError(f"{', '.join(given)} only apply to --advprune-checkpoint=PATH; give a checkpoint, "
                                    "or drop them (a method grid takes its sparsities from the preset)")
        return None
    if config.getoption("advprune_method"):
        raise pytest.UsageError("--advprune-checkpoint evaluates one model: drop --advprune-method (run methods in a "
                                "pytest call of their own)")
    arch, dataset, sparsity = _opt(config, "arch"), _opt(config, "dataset"), _opt(config, "sparsity")
    structure, normalization = _opt(config, "structure"), _opt(config, "normalization")
    if not arch:
        raise pytest.UsageError(f"--advprune-checkpoint needs --advprune-arch: one of {', '.join(ARCHITECTURES)} "
                                f"or path/to/file.py:ClassName")
    if arch not in ARCHITECTURES and ":" not in arch:
        raise pytest.UsageError(f"{_given(config, 'arch')}: not an architecture; use one of {', '.join(ARCHITECTURES)} "
                                "or path/to/file.py:ClassName")
    arch_file = arch.rpartition(":")[0]
    if arch not in ARCHITECTURES and not Path(arch_file).is_file():
        raise pytest.UsageError(f"{_given(config, 'arch')}: no such file {arch_file or '(empty)'}; give "
                                "the path of the Python file that defines the class, then :ClassName")
    if dataset not in DATASETS:
        raise pytest.UsageError(f"--advprune-checkpoint needs --advprune-dataset: one of {', '.join(DATASETS)}")
    if structure not in ("weights", "filters", "channels"):
        raise pytest.UsageError(f"{_given(config, 'structure')}: use weights, filters or channels")
    if normalization not in ("model", "dataset"):
        raise pytest.UsageError(f"{_given(config, 'normalization')}: use model or dataset")
    if sparsity is None or not sparsity.isdigit() or not 0 < int(sparsity) < 100:
        raise pytest.UsageError(f"{_given(config, 'sparsity')}: give the claimed sparsity as a whole percentage "
                                "from 1 to 99, e.g. 90")
    if not Path(path).is_file():
        raise pytest.UsageError(f"{_given(config, 'checkpoint')}: no such file")
    name = _opt(config, "name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise pytest.UsageError(f"{_given(config, 'name')}: use letters, digits and _ . + - (it names the report row "
                                "and the test ids)")
    if name in registry.names():
        raise pytest.UsageError(f"{_given(config, 'name')} is a registered method; the checkpoint's row would replace "
                                f"that method's in the report: pick another name, e.g. {name}_checkpoint")
    return CheckpointSpec(path, arch, dataset, structure, int(sparsity), name, normalization)


# ---------------------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("advprune", "adversarial pruning conformance (pytest-advprune)")
    for name, help_text, default in _OPTIONS:
        group.addoption(f"--advprune-{name}", dest="advprune_" + name.replace("-", "_"), default=None, help=help_text)
        parser.addini("advprune_" + name.replace("-", "_"), help_text, default=default)
    group.addoption("--advprune-list", action="store_true", help="list the registered methods with their taxonomy and exit")
    group.addoption("--advprune-estimate", action="store_true",
                    help="print the projected device-hours of the requested grid on the selected device and exit "
                    "without training")
    if not pluginmanager.has_plugin("advprune-xdist-defaults"):
        pluginmanager.register(_XdistDefaults(), "advprune-xdist-defaults")
    from .report import add_compare_options

    add_compare_options(group.addoption, "--advprune-")
    for name in ("compare", "compare-fail"):
        parser.addini("advprune_" + name.replace("-", "_"), f"as --advprune-{name}", default=None)


def pytest_cmdline_main(config: pytest.Config):
    if config.getoption("advprune_list"):
        from . import registry

        _load_methods(config)
        print(registry.listing())
        return 0
    if config.getoption("advprune_estimate"):
        if not _opt(config, "method") or _opt(config, "checkpoint"):
            raise pytest.UsageError("--advprune-estimate projects a grid of methods: give --advprune-method=NAME "
                                    "(and no --advprune-checkpoint)")
        from .estimate import estimate

        print(estimate(_build_session(config, writes_report=False)).render())
        return 0
    return None


class _XdistDefaults:
    """With ``pytest -n N`` and no ``--dist`` mode chosen, picks ``--dist loadgroup`` (see
    :func:`pytest_xdist_make_scheduler`), so each cell's checks run on one worker."""

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_main(self, config: pytest.Config):
        # A wrapper, so it runs before pytest-xdist's own hook turns an unset mode into ``load``.
        option = config.option
        if (_active(config) and config.pluginmanager.hasplugin("xdist") and option.numprocesses
                and option.dist == "no" and not option.distload):
            option.dist = "loadgroup"
        return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadgroup``, one work unit per cell: a worker builds a cell once and runs its checks.
    (Tests with an ``xdist_group`` mark are grouped as pytest-xdist does.)"""
    session = config.stash.get(_SESSION, None)
    if session is None or config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    cells = {c.id for c in session.cells()}

    class CellScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            param = nodeid[nodeid.rfind("[") + 1:-1] if nodeid.endswith("]") else ""
            cell = param if param in cells else param.rpartition("-")[0]  # indicator tests: <cell id>-<indicator>
            return f"advprune-cell:{cell}" if cell in cells else super()._split_scope(nodeid)

    return CellScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "advprune: a conformance test of pytest-advprune")
    method = config.getoption("advprune_method")
    if method is not None and not method.strip():  # e.g. --advprune-method=$UNSET_VARIABLE
        raise pytest.UsageError("--advprune-method is empty; give a method name, a comma list or 'all' "
                                "(pytest --advprune-list shows them)")
    config.stash[_BASELINE] = _compare_baseline(config)
    if _active(config):
        from .errors import AdvPruneError

        session = config.stash[_SESSION] = _build_session(config)
        baseline = config.stash[_BASELINE]
        if baseline and baseline[2] not in (None, session.preset.name):
            raise pytest.UsageError(f"--advprune-compare={_opt(config, 'compare')} holds preset "
                                    f"{baseline[2]!r}, not {session.preset.name!r}: no cell could be compared; give "
                                    f"a baseline of preset {session.preset.name}")
        try:
            session.check_data()
        except AdvPruneError as exc:
            raise pytest.UsageError(str(exc)) from None
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            config.args = [str(SUITE)]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    session = config.stash.get(_SESSION, None)
    if session is None:
        return None
    return [f"advprune: {k}: {v}" for k, v in session.preset.header().items()] + [f"advprune: device: {session.device}"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "advprune_cell" in metafunc.fixturenames:
        session = metafunc.config.stash.get(_SESSION, None)
        cells = session.cells() if session is not None else []
        metafunc.parametrize("advprune_cell", cells, ids=[c.id for c in cells])


def _cell_of(item: pytest.Item):
    return getattr(getattr(item, "callspec", None), "params", {}).get("advprune_cell")


def _kind(item: pytest.Item) -> str:
    """The session check a conformance test states: ``sparsity``, ``clean``, ``robust`` or ``indicator:<name>``."""
    indicator = getattr(getattr(item, "callspec", None), "params", {}).get("advprune_indicator")
    return f"indicator:{indicator}" if indicator else CHECKS[item.originalname]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A cell's checks run together: its slow build is followed at once by its verdicts.
    order = {id(it): i for i, it in enumerate(items)}
    items.sort(key=lambda it: (_cell_of(it) is not None, _cell_of(it).id if _cell_of(it) else "", order[id(it)]))
    session = config.stash.get(_SESSION, None)
    for it in items:
        cell = _cell_of(it)
        if cell is None:
            continue
        reason = session.known_failure(cell) if session is not None else None
        if reason and CHECKS.get(it.originalname) in ("clean", "robust"):
            it.add_marker(pytest.mark.xfail(reason=f"known failure of {cell.method}: {reason}", strict=False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    session = item.config.stash.get(_SESSION, None)
    cell = _cell_of(item)
    if session is not None and cell is not None and (report.when == "call" or report.skipped):
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        session.record(cell, _kind(item), outcome)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    advprune = config.stash.get(_SESSION, None)
    if advprune is None:
        return
    if hasattr(config, "workeroutput"):  # an xdist worker: hand the records to the controller, which writes once
        records = [{**r, "worker": _worker(config)} for r in advprune.run_records()]
        config.workeroutput[_WORKER_RECORDS_KEY] = json.dumps(records)  # execnet sends plain types only
        return
    from .errors import AdvPruneError
    from .report import combine

    records = combine(advprune.run_records() + config.stash.get(_WORKER_RECORDS, []))
    try:
        config.stash[_REPORT] = advprune.finish(records)
    except AdvPruneError as exc:  # the report could not be written; the records went aside (see the message)
        config.stash[_REPORT_ERROR] = str(exc)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
    config.stash[_REGRESSIONS] = _regressions(config, records)
    if config.stash[_REGRESSIONS] and _REPORT_ERROR not in config.stash:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist controller: collect the records a finished worker sent (see pytest_sessionfinish)."""
    records = getattr(node, "workeroutput", {}).get(_WORKER_RECORDS_KEY)
    if records:
        node.config.stash.setdefault(_WORKER_RECORDS, []).extend(json.loads(records))


_REPORT = pytest.StashKey["object"]()
_REGRESSIONS = pytest.StashKey["list"]()
_REPORT_ERROR = pytest.StashKey["str"]()
_BASELINE = pytest.StashKey["object"]()
_WORKER_RECORDS = pytest.StashKey["list"]()
_WORKER_RECORDS_KEY = "advprune_records"


def _compare_baseline(config: pytest.Config):
    """``(baseline records, thresholds)`` from --advprune-compare[-fail], or None; bad values are usage errors."""
    from .report import parse_compare_fail

    try:
        thresholds = parse_compare_fail(_opt(config, "compare-fail"))
    except ValueError as exc:
        raise pytest.UsageError(f"--advprune-compare-fail: {exc}") from None
    path = _opt(config, "compare")
    if not path:
        if _opt(config, "compare-fail") is not None:
            raise pytest.UsageError("--advprune-compare-fail needs --advprune-compare=BASELINE.json to compare against")
        return None
    try:
        doc = json.loads(Path(path).read_text())
        return doc["records"], thresholds, doc.get("preset")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise pytest.UsageError(f"--advprune-compare={path}: not a readable report JSON ({exc})") from None


def _regressions(config: pytest.Config, records: list[dict]) -> list:
    from . import report

    baseline = config.stash.get(_BASELINE, None)
    return report.regressions(records, *baseline[:2]) if baseline else []


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if _REPORT_ERROR in config.stash:
        terminalreporter.write_sep("=", "advprune: report not written", red=True)
        terminalreporter.write_line(config.stash[_REPORT_ERROR])
    paths = config.stash.get(_REPORT, None)
    if paths:
        from . import report

        terminalreporter.write_sep("=", "advprune leaderboard")
        terminalreporter.write_line(report.terminal_summary(report.load(paths[1])))
        for line in config.stash[_SESSION].notices:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"report: {paths[0]} (JSON: {paths[1]})")
    rows = config.stash.get(_REGRESSIONS, None)
    if rows:
        from . import report

        terminalreporter.write_sep("=", f"advprune: {len(rows)} regression(s) against --advprune-compare", red=True)
        terminalreporter.write_line(report.regression_table(rows))


@pytest.fixture(scope="session")
def advprune_session(request: pytest.FixtureRequest):
    """The run's :class:`~pytest_advprune.session.AdvPruneSession` (only with --advprune-method)."""
    session = request.config.stash.get(_SESSION, None)
    if session is None:
        pytest.skip("pytest-advprune is inactive: pass --advprune-method=NAME")
    return session
