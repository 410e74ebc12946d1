"""The pytest plugin end to end, with ``pytester``: options, collection, verdicts, report, ini.

Runs that prune, train or evaluate a model, or import a ``--advprune-methods-dir``, are
subprocesses; runs that only collect, fail on options or load cached cells are in-process.
Everything uses the real ``smoke`` preset and one cache per test session (see conftest), so the
dense model is trained once.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

# Imported here, before any pytester snapshot of sys.modules: pytester restores sys.modules after
# each in-process run, so modules first imported inside one (torch, the built-in methods) would
# vanish from sys.modules while the registry still holds their classes.
import pytest_advprune.report  # noqa: F401
import pytest_advprune.session  # noqa: F401
from pytest_advprune import registry
from pytest_advprune.indicators import NAMES as INDICATORS
from pytest_advprune.plugin import SUITE

registry.load_builtin()

CELL = "fashion_mnist-cnn"  # the smoke preset's dataset and architecture
DENSE = f"dense-{CELL}-dense-0"
USAGE = pytest.ExitCode.USAGE_ERROR
PER_CELL = 3 + len(INDICATORS)  # sparsity, clean, robust, then one test per attack-failure indicator
# the smoke dense cell: 2 accuracy checks and every indicator pass but black_box (smoke runs no Square) and
# transfer (the dense model is its own source); its sparsity check does not apply
DENSE_PASSED, DENSE_SKIPPED = 2 + len(INDICATORS) - 2, 1 + 2
RECORD_KEYS = {"method", "preset", "dataset", "arch", "structure", "target_sparsity", "achieved_sparsity", "clean_acc",
               "robust_acc", "n_eval", "ci95", "passed", "seed", "device", "duration_s", "versions"}

PLAIN_TEST = """
def test_plain():
    assert 1 + 1 == 2
"""

# ------------------------------------------------------------------ contributors' method files
# Module constants: identical sources across tests, so their pruned models and evaluations are
# cached once (the cache key covers the method's source).

_HEADER = '''
import torch

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import apply_masks, make_masks, prunable_layers

TAXONOMY = Taxonomy(paper="pytest-advprune test fixture", pipeline=Pipeline.AFTER, step1="AT (PGD)", step2="None",
                    schedule=Schedule.ONE_SHOT, locality=Locality.LOCAL, criterion=Criterion.LWM)
'''

HALF = _HEADER + '''

@register
class HalfPrune(Method):
    """Broken: claims every target, but prunes only half of the weights."""

    name = "halfprune"
    taxonomy = TAXONOMY
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, 0.5))
        return model
'''

COLLAPSE = _HEADER + '''

@register
class Collapse(Method):
    """Broken: meets the sparsity target, then zeroes the classifier (constant logits)."""

    name = "collapse"
    taxonomy = TAXONOMY
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        classifier = list(prunable_layers(model).values())[-1]
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.bias.zero_()
        return model
'''

NAN = _HEADER + '''

@register
class Diverged(Method):
    """Broken: its training diverged, the first layer holds NaN."""

    name = "diverged"
    taxonomy = TAXONOMY
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        with torch.no_grad():
            list(prunable_layers(model).values())[0].weight.fill_(float("nan"))
        return model
'''

# A well-behaved copy of methods/lwm.py (weights only, so a single cell).
GOOD = '''
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import make_masks

ROUNDS = 3


@register
class GoodMagnitude(Method):
    name = "goodlwm"
    taxonomy = Taxonomy(
        paper="copy of lwm (pytest-advprune test fixture)",
        pipeline=Pipeline.AFTER,
        step1="AT (PGD)",
        step2="AT (PGD)",
        schedule=Schedule.ITERATIVE,
        locality=Locality.LOCAL,
        criterion=Criterion.LWM,
    )
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        budget = ctx.preset.finetune
        for r in range(1, ROUNDS + 1):
            sparsity = 1 - (1 - ctx.sparsity) ** (r / ROUNDS)
            masks = make_masks(model, ctx.structure, sparsity, scope="local")
            ctx.train(model, budget.with_(epochs=budget.epochs / ROUNDS), f"lwm round {r}/{ROUNDS}", masks=masks)
        return model
'''


def fresh_source(token: int) -> str:
    """A cheap collapsed method whose weights depend on ``token``: never in the cache, so its run
    evaluates (and logs progress) every time."""
    return _HEADER + f'''

TOKEN = {token}


@register
class Fresh(Method):
    name = "fresh"
    taxonomy = TAXONOMY
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        classifier = list(prunable_layers(model).values())[-1]
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.bias[0] = 1e-6 * TOKEN
        return model
'''


def collected(result: pytest.RunResult) -> list[tuple[str, str]]:
    """``(test name, id)`` of every parametrized test in a ``--collect-only`` output (with or without -q)."""
    pattern = r"(?:::|<Function )(test_\w+)\[([^\]]+)\]>?$"
    return [(m[1], m[2]) for line in result.outlines if (m := re.search(pattern, line.strip()))]


def registered() -> list[str]:
    """The names an in-process run sees: this process's registry (the built-in methods, at least)."""
    registry.load_builtin()
    names = registry.names()
    assert {"dense", "hydra", "lwm", "random"} <= set(names)
    return names


def single_error_line(result: pytest.RunResult) -> str:
    lines = [line for line in result.errlines if line.strip()]
    assert len(lines) == 1, "expected one error line, got:\n" + "\n".join(lines + result.outlines)
    assert lines[0].startswith("ERROR: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ inactive, --advprune-list


def test_without_method_the_plugin_adds_nothing(pytester, monkeypatch):
    monkeypatch.delenv("ADVPRUNE_CACHE_DIR", raising=False)
    pytester.makepyfile(test_plain=PLAIN_TEST)
    result = pytester.runpytest_inprocess("-rA")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    text = result.stdout.str()
    assert not [line for line in result.outlines if line.startswith("advprune:")]
    assert "[advprune]" not in text and "advprune leaderboard" not in text
    assert "test_conformance" not in text
    assert not (pytester.path / "reports").exists()
    assert not (pytester.path / ".cache" / "pytest-advprune").exists()


def test_list_prints_every_method_with_its_taxonomy(pytester):
    result = pytester.runpytest_inprocess("--advprune-list")
    assert result.ret == 0
    header = next(line for line in result.outlines if line.startswith("method"))
    for column in ("pipeline", "pretrain / prune step", "finetune / train step", "1S/IT", "S/US", "L/G", "criterion",
                   "paper"):
        assert column in header
    for name in registered():
        cls = registry.get(name)
        line = next((line for line in result.outlines if line.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from the listing"
        cells = [c.strip() for c in cls.taxonomy.row(cls.structures).values()]
        pos = 0
        for cell in cells:  # the taxonomy columns, in order, on the method's line
            found = line.find(cell, pos)
            assert found >= 0, f"{name}: {cell!r} not in {line!r} after column {pos}"
            pos = found + len(cell)
    assert "collected" not in result.stdout.str()  # exits before any collection


def test_list_includes_methods_dir(advprune):
    folder = advprune.write_methods(halfprune=HALF)
    result = advprune.pytester.runpytest_subprocess("--advprune-list", f"--advprune-methods-dir={folder}")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["halfprune*A*AT (PGD)*None*1S*US*L*LWM*pytest-advprune test fixture*"])
    assert [line.split()[0] for line in result.outlines if line.split()[:1] == ["hydra"]]


# ------------------------------------------------------------------ usage errors


def test_unknown_method_is_a_usage_error_listing_the_names(advprune):
    result = advprune.inprocess("--advprune-method=hydra,nope")
    assert result.ret == USAGE
    line = single_error_line(result)
    assert "'nope'" in line
    assert [n.strip() for n in line.split("registered:", 1)[1].split(",")] == registered()


@pytest.mark.parametrize(
    "option, fragment",
    [
        pytest.param("--advprune-preset=nope", "unknown preset 'nope'; known: smoke, quick, cifar10, svhn", id="preset"),
        pytest.param("--advprune-device=tpu", "--advprune-device=tpu: use auto, cpu, cuda or cuda:N", id="device-tpu"),
        pytest.param("--advprune-device=cuda", "--advprune-device=cuda: no CUDA device here", id="device-cuda"),
        pytest.param("--advprune-device=cuda:1", "--advprune-device=cuda:1: ", id="device-cuda1"),
        pytest.param("--advprune-min-robust=abc", "--advprune-min-robust=abc: not a number", id="robust-nan"),
        pytest.param("--advprune-min-robust=150", "--advprune-min-robust=150: must be a percentage in [0, 100]",
                     id="robust-over"),
        pytest.param("--advprune-min-clean=-1", "--advprune-min-clean=-1: must be a percentage", id="clean-negative"),
        pytest.param("--advprune-sparsity-tol=x", "--advprune-sparsity-tol=x: not a number", id="tol-nan"),
        pytest.param("--advprune-sparsity=90", "--advprune-sparsity only apply to --advprune-checkpoint=PATH",
                     id="sparsity-without-checkpoint"),
        pytest.param("--advprune-data-dir=/nonexistent", "--advprune-data-dir=/nonexistent: no such folder",
                     id="data-dir-missing"),
    ],
)
def test_bad_option_is_a_usage_error(advprune, option, fragment):
    import torch

    if option.startswith("--advprune-device=cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = advprune.inprocess("--advprune-method=hydra", option, preset=not option.startswith("--advprune-preset"))
    assert result.ret == USAGE
    assert fragment in single_error_line(result)
    assert not advprune.report_json.exists()


@pytest.mark.parametrize("ini_line, fragment", [
    ('advprune_min_robust = "abc"', "advprune_min_robust = abc in pyproject.toml: not a number"),
    ('advprune_sparsity_tol = "150"', "advprune_sparsity_tol = 150 in pyproject.toml: must be a percentage in [0, 100]"),
    ('advprune_data_dir = "nonexistent"', "advprune_data_dir = nonexistent in pyproject.toml: no such folder"),
])
def test_a_bad_ini_value_names_the_ini_setting_to_fix_not_a_flag_the_user_never_gave(advprune, ini_line, fragment):
    advprune.pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\n{ini_line}\n")
    result = advprune.inprocess("--advprune-method=hydra")
    assert result.ret == USAGE
    line = single_error_line(result)
    assert fragment in line and "--advprune-" not in line
    assert not advprune.report_json.exists()


def test_empty_method_option_is_a_usage_error_not_the_projects_own_tests(advprune):
    for value in ("", " "):
        result = advprune.inprocess(f"--advprune-method={value}")
        assert result.ret == USAGE
        assert "--advprune-method is empty; give a method name" in single_error_line(result)


@pytest.mark.parametrize("path, fragment", [
    ("afile/sub/x.md", "afile is a file, not a folder; pass a report path in a folder"),
    ("out/x.json", "give the markdown file's path, ending in .md (the JSON goes beside it), e.g. --advprune-report=x.md"),
    ("adir", "give the markdown file's path, ending in .md"),
    ("locked/x.md", "cannot create locked/x.json.lock (Is a directory); pass a report path in a folder you can write"),
])
def test_a_report_path_that_cannot_be_written_fails_before_any_cell(advprune, path, fragment):
    (advprune.pytester.path / "afile").write_text("not a folder\n")
    (advprune.pytester.path / "adir").mkdir()
    (advprune.pytester.path / "locked" / "x.json.lock").mkdir(parents=True)  # the lock file cannot be created
    result = advprune.inprocess("--advprune-method=hydra", f"--advprune-report={path}")
    assert result.ret == USAGE
    assert fragment in single_error_line(result)


def test_a_missing_dataset_is_one_usage_error_and_the_report_keeps_its_results(advprune, monkeypatch, tmp_path):
    from pytest_advprune import data

    advprune.report_json.parent.mkdir(parents=True, exist_ok=True)
    advprune.report_json.write_text('{"preset": "smoke", "records": []}')
    before = advprune.report_json.read_bytes()
    monkeypatch.setattr(data, "candidate_dirs", lambda name, data_dir: [tmp_path / "nowhere"])

    def offline(name, root, train):
        raise OSError("no internet in this test")

    monkeypatch.setattr(data, "_download", offline)
    result = advprune.inprocess("--advprune-method=hydra")
    assert result.ret == USAGE
    line = single_error_line(result)
    assert "dataset fashion_mnist (test split) not found" in line and "--advprune-data-dir" in line
    assert advprune.report_json.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "swapped"])
def test_a_corrupt_dataset_file_is_one_usage_error_and_the_report_keeps_its_results(advprune, tmp_path, damage):
    """Files that are there but unreadable (a cut download, a wrong file) are a usage error, not a traceback."""
    import gzip

    folder = tmp_path / "fmnist"
    folder.mkdir()
    files = {"t10k-images-idx3-ubyte": b"\0\0\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
             + bytes(10 * 28 * 28), "t10k-labels-idx1-ubyte": b"\0\0\x08\x01" + (10).to_bytes(4, "big") + bytes(10)}
    if damage == "swapped":  # each file under the other's name: both readable idx files of 10 entries
        files = dict(zip(files, reversed(files.values())))
    for stem, raw in files.items():
        blob = gzip.compress(raw)
        (folder / f"{stem}.gz").write_bytes({"truncated": blob[: len(blob) // 2], "garbage": b"garbage\n"}.get(damage, blob))
    advprune.report_json.parent.mkdir(parents=True, exist_ok=True)
    advprune.report_json.write_text('{"preset": "smoke", "records": []}')
    before = advprune.report_json.read_bytes()
    result = advprune.inprocess("--advprune-method=hydra", f"--advprune-data-dir={folder}")
    assert result.ret == USAGE
    line = single_error_line(result)
    if damage == "swapped":
        assert line.startswith("ERROR: dataset fashion_mnist (test split): images of shape (10, 1) and labels of shape "
                               "(10, 28, 28), not [N, 1, 28, 28] and [N] in 0-9 (images and labels files swapped"), line
    else:
        assert line.startswith("ERROR: dataset fashion_mnist: ValueError: ") and "t10k-images-idx3-ubyte.gz" in line
    assert "apt-get install --reinstall dataset-fashion-mnist" in line and "--advprune-data-dir" in line
    assert advprune.report_json.read_bytes() == before


def test_methods_dir_not_a_folder(advprune):
    (advprune.pytester.path / "notafolder.py").write_text("x = 1\n")
    for target in ("notafolder.py", "does-not-exist"):
        result = advprune.inprocess("--advprune-method=hydra", f"--advprune-methods-dir={target}")
        assert result.ret == USAGE
        assert f"--advprune-methods-dir={target}: not a folder" in single_error_line(result)


@pytest.mark.parametrize("source, fragment", [
    ("import no_such_module_anywhere\n", "ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    ("def prune(:\n", "SyntaxError"),
], ids=["import-error", "syntax-error"])
def test_methods_dir_file_that_fails_to_import(advprune, source, fragment):
    folder = advprune.write_methods(broken=source)
    result = advprune.inprocess("--advprune-method=hydra", f"--advprune-methods-dir={folder}")
    assert result.ret == USAGE
    line = single_error_line(result)
    assert str(folder / "broken.py") in line and "importing the method file failed" in line and fragment in line


def test_methods_dir_with_list_and_broken_file(advprune):
    folder = advprune.write_methods(broken="raise RuntimeError('nope')\n")
    result = advprune.pytester.runpytest_inprocess("--advprune-list", f"--advprune-methods-dir={folder}")
    assert result.ret == USAGE
    assert "RuntimeError: nope" in single_error_line(result)


# ------------------------------------------------------------------ collection and ids


def test_ids_comma_list(advprune):
    result = advprune.inprocess("--advprune-method=hydra, lwm,hydra", "--collect-only", "-q")
    assert result.ret == 0
    items = collected(result)
    assert ("test_robust_accuracy", f"hydra-{CELL}-weights-90") in items
    expected = {f"{m}-{CELL}-{s}" for m in ("hydra", "lwm") for s in ("weights-90", "filters-50")}
    for test in ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy"):
        assert sorted(i for t, i in items if t == test) == sorted(expected)
    assert len(items) == 4 * PER_CELL  # hydra once, although named twice
    result.stdout.fnmatch_lines(["*::test_robust_accuracy[[]hydra-fashion_mnist-cnn-weights-90[]]"])


def test_ids_all(advprune):
    result = advprune.inprocess("--advprune-method=all", "--collect-only", "-q")
    assert result.ret == 0
    items = collected(result)
    names = registered()
    assert all(any(i.startswith(f"{n}-{CELL}-") for n in names) for _, i in items)
    assert all(any(i.startswith(f"{n}-{CELL}-") for _, i in items) for n in names)
    assert ("test_sparsity", DENSE) in items
    assert ("test_clean_accuracy", f"random-{CELL}-filters-50") in items
    assert not any(i.startswith("dense-") and "weights" in i for _, i in items)
    # a cell's checks are collected together (an indicator test's id is the cell id, then the indicator)
    ids = [i.rsplit("-", 1)[0] if t == "test_attack_indicator" else i for t, i in items]
    assert all(ids[k] == ids[k - k % PER_CELL] for k in range(len(ids)))


def test_no_paths_collects_only_the_conformance_suite(advprune):
    advprune.pytester.makepyfile(test_plain=PLAIN_TEST)
    result = advprune.inprocess("--advprune-method=dense", "--collect-only", "-q")
    assert result.ret == 0
    assert "test_plain" not in result.stdout.str()
    assert collected(result) == [(t, DENSE) for t in ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy")] + [
        ("test_attack_indicator", f"{DENSE}-{name}") for name in INDICATORS]


def test_explicit_paths_are_honoured(advprune):
    advprune.pytester.makepyfile(test_plain=PLAIN_TEST)
    result = advprune.inprocess("--advprune-method=dense", "--collect-only", "-q", "test_plain.py")
    assert result.ret == 0
    assert [line for line in result.outlines if line.endswith("::test_plain")] == ["test_plain.py::test_plain"]
    assert collected(result) == []
    result = advprune.inprocess("--advprune-method=dense", "--collect-only", "-q", "test_plain.py", str(SUITE))
    assert len([line for line in result.outlines if line.endswith("::test_plain")]) == 1
    assert len(collected(result)) == PER_CELL


# ------------------------------------------------------------------ skips


def test_unsupported_cell_is_skipped_with_reason(advprune):
    result = advprune.inprocess("--advprune-method=hydra", "-k", "filters")
    result.assert_outcomes(skipped=PER_CELL, deselected=PER_CELL)
    cases = advprune.cases()
    assert set(cases) == {f"{t}[hydra-{CELL}-filters-50]" for t in
                          ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy")} | {
        f"test_attack_indicator[hydra-{CELL}-filters-50-{name}]" for name in INDICATORS}
    for outcome, message in cases.values():
        assert outcome == "skipped"
        assert "hydra does not support filters pruning (supports: weights)" in message
    rec = advprune.records()[f"hydra-{CELL}-filters-50"]
    assert rec["status"] == "SKIP" and rec["passed"] is None
    assert "does not support filters" in rec["skip_reason"]


def test_dense_sparsity_not_applicable(advprune, dense_cache):
    result = advprune.inprocess("--advprune-method=dense", "-rs")
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    cases = advprune.cases()
    assert cases[f"test_sparsity[{DENSE}]"][0] == "skipped"
    assert "not applicable: the dense reference model is not pruned" in cases[f"test_sparsity[{DENSE}]"][1]
    assert cases[f"test_clean_accuracy[{DENSE}]"][0] == cases[f"test_robust_accuracy[{DENSE}]"][0] == "passed"
    assert "training the dense" not in result.stdout.str()  # the shared cache was used


# ------------------------------------------------------------------ contributors' methods, end to end


def test_methods_dir_method_that_underprunes_fails_sparsity(advprune, dense_cache):
    folder = advprune.write_methods(halfprune=HALF)
    # the sparsity check alone: it needs no attack, so the cell is pruned and measured, never evaluated
    result = advprune.subprocess("--advprune-method=halfprune", f"--advprune-methods-dir={folder}", "-k", "sparsity")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1, skipped=1, deselected=2 * PER_CELL - 2)
    outcome, message = advprune.cases()[f"test_sparsity[halfprune-{CELL}-weights-90]"]
    assert outcome == "failed"
    assert re.search(r"weights sparsity (4\d|5\d)\.\d\d% vs target 90%", message), message
    result.stdout.fnmatch_lines([f"halfprune-{CELL}-weights-90: weights sparsity 5*% vs target 90%*"])
    rec = advprune.records()[f"halfprune-{CELL}-weights-90"]
    assert rec["status"] == "FAIL" and rec["passed"] is False
    assert 0.45 <= rec["achieved_sparsity"] <= 0.55


def test_methods_dir_collapsed_method_fails_accuracy(advprune, dense_cache):
    folder = advprune.write_methods(collapse=COLLAPSE)
    result = advprune.subprocess("--advprune-method=collapse", f"--advprune-methods-dir={folder}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    cases = advprune.cases()
    cell = f"collapse-{CELL}-weights-90"
    assert cases[f"test_sparsity[{cell}]"][0] == "passed"
    for test, what in (("test_clean_accuracy", "clean"), ("test_robust_accuracy", "robust")):
        outcome, message = cases[f"{test}[{cell}]"]
        assert outcome == "failed", (test, message)
        assert re.search(rf"{what} accuracy \d+\.\d\d% \(95% CI", message), message
    rec = advprune.records()[cell]
    assert rec["status"] == "FAIL" and rec["clean_acc"] < 0.2 and rec["robust_acc"]["worst_case"] < 0.2


def test_methods_dir_well_behaved_method_passes(advprune, dense_cache):
    folder = advprune.write_methods(goodlwm=GOOD)
    result = advprune.subprocess("--advprune-method=goodlwm", f"--advprune-methods-dir={folder}")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    cases = advprune.cases()
    cell = f"goodlwm-{CELL}-weights-90"
    checks = ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy")
    indicators = [f"test_attack_indicator[{{}}-{name}]" for name in INDICATORS]
    assert {k: v[0] for k, v in cases.items()} == {
        **{f"{t}[{cell}]": "passed" for t in checks},
        **{t.format(cell): "skipped" if "black_box" in t else "passed" for t in indicators},  # smoke runs no Square
        **{f"{t}[goodlwm-{CELL}-filters-50]": "skipped" for t in checks},  # weights only: filters unsupported
        **{t.format(f"goodlwm-{CELL}-filters-50"): "skipped" for t in indicators},
    }
    rec = advprune.records()[cell]
    assert rec["status"] == "PASS" and rec["passed"] is True
    assert abs(rec["achieved_sparsity"] - 0.9) < 0.01
    assert rec["clean_acc"] >= rec["floors"]["clean"] and rec["robust_acc"]["worst_case"] >= rec["floors"]["robust"]
    # FMN-Linf is a real second attack on smoke too: it breaks at least half the points AutoAttack breaks
    acc = rec["robust_acc"]
    assert rec["clean_acc"] - acc["FMN-Linf"] >= 0.5 * (rec["clean_acc"] - acc["AA:apgd-t"]), acc


def test_nan_weights_fail_with_a_clear_message(advprune, dense_cache):
    folder = advprune.write_methods(diverged=NAN)
    result = advprune.subprocess("--advprune-method=diverged", f"--advprune-methods-dir={folder}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=PER_CELL, skipped=PER_CELL)
    cell = f"diverged-{CELL}-weights-90"
    for test in ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy"):
        outcome, message = advprune.cases()[f"{test}[{cell}]"]
        assert outcome == "failed" and "NaN" in message, message
    text = result.stdout.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text and "def prune" not in text
    result.stdout.fnmatch_lines([f"{cell}: *NaN*"])
    doc = json.loads(advprune.report_json.read_text())  # still written, valid JSON
    rec = advprune.records()[cell]
    assert rec["status"] == "ERROR" and rec["passed"] is False and "NaN" in rec["error"]
    assert doc["records"] and advprune.report_md.exists()
    assert "ERROR" in advprune.report_md.read_text()


# ------------------------------------------------------------------ selection


def test_k_selects_checks(advprune, dense_cache):
    result = advprune.inprocess("--advprune-method=dense,hydra", "-k", "dense and clean_accuracy")
    result.assert_outcomes(passed=1, deselected=3 * PER_CELL - 1)
    assert list(advprune.cases()) == [f"test_clean_accuracy[{DENSE}]"]
    assert set(advprune.records()) == {DENSE}  # hydra was never built


def test_x_stops_at_first_failure(advprune, dense_cache):
    folder = advprune.write_methods(halfprune=HALF)
    result = advprune.subprocess("--advprune-method=dense,halfprune", f"--advprune-methods-dir={folder}", "-x")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # dense: sparsity n/a, clean, robust, indicators; halfprune: its filters cell (unsupported, sorted first),
    # then the weights cell's sparsity check fails and the run stops before its other checks
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED + PER_CELL, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    cases = advprune.cases()
    assert cases[f"test_sparsity[halfprune-{CELL}-weights-90]"][0] == "failed"
    assert [name for name in cases if f"halfprune-{CELL}-weights" in name] == [
        f"test_sparsity[halfprune-{CELL}-weights-90]"]


# ------------------------------------------------------------------ report


def test_report_default_path_and_record_keys(advprune, dense_cache):
    result = advprune.inprocess("--advprune-method=dense,hydra", "-k", "dense or filters", report=False)
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED + PER_CELL)
    md = advprune.pytester.path / "reports" / "smoke.md"
    js = md.with_suffix(".json")
    assert md.is_file() and js.is_file()
    doc = json.loads(js.read_text())
    assert doc["preset"] == "smoke"
    recs = advprune.records(js)
    assert set(recs) == {DENSE, f"hydra-{CELL}-filters-50"}  # one record per cell run
    rec = recs[DENSE]
    assert RECORD_KEYS <= set(rec)
    assert (rec["method"], rec["preset"], rec["dataset"], rec["arch"], rec["structure"], rec["target_sparsity"]) == (
        "dense", "smoke", "fashion_mnist", "cnn", "dense", 0.0)
    assert rec["achieved_sparsity"] == 0.0 and rec["n_eval"] == 200 and rec["seed"] == 0 and rec["device"] == "cpu"
    assert 0 <= rec["robust_acc"]["worst_case"] <= rec["clean_acc"] <= 1
    assert {"PGD-5", "AA:apgd-ce", "AA:apgd-t"} <= set(rec["robust_acc"])
    lo, hi = rec["ci95"]["robust"]
    assert lo <= rec["robust_acc"]["worst_case"] <= hi
    assert rec["passed"] is True and rec["duration_s"] >= 0
    assert {"python", "torch", "pytest-advprune"} <= set(rec["versions"])
    skip = recs[f"hydra-{CELL}-filters-50"]
    assert skip["passed"] is None and skip["status"] == "SKIP"
    result.stdout.fnmatch_lines([f"report: {md} (JSON: {js})"])


def test_report_merges_methods_and_replaces_cells(advprune, dense_cache):
    folder = advprune.write_methods(collapse=COLLAPSE)
    advprune.inprocess("--advprune-method=dense").assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    result = advprune.subprocess("--advprune-method=collapse", f"--advprune-methods-dir={folder}")
    collapse = f"collapse-{CELL}-weights-90"
    recs = advprune.records()  # asserts one record per cell
    verdicts = [v["passed"] for v in recs[collapse]["indicators"].values()]  # constant logits fail some of them
    assert False in verdicts
    # sparsity passes, clean and robust fail, the indicators as recorded; the filters cell is unsupported
    result.assert_outcomes(passed=1 + verdicts.count(True), failed=2 + verdicts.count(False),
                           skipped=PER_CELL + verdicts.count(None))
    assert set(recs) == {DENSE, collapse, f"collapse-{CELL}-filters-50"}
    assert recs[DENSE]["status"] == "PASS" and recs[collapse]["status"] == "FAIL"
    # the terminal leaderboard and the markdown both show both methods
    summary = result.stdout.str().split("advprune leaderboard", 1)[1]
    assert re.search(r"^dense\s+\d+\.\d / \d+\.\d PASS", summary, re.M), summary
    assert re.search(r"^collapse\s+.*\d+\.\d / \d+\.\d(\*\*)? FAIL", summary, re.M), summary
    md = advprune.report_md.read_text()
    assert md.startswith("# pytest-advprune report: preset `smoke`")
    assert "| preset " in md and "| threat model " in md and "| devices " in md and "| versions " in md
    assert f"## {'fashion_mnist'}, unstructured (weights): clean / robust accuracy (%)" in md
    assert re.search(r"^\| dense\s*\| \d+\.\d / \d+\.\d PASS", md, re.M), md
    assert re.search(r"^\| collapse\s*\|.*\d+\.\d / \d+\.\d(\*\*)? FAIL", md, re.M), md
    taxonomy = md.split("## Taxonomy (Piras et al. 2024)", 1)[1]
    assert re.search(r"^\| dense ", taxonomy, re.M) and re.search(r"^\| collapse .*pytest-advprune test fixture", taxonomy, re.M)
    # re-running a cell replaces its record: now with a floor it cannot meet
    advprune.inprocess("--advprune-method=dense", "--advprune-min-robust=99").assert_outcomes(
        passed=DENSE_PASSED - 1, failed=1, skipped=DENSE_SKIPPED)
    again = advprune.records()
    assert set(again) == set(recs)
    assert again[DENSE]["status"] == "FAIL" and again[DENSE]["floors"]["robust"] == 0.99
    assert again[collapse] == recs[collapse]
    assert re.search(r"^\| dense\s*\| \d+\.\d / \d+\.\d FAIL", advprune.report_md.read_text(), re.M)


def test_dense_alone_shows_in_the_leaderboard(advprune, dense_cache):
    """A run of the dense reference alone still gives a leaderboard row (terminal and markdown)."""
    result = advprune.inprocess("--advprune-method=dense")
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    summary = result.stdout.str().split("advprune leaderboard", 1)[1]
    assert re.search(r"^dense\s+\d+\.\d / \d+\.\d PASS", summary, re.M), summary
    assert re.search(r"^\| dense\s*\| \d+\.\d / \d+\.\d PASS", advprune.report_md.read_text(), re.M)


def test_partial_run_does_not_pass_a_cell(advprune, dense_cache):
    """Running only some of a cell's checks (-k) must not mark it PASS: its robust check never ran."""
    result = advprune.inprocess("--advprune-method=dense", "--advprune-min-robust=99", "-k", "clean_accuracy")
    result.assert_outcomes(passed=1, deselected=PER_CELL - 1)
    rec = advprune.records()[DENSE]
    assert rec["checks"] == {"clean": "passed"}
    assert rec["status"] != "PASS" and rec["passed"] is not True


@pytest.mark.parametrize("selection, passed, skipped", [("clean_accuracy", 1, 0), ("not indicator", 2, 1)])
def test_a_partial_rerun_keeps_the_cells_whole_verdict_in_the_report(advprune, dense_cache, selection, passed, skipped):
    """Also when only the indicators were left out: the accuracy checks alone are not the whole verdict."""
    advprune.inprocess("--advprune-method=dense").assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    whole = advprune.records()[DENSE]
    result = advprune.inprocess("--advprune-method=dense", "-k", selection, "-q")  # shown under -q too
    result.assert_outcomes(passed=passed, skipped=skipped, deselected=PER_CELL - passed - skipped)
    assert advprune.records()[DENSE] == whole
    assert "kept the earlier whole verdict of 1 cell(s) this run checked only in part (dense-cnn-dense-0)" in result.stdout.str()


def test_a_report_that_cannot_be_written_saves_the_records_aside_and_exits_with_a_usage_error(advprune, dense_cache):
    advprune.inprocess("--advprune-method=dense").assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    doc = advprune.load_report()
    doc["records"].append({**doc["records"][0], "method": "earlier"})  # another cell of the report, to keep
    advprune.report_json.write_text(json.dumps(doc))
    before = advprune.report_json.read_bytes()
    advprune.pytester.makeconftest("""
import errno
import pytest_advprune.report as report

_write = report.atomic_write_bytes

def _full_disk(path, data):
    if "unwritten-reports" not in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _write(path, data)

report.atomic_write_bytes = _full_disk
""")
    result = advprune.subprocess("--advprune-method=dense", "--advprune-min-robust=99")  # fails: exit code 4 still
    assert result.ret == USAGE
    out = result.stdout.str()
    assert "advprune: report not written" in out and "No space left on device" in out
    assert advprune.report_json.read_bytes() == before
    command = re.search(r"python -m pytest_advprune\.report merge (.+) -o (\S+)", out)
    inputs, output = command.group(1).split(), command.group(2)
    assert inputs[0] == str(advprune.report_json) and "unwritten-reports" in inputs[1]
    assert [r["method"] for r in json.loads(Path(inputs[1]).read_text())["records"]] == ["dense"]
    assert pytest_advprune.report.main(["merge", *inputs, "-o", output]) == 0
    records = advprune.records()
    assert set(records) == {DENSE, DENSE.replace("dense-", "earlier-", 1)} and records[DENSE]["status"] == "FAIL"


def test_corrupt_report_is_moved_aside(advprune, dense_cache):
    advprune.report_json.parent.mkdir(parents=True)
    advprune.report_json.write_text('{"schema": 1, "records": [ this is not json')
    result = advprune.inprocess("--advprune-method=dense")
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    aside = list(advprune.report_json.parent.glob("smoke.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().endswith("this is not json")
    assert set(advprune.records()) == {DENSE}
    assert "was unreadable" in result.stdout.str()


def test_a_corrupt_cache_entry_is_rebuilt_and_said_under_quiet_too(advprune, dense_cache, tmp_path):
    advprune.cache_dir = shutil.copytree(dense_cache, tmp_path / "cache")  # the shared cache stays intact
    entries = sorted((advprune.cache_dir / "indicators").glob("*.json"))
    assert entries, "the warm cache holds the dense cell's indicators"
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:-20])
    result = advprune.inprocess("--advprune-method=dense", "-q")
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    assert re.search(r"^cache: indicators/\w+ is corrupt \(.+\); deleting and rebuilding it$", result.stdout.str(), re.M)


# ------------------------------------------------------------------ ini options, floors, verbosity


def test_ini_paths_are_taken_from_the_ini_files_folder_and_the_compare_options_can_be_set_there(advprune, dense_cache,
                                                                                                 monkeypatch):
    advprune.inprocess("--advprune-method=dense").assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    base = advprune.load_report()
    base["records"][0]["robust_acc"]["worst_case"] += 0.3  # a baseline this run falls short of
    (advprune.pytester.path / "BASE.json").write_text(json.dumps(base))
    advprune.pytester.makepyprojecttoml(f"""
        [tool.pytest.ini_options]
        advprune_cache_dir = "{dense_cache}"
        advprune_report = "ini-reports/smoke.md"
        advprune_compare = "BASE.json"
        advprune_compare_fail = "robust_acc:1.0"
    """)
    sub = advprune.pytester.path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    result = advprune.inprocess("--advprune-method=dense", cache=False, report=False)
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "1 regression(s) against" in result.stdout.str()
    assert (advprune.pytester.path / "ini-reports" / "smoke.json").exists() and not (sub / "ini-reports").exists()


def test_ini_options_are_used_and_the_command_line_wins(advprune, dense_cache, monkeypatch):
    fallback = advprune.pytester.path / "env-cache"
    monkeypatch.setenv("ADVPRUNE_CACHE_DIR", str(fallback))  # where the run would go without the ini value
    advprune.pytester.makepyprojecttoml(f"""
        [tool.pytest.ini_options]
        advprune_preset = "smoke"
        advprune_cache_dir = "{dense_cache}"
        advprune_report = "ini-reports/smoke.md"
        advprune_min_robust = "99"
    """)
    # the header first (collection only), so a broken ini reading cannot start the default preset's training
    result = advprune.inprocess("--advprune-method=dense", "--collect-only", preset=False, cache=False, report=False)
    result.stdout.fnmatch_lines(["advprune: preset: smoke"])
    result = advprune.inprocess("--advprune-method=dense", preset=False, cache=False, report=False)
    result.assert_outcomes(passed=DENSE_PASSED - 1, failed=1, skipped=DENSE_SKIPPED)  # the ini's robust floor of 99%
    assert "vs floor 99%" in advprune.cases()[f"test_robust_accuracy[{DENSE}]"][1]
    assert "training the dense" not in result.stdout.str() and not fallback.exists()
    ini_json = advprune.pytester.path / "ini-reports" / "smoke.json"
    assert advprune.records(ini_json)[DENSE]["floors"]["robust"] == 0.99

    result = advprune.inprocess("--advprune-method=dense", "--advprune-min-robust=10", cache=False)
    result.assert_outcomes(passed=DENSE_PASSED, skipped=DENSE_SKIPPED)
    assert advprune.records()[DENSE]["floors"]["robust"] == 0.10  # --advprune-report beat the ini's report

    quick = ("--advprune-preset=quick", "--advprune-report=reports/quick.md", "--collect-only")
    result = advprune.inprocess("--advprune-method=dense", *quick, "-q", preset=False, cache=False, report=False)
    assert ("test_sparsity", f"dense-{CELL}-dense-0") in collected(result)
    result = advprune.inprocess("--advprune-method=lwm", *quick, preset=False, cache=False, report=False)
    result.stdout.fnmatch_lines(["advprune: preset: quick"])
    assert {i for _, i in collected(result)} >= {f"lwm-{CELL}-weights-99", f"lwm-{CELL}-filters-75"}


def test_min_robust_override_fails_a_passing_method(advprune, dense_cache):
    result = advprune.inprocess("--advprune-method=dense", "--advprune-min-robust=99")
    result.assert_outcomes(passed=DENSE_PASSED - 1, failed=1, skipped=DENSE_SKIPPED)
    outcome, message = advprune.cases()[f"test_robust_accuracy[{DENSE}]"]
    assert outcome == "failed" and "vs floor 99%" in message
    rec = advprune.records()[DENSE]
    assert rec["floors"]["robust"] == 0.99 and rec["status"] == "FAIL" and rec["passed"] is False
    assert rec["floors"]["clean"] == 0.55  # the smoke preset's own dense floor, not overridden


def test_quiet_hides_progress_lines(advprune, dense_cache):
    folder = advprune.pytester.path / "contrib"
    for flags, shown in ((["-q"], False), ([], True)):
        token = random.randrange(1, 10**9)  # a model never evaluated before, so the run logs its evaluation
        advprune.write_methods(fresh=fresh_source(token))
        result = advprune.subprocess("--advprune-method=fresh", f"--advprune-methods-dir={folder}", "-k",
                                     "weights and not attack_indicator", *flags)
        result.assert_outcomes(passed=1, failed=2, deselected=2 * PER_CELL - 3)
        progress = [line for line in result.outlines if line.startswith("[advprune]")]
        if shown:
            assert any("PGD-5 on 200 points" in line for line in progress), result.stdout.str()
        else:
            assert progress == [], progress


KNOWN_WEAK = _HEADER + '''

@register
class KnownWeak(Method):
    """Weak on purpose, yet honestly evaluable: flips the sign of half the second conv layer's weights."""

    name = "knownweak"
    taxonomy = TAXONOMY
    structures = ("weights",)
    known_failures = {"smoke": "collapses by design"}

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        layer = list(prunable_layers(model).values())[1]
        flip = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        with torch.no_grad():
            layer.weight.mul_(torch.where(flip, -1.0, 1.0))
        return model
'''
KNOWN_WEAK_BUT_FINE = _HEADER + '''

@register
class KnownWeakButFine(Method):
    """Declares a known failure on smoke, yet magnitude pruning without damage passes the floors."""

    name = "fineafterall"
    taxonomy = TAXONOMY
    structures = ("weights",)
    known_failures = {"smoke:weights-90": "thought weak"}

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        return model
'''


def test_known_failure_is_reported_xfail_with_numbers_and_reason(advprune, dense_cache):
    folder = advprune.write_methods(knownweak=KNOWN_WEAK)
    result = advprune.subprocess("--advprune-method=knownweak", f"--advprune-methods-dir={folder}")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    cases = advprune.cases()
    cell = f"knownweak-{CELL}-weights-90"
    assert cases[f"test_sparsity[{cell}]"][0] == "passed", "sparsity is never excused"
    for test in ("test_clean_accuracy", "test_robust_accuracy"):
        outcome, message = cases[f"{test}[{cell}]"]
        assert outcome == "skipped" and "known failure of knownweak: collapses by design" in message, (test, message)
    rec = advprune.records()[cell]
    assert rec["status"] == "XFAIL" and rec["passed"] is False and rec["known_failure"] == "collapses by design"
    assert rec["clean_acc"] < 0.2
    md = advprune.report_md.read_text()
    assert "XFAIL" in md and "known failure: collapses by design" in md


def test_known_failure_that_passes_is_reported_xpass_and_passes(advprune, dense_cache):
    folder = advprune.write_methods(fineafterall=KNOWN_WEAK_BUT_FINE)
    result = advprune.subprocess("--advprune-method=fineafterall", f"--advprune-methods-dir={folder}", "-k", "weights-90",
                                 "-rX")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*XPASS*test_clean_accuracy*fineafterall*known failure of fineafterall: thought weak*"])
    assert advprune.records()[f"fineafterall-{CELL}-weights-90"]["status"] == "PASS"
