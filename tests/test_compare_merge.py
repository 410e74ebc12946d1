"""The regression gate (``--compare`` / ``--compare-fail``) and the report merge CLI.

Records are built by hand with the keys :func:`pytest_advprune.report.make_record` writes; the
pytest option pair is exercised with in-process runs of the smoke ``dense`` cell, which the shared
cache already holds (trained and evaluated), so those runs build nothing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Imported before any pytester snapshot of sys.modules (see tests/test_plugin.py).
import pytest_advprune.report  # noqa: F401
import pytest_advprune.session  # noqa: F401
from pytest_advprune import presets, registry, report
from pytest_advprune.indicators import NAMES as INDICATORS
from pytest_advprune.report import MergeError, Threshold, diff_markdown, merge_documents, parse_compare_fail, regressions

registry.load_builtin()  # outside any in-process run, so the method modules stay in sys.modules

SMOKE_PROTOCOL = report.protocol_id(presets.SMOKE)
DENSE = "dense-fashion_mnist-cnn-dense-0"
USAGE = pytest.ExitCode.USAGE_ERROR


def rec(method="lwm", sparsity=90, clean=0.75, robust=0.50, *, status="PASS", structure="weights", preset="smoke",
        protocol=None, achieved=None, evaluated=True, **changes) -> dict:
    """A smoke record; accuracies and ``achieved`` as fractions, ``sparsity`` in percent."""
    r = {
        "method": method, "preset": preset, "dataset": "fashion_mnist", "arch": "cnn", "structure": structure,
        "target_sparsity": sparsity / 100, "status": status, "passed": {"PASS": True, "FAIL": False}.get(status),
        "checks": {"sparsity": "passed", "clean": "passed", "robust": "passed"},
        "skip_reason": None, "error": "RuntimeError: boom" if status == "ERROR" else None,
        "protocol": protocol or (report.protocol_id(presets.PRESETS[preset]) if preset in presets.PRESETS else preset),
        "seed": 0, "device": "cpu", "duration_s": 12.0, "versions": {"torch": "2.14.1", "pytest-advprune": "0.1.0"},
        "date": "2025-01-02T03:04:05+00:00",
    }
    if evaluated:
        r.update({
            "achieved_sparsity": sparsity / 100 if achieved is None else achieved,
            "weight_sparsity": sparsity / 100 if achieved is None else achieved,
            "clean_acc": clean, "robust_acc": {"worst_case": robust, "PGD-5": robust + 0.02},
            "n_eval": 200, "ci95": {"clean": [clean - 0.05, clean + 0.05], "robust": [robust - 0.05, robust + 0.05]},
            "attack_warnings": [],
        })
    r.update(changes)
    return r


def doc(records, preset="smoke", taxonomy=None) -> dict:
    return {"schema": report.SCHEMA, "preset": preset, "protocol": records[0]["protocol"] if records else None,
            "header": {"preset": preset, "seed": "0"}, "records": list(records), "taxonomy": taxonomy or {}}


def cell_id(r: dict) -> str:
    return f"{r['method']}-{r['dataset']}-{r['arch']}-{r['structure']}-{round(100 * r['target_sparsity'])}"


# ================================================================== parse_compare_fail


def test_parse_compare_fail_reads_points_and_percent():
    assert parse_compare_fail("robust_acc:1.0,clean_acc:2%") == [
        Threshold("robust_acc", 1.0, relative=False), Threshold("clean_acc", 2.0, relative=True)]
    assert parse_compare_fail(" sparsity:0.5 , robust_acc:0,,") == [
        Threshold("sparsity", 0.5, False), Threshold("robust_acc", 0.0, False)]


@pytest.mark.parametrize("spec", ["accuracy:1", "robust:1.0", "robust_acc", "robust_acc:", "Robust_acc:1",
                                  "clean_acc:2%,worst:1"])
def test_parse_compare_fail_rejects_unknown_metrics(spec):
    with pytest.raises(ValueError) as info:
        parse_compare_fail(spec)
    msg = str(info.value)
    assert "METRIC:POINTS or METRIC:PERCENT%" in msg and "clean_acc, robust_acc, sparsity" in msg, msg


@pytest.mark.parametrize("spec", ["robust_acc:abc", "robust_acc:1pt", "clean_acc:%", "clean_acc:2%x", "robust_acc:1,0"])
def test_parse_compare_fail_rejects_bad_numbers(spec):
    with pytest.raises(ValueError) as info:
        parse_compare_fail(spec)
    assert "1.0" in str(info.value) and "2%" in str(info.value), str(info.value)  # shows the accepted form


def test_parse_compare_fail_rejects_negative_margins():
    with pytest.raises(ValueError, match=">= 0"):
        parse_compare_fail("robust_acc:-1")


@pytest.mark.parametrize("spec", ["robust_acc:nan", "clean_acc:nan%", "robust_acc:inf"])
def test_parse_compare_fail_rejects_non_finite_margins(spec):
    # A NaN margin makes every comparison false: the gate would silently pass every regression.
    with pytest.raises(ValueError):
        parse_compare_fail(spec)


# ================================================================== regressions


def test_regressions_absolute_points():
    base = [rec(robust=0.50)]
    gate = parse_compare_fail("robust_acc:1.0")
    rows = regressions([rec(robust=0.485)], base, gate)
    assert rows == [["lwm-fashion_mnist-cnn-weights-90", "robust_acc", "50.0", "48.5", "1.00"]]
    assert regressions([rec(robust=0.495)], base, gate) == []  # within the margin
    assert regressions([rec(robust=0.60)], base, gate) == []  # an improvement


def test_regressions_exact_margin_is_not_a_regression():
    # 0.06 < 0.07 - 0.01 in floating point although the drop is exactly one point.
    assert regressions([rec(robust=0.06)], [rec(robust=0.07)], parse_compare_fail("robust_acc:1")) == []
    assert regressions([rec(robust=0.09)], [rec(robust=0.10)], parse_compare_fail("robust_acc:1")) == []


def test_regressions_relative_percent():
    base = [rec(clean=0.80)]
    relative = parse_compare_fail("clean_acc:2%")  # 2% of 80 points = 1.6 points
    assert regressions([rec(clean=0.78)], base, relative) == [
        ["lwm-fashion_mnist-cnn-weights-90", "clean_acc", "80.0", "78.0", "1.60"]]
    assert regressions([rec(clean=0.79)], base, relative) == []
    # the same 2-point drop is allowed as an absolute margin of 2 points
    assert regressions([rec(clean=0.78)], base, parse_compare_fail("clean_acc:2")) == []


def test_regressions_each_metric_and_cell_separately():
    base = [rec(clean=0.80, robust=0.50), rec(sparsity=95, clean=0.70, robust=0.40), rec("hydra", achieved=0.90)]
    ours = [rec(clean=0.70, robust=0.40), rec(sparsity=95, clean=0.70, robust=0.40), rec("hydra", achieved=0.80)]
    rows = regressions(ours, base, parse_compare_fail("robust_acc:1.0,clean_acc:2%,sparsity:1"))
    assert sorted((r[0], r[1]) for r in rows) == [
        ("hydra-fashion_mnist-cnn-weights-90", "sparsity"),
        ("lwm-fashion_mnist-cnn-weights-90", "clean_acc"),
        ("lwm-fashion_mnist-cnn-weights-90", "robust_acc"),
    ]


def test_regressions_ignore_new_and_vanished_cells():
    base = [rec(robust=0.50)]
    new_cells = [rec(sparsity=95, robust=0.01), rec("hydra", robust=0.0), rec(structure="filters", sparsity=90, robust=0.0)]
    assert regressions(new_cells, base, parse_compare_fail("robust_acc:1.0")) == []
    assert regressions([], base, parse_compare_fail("robust_acc:1.0")) == []


def test_regressions_compare_the_same_cell_only():
    # the same method and sparsity on another preset is another cell
    assert regressions([rec(robust=0.1, preset="quick")], [rec(robust=0.5)], parse_compare_fail("robust_acc:1")) == []


def test_regression_table_shows_percentages_with_their_decimals():
    # like the report's detail table, "50.0" must not be re-parsed into the number 50
    table = report.regression_table([["lwm-fashion_mnist-cnn-weights-90", "robust_acc", "50.0", "48.5", "1.00"]])
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row == ["lwm-fashion_mnist-cnn-weights-90", "robust_acc", "50.0", "48.5", "1.00"]


# ================================================================== merge_documents / diff_markdown


def test_merge_documents_later_wins_per_cell():
    a = doc([rec(robust=0.40), rec(sparsity=95, robust=0.30)], taxonomy={"lwm": {"pipeline": "A"}})
    b = doc([rec(robust=0.45), rec("hydra", robust=0.50)], taxonomy={"hydra": {"pipeline": "A"}})
    merged = merge_documents([a, b])
    by = {cell_id(r): r for r in merged["records"]}
    assert set(by) == {"lwm-fashion_mnist-cnn-weights-90", "lwm-fashion_mnist-cnn-weights-95",
                       "hydra-fashion_mnist-cnn-weights-90"}
    assert by["lwm-fashion_mnist-cnn-weights-90"]["robust_acc"]["worst_case"] == 0.45
    assert by["lwm-fashion_mnist-cnn-weights-95"]["robust_acc"]["worst_case"] == 0.30
    assert merged["preset"] == "smoke" and merged["protocol"] == SMOKE_PROTOCOL and merged["schema"] == report.SCHEMA
    assert set(merged["taxonomy"]) == {"lwm", "hydra"}
    reverse = {cell_id(r): r for r in merge_documents([b, a])["records"]}
    assert reverse["lwm-fashion_mnist-cnn-weights-90"]["robust_acc"]["worst_case"] == 0.40


def test_merge_documents_keeps_superseded_records_until_their_cell_has_a_whole_verdict():
    old = rec("lwm", protocol="quick-e0-0000000000000000")
    a = {**doc([rec("hydra")]), "superseded": [old]}
    assert report.merge_documents([a])["superseded"] == [old]
    assert report.merge_documents([a, doc([rec("lwm")])])["superseded"] == []


def test_merge_cli_waits_for_the_reports_lock_then_gives_up_with_one_line(tmp_path, capsys, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(report, "LOCK_TIMEOUT_S", 0.2)
    a = write(tmp_path / "A.json", doc([rec()]))
    with FileLock(str(tmp_path / "x.json.lock")):
        assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 2
    assert "could not lock" in capsys.readouterr().err and not (tmp_path / "x.md").exists()


def test_merge_documents_refuses_different_presets():
    with pytest.raises(MergeError, match="different presets.*quick.*smoke|different presets.*smoke.*quick"):
        merge_documents([doc([rec()]), doc([rec(preset="quick")], preset="quick")])


def test_merge_documents_refuses_different_protocols():
    older = rec(sparsity=95, protocol="smoke-e0-0123456789abcdef")
    with pytest.raises(MergeError, match="protocol"):
        merge_documents([doc([rec()]), doc([older])])
    assert issubclass(MergeError, ValueError)


def diff_rows(text: str) -> dict[str, list[str]]:
    """``{method: [cell, before, after]}`` of a diff table (one row per method in these tests)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()[2:]]
    out = {r[0].split("-")[0]: r for r in rows}
    assert len(out) == len(rows), text
    return out


def test_diff_markdown_lists_new_changed_and_removed_cells():
    old = doc([rec(robust=0.40), rec("unchanged", robust=0.30), rec("random", robust=0.2)])
    new = doc([rec(robust=0.45), rec("unchanged", robust=0.30), rec("hydra", robust=0.50)])
    rows = diff_rows(diff_markdown(old, new))
    assert {m: r[1:] for m, r in rows.items()} == {
        "lwm": ["75.0 / 40.0 PASS", "75.0 / 45.0 PASS"],
        "hydra": ["new", "75.0 / 50.0 PASS"],
        "random": ["-", "removed"],
    }
    assert all("fashion_mnist" in r[0] and "cnn" in r[0] for r in rows.values())
    assert diff_markdown(new, new) == "No change against the committed leaderboard."
    assert {m: r[1] for m, r in diff_rows(diff_markdown(None, new)).items()} == {
        "lwm": "new", "unchanged": "new", "hydra": "new"}
    status_only = doc([rec(robust=0.45, status="FAIL"), rec("unchanged", robust=0.30), rec("hydra", robust=0.50)])
    assert {m: r[1:] for m, r in diff_rows(diff_markdown(new, status_only)).items()} == {
        "lwm": ["75.0 / 45.0 PASS", "75.0 / 45.0 FAIL"]}


# ================================================================== python -m pytest_advprune.report merge


def write(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_merge_cli_writes_markdown_and_json_and_prints_the_diff(tmp_path):
    a = write(tmp_path / "A.json", doc([rec(robust=0.40), rec(sparsity=95, robust=0.30)]))
    b = write(tmp_path / "B.json", doc([rec(robust=0.45)]))
    proc = subprocess.run([sys.executable, "-m", "pytest_advprune.report", "merge", str(a), str(b), "-o", "out/x.md"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.suffix != ".lock") == ["x.json", "x.md"]
    merged = json.loads((out / "x.json").read_text())
    assert merged == {**merge_documents([json.loads(a.read_text()), json.loads(b.read_text())]),
                      "updated": merged["updated"], "curves_dir": "x_curves"}  # no FMN records here: no figures
    assert (out / "x.md").read_text() == report.render_markdown(merged)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| lwm-")]
    assert len(rows) == 2 and all("| new " in r for r in rows), proc.stdout  # both cells are new to out/

    # a second merge into the same output prints the diff against what is there
    c = write(tmp_path / "C.json", doc([rec(robust=0.48)]))
    assert report.main(["merge", str(out / "x.json"), str(c), "-o", str(out / "x.md")]) == 0
    assert {cell_id(r): r["robust_acc"]["worst_case"] for r in json.loads((out / "x.json").read_text())["records"]} == {
        "lwm-fashion_mnist-cnn-weights-90": 0.48, "lwm-fashion_mnist-cnn-weights-95": 0.30}


def test_merge_cli_refuses_to_overwrite_a_report_of_another_preset(tmp_path, capsys):
    quick = write(tmp_path / "x.json", doc([rec(preset="quick")], preset="quick"))
    before = quick.read_bytes()
    a = write(tmp_path / "A.json", doc([rec()]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 2
    assert "x.json holds preset 'quick', not 'smoke'" in capsys.readouterr().err
    assert quick.read_bytes() == before and not (tmp_path / "x.md").exists()


@pytest.mark.parametrize("output, message", [
    ("/proc/x.md", "-o /proc/x.md: cannot create /proc/x.json.lock"),
    ("out/x.txt", "-o out/x.txt: give the markdown file's path, ending in .md"),
    ("afile/x.md", "afile is a file, not a folder"),
])
def test_merge_cli_refuses_an_output_it_cannot_write_at_once(tmp_path, capsys, monkeypatch, output, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "LOCK_TIMEOUT_S", 30)  # a refusal that waited for the lock would show as a timeout
    (tmp_path / "afile").write_text("not a folder\n")
    a = write(tmp_path / "A.json", doc([rec()]))
    assert report.main(["merge", str(a), "-o", output]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_merge_cli_diff_against_the_previous_output(tmp_path, capsys):
    a = write(tmp_path / "A.json", doc([rec(robust=0.40), rec(sparsity=95)]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    capsys.readouterr()
    b = write(tmp_path / "B.json", doc([rec(robust=0.45)]))
    assert report.main(["merge", str(b), "-o", str(tmp_path / "x.md")]) == 0
    out = capsys.readouterr().out
    assert "75.0 / 40.0 PASS" in out and "75.0 / 45.0 PASS" in out  # changed cell: before and after
    assert "removed" in out  # the 95% cell is not in B


@pytest.mark.parametrize("second", [
    doc([rec(preset="quick")], preset="quick"),
    doc([rec(sparsity=95, protocol="smoke-e0-0123456789abcdef")]),
], ids=["other-preset", "other-protocol"])
def test_merge_cli_refuses_incompatible_inputs(tmp_path, capsys, second):
    a = write(tmp_path / "A.json", doc([rec()]))
    b = write(tmp_path / "B.json", second)
    assert report.main(["merge", str(a), str(b), "-o", str(tmp_path / "out" / "x.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to merge"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name"),
    ('{"a": 1}', "not a schema-1 pytest-advprune report"),
    ("[]", "not a schema-1 pytest-advprune report"),
    ('{"schema": 1, "records": [{"method": "hydra"}]}', "a record lacks one of method, preset, dataset"),
])
def test_merge_cli_unreadable_input_exits_2(tmp_path, capsys, text, why):
    a = write(tmp_path / "A.json", doc([rec()]))
    (tmp_path / "B.json").write_text(text)
    assert report.main(["merge", str(a), str(tmp_path / "B.json"), "-o", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err
    assert "B.json: unreadable report" in err and why in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.md").exists()


def test_merge_cli_compare_exits_1_with_a_regression_table(tmp_path, capsys):
    base = write(tmp_path / "BASE.json", doc([rec(clean=0.80, robust=0.50), rec(sparsity=95, robust=0.40)]))
    a = write(tmp_path / "A.json", doc([rec(clean=0.80, robust=0.45), rec(sparsity=95, robust=0.40)]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md"), "--compare", str(base)]) == 1
    out = capsys.readouterr().out
    assert "allowed drop (points)" in out
    table = [line for line in out.splitlines() if "robust_acc" in line or "clean_acc" in line]
    assert len(table) == 1 and table[0].startswith("| lwm-fashion_mnist-cnn-weights-90 "), out
    # a wider margin lets the same drop through; so does a baseline without the regression
    assert report.main(["merge", str(a), "-o", str(tmp_path / "y.md"), "--compare", str(base),
                        "--compare-fail", "robust_acc:6"]) == 0
    assert report.main(["merge", str(a), "-o", str(tmp_path / "z.md"), "--compare", str(a)]) == 0
    assert "allowed drop" not in capsys.readouterr().out


def test_merge_cli_bad_compare_fail_exits_2(tmp_path, capsys):
    a = write(tmp_path / "A.json", doc([rec()]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md"), "--compare-fail", "robust:1"]) == 2
    assert "METRIC:POINTS" in capsys.readouterr().err


def test_merge_cli_missing_baseline_is_an_error_line_not_a_traceback(tmp_path):
    a = write(tmp_path / "A.json", doc([rec()]))
    proc = subprocess.run([sys.executable, "-m", "pytest_advprune.report", "merge", str(a), "-o", "x.md",
                           "--compare", "missing.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "missing.json" in proc.stderr


# ================================================================== --advprune-compare / --advprune-compare-fail


@pytest.fixture
def dense_report(advprune, dense_cache) -> dict:
    """The report JSON of an in-process run of the (cached) smoke dense cell."""
    result = advprune.inprocess("--advprune-method=dense")
    assert result.ret == 0, result.stdout.str()
    return advprune.load_report()


def test_compare_fails_the_run_on_a_regression_and_prints_the_table(advprune, dense_report):
    base = json.loads(json.dumps(dense_report))
    (dense,) = [r for r in base["records"] if cell_id(r) == DENSE]
    ours = dense["robust_acc"]["worst_case"]
    claimed = dense["robust_acc"]["worst_case"] = min(1.0, ours + 0.3)
    path = write(advprune.pytester.path / "BASE.json", base)

    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare={path}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # every check passed (smoke runs no Square and the dense cell has no transfer source: 2 indicators skip, and the
    # sparsity check does not apply): the comparison alone fails the run
    result.assert_outcomes(passed=2 + len(INDICATORS) - 2, skipped=3)
    text = result.stdout.str()
    assert "1 regression(s) against --advprune-compare" in text
    (row,) = [line for line in result.outlines if line.startswith(f"| {DENSE}")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "robust_acc" and float(cells[2]) == pytest.approx(100 * claimed, abs=0.05)
    assert float(cells[3]) == pytest.approx(100 * ours, abs=0.05)

    # the margin is the user's: a 40-point allowance lets it pass
    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare={path}", "--advprune-compare-fail=robust_acc:40")
    assert result.ret == pytest.ExitCode.OK
    assert "regression(s) against" not in result.stdout.str()


def test_compare_against_an_equal_baseline_passes(advprune, dense_report):
    path = write(advprune.pytester.path / "BASE.json", dense_report)
    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare={path}")
    assert result.ret == pytest.ExitCode.OK
    assert "regression(s) against" not in result.stdout.str()


@pytest.mark.parametrize("value", ["robust:1", "robust_acc:abc", "robust_acc:-2"])
def test_bad_compare_fail_is_a_usage_error(advprune, value):
    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare-fail={value}")
    assert result.ret == USAGE
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --advprune-compare-fail:"), errors
    assert not (advprune.pytester.path / "reports").exists()


def test_compare_options_that_could_compare_nothing_are_usage_errors(advprune):
    quick = write(advprune.pytester.path / "Q.json", doc([rec(preset="quick")], preset="quick"))
    for args, needle in (([f"--advprune-compare={quick}"], "holds preset 'quick', not 'smoke': no cell could be compared"),
                         (["--advprune-compare-fail=robust_acc:1"], "--advprune-compare-fail needs --advprune-compare")):
        result = advprune.inprocess("--advprune-method=dense", *args)
        assert result.ret == USAGE
        errors = [line for line in result.errlines if line.strip()]
        assert len(errors) == 1 and needle in errors[0], errors


def test_a_k_run_is_compared_only_on_what_it_measured(advprune, dense_report):
    path = write(advprune.pytester.path / "BASE.json", dense_report)
    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare={path}", "-k", "sparsity")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert "regression(s) against" not in result.stdout.str()


def test_missing_compare_baseline_is_a_usage_error_before_anything_runs(advprune):
    result = advprune.inprocess("--advprune-method=dense", "--advprune-compare=nowhere.json")
    assert result.ret == USAGE
    assert "nowhere.json" in "\n".join(result.errlines)
    assert not advprune.junit.exists() or "testcase" not in advprune.junit.read_text(), "the run went ahead first"


def test_unreadable_compare_baseline_is_left_where_it_is(advprune):
    path = advprune.pytester.path / "BASE.json"
    path.write_text("<<<<<<< HEAD\n{}\n")
    result = advprune.inprocess("--advprune-method=dense", f"--advprune-compare={path}")
    assert result.ret == USAGE
    moved = sorted(p.name for p in path.parent.glob("BASE.json.corrupt-*"))
    assert path.is_file() and not moved, f"the user's baseline was moved aside to {moved}"
    assert path.read_text() == "<<<<<<< HEAD\n{}\n"
    assert "no such" not in "\n".join(result.errlines), "an unreadable baseline is reported as a missing one"


def test_a_cell_that_now_errors_is_a_regression():
    from pytest_advprune import report as rp

    base = {"method": "m", "preset": "smoke", "dataset": "fashion_mnist", "arch": "cnn", "structure": "weights",
            "target_sparsity": 0.9, "clean_acc": 0.8, "robust_acc": {"worst_case": 0.6}}
    now = {k: v for k, v in base.items() if k not in ("clean_acc", "robust_acc")}
    rows = rp.regressions([now], [base], rp.parse_compare_fail("robust_acc:1.0"))
    assert [r[1] for r in rows] == ["robust_acc"] and rows[0][3] == "0.0"


# ------------------------------------------------------------------------------ drop


def test_drop_removes_the_matching_cells_and_rerenders_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    a = write(tmp_path / "A.json", doc([rec(), rec(sparsity=95), rec("hydra"), rec("hydra", structure="filters", sparsity=50)]))
    assert report.main(["merge", str(a), "-o", str(out / "x.md")]) == 0
    capsys.readouterr()
    assert report.main(["drop", str(out / "x.md"), "--method", "lwm", "--sparsity", "95"]) == 0
    assert capsys.readouterr().out.splitlines() == ["dropped lwm-fashion_mnist-cnn-weights-95 (PASS)"]
    kept = json.loads((out / "x.json").read_text())
    assert sorted(cell_id(r) for r in kept["records"]) == [
        "hydra-fashion_mnist-cnn-filters-50", "hydra-fashion_mnist-cnn-weights-90", "lwm-fashion_mnist-cnn-weights-90"]
    assert (out / "x.md").read_text() == report.render_markdown(kept)
    assert report.main(["drop", str(out / "x.md"), "--method", "hydra"]) == 0
    assert [cell_id(r) for r in json.loads((out / "x.json").read_text())["records"]] == ["lwm-fashion_mnist-cnn-weights-90"]


@pytest.mark.parametrize("args, message", [
    ([], "give at least one of --method, --arch, --structure, --sparsity"),
    (["--method", "nosuch"], "matches method=nosuch; it holds hydra (cnn), lwm (cnn)"),
    (["--method", "lwm", "--arch", "vgg16"], "matches method=lwm, arch=vgg16"),
])
def test_drop_that_matches_nothing_or_has_no_filter_writes_nothing(tmp_path, capsys, args, message):
    a = write(tmp_path / "A.json", doc([rec(), rec("hydra")]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ("x.md", "x.json")}
    capsys.readouterr()
    assert report.main(["drop", str(tmp_path / "x.md"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert {p: (tmp_path / p).read_bytes() for p in before} == before


def test_drop_refuses_a_missing_or_unreadable_report(tmp_path, capsys):
    assert report.main(["drop", str(tmp_path / "none.md"), "--method", "lwm"]) == 2
    assert "none.json: no such report" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{ not json")
    assert report.main(["drop", str(tmp_path / "bad.md"), "--method", "lwm"]) == 2
    assert "bad.json: unreadable report" in capsys.readouterr().err
    assert (tmp_path / "bad.json").read_text() == "{ not json"


@pytest.mark.parametrize("value, dropped", [("50", True), ("50.0", True), ("0.5", False)])
def test_drop_reads_the_sparsity_in_percent(tmp_path, capsys, value, dropped):
    a = write(tmp_path / "A.json", doc([rec(), rec(structure="filters", sparsity=50)]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    assert report.main(["drop", str(tmp_path / "x.md"), "--sparsity", value]) == (0 if dropped else 2)
    assert len(json.loads((tmp_path / "x.json").read_text())["records"]) == (1 if dropped else 2)


@pytest.mark.parametrize("value", ["abc", "nan", "-5", "100"])
def test_drop_refuses_a_sparsity_that_is_not_a_percentage(tmp_path, capsys, value):
    a = write(tmp_path / "A.json", doc([rec()]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    capsys.readouterr()
    assert report.main(["drop", str(tmp_path / "x.md"), "--sparsity", value]) == 2
    assert f"--sparsity {value}: give the target sparsity in percent" in capsys.readouterr().err


def test_drop_keeps_the_taxonomy_of_the_methods_left_only(tmp_path):
    rows = {"lwm": {"pipeline": "after"}, "hydra": {"pipeline": "after"}}
    a = write(tmp_path / "A.json", doc([rec(), rec("hydra")], taxonomy=rows))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    assert report.main(["drop", str(tmp_path / "x.md"), "--method", "hydra"]) == 0
    assert set(json.loads((tmp_path / "x.json").read_text())["taxonomy"]) == {"lwm"}


def test_drop_reads_the_report_under_its_lock_so_a_run_writing_meanwhile_is_kept(tmp_path, monkeypatch):
    a = write(tmp_path / "A.json", doc([rec(), rec("hydra")]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    locked = report._locked

    @contextlib.contextmanager
    def another_run_wrote_first(json_path):
        with locked(json_path):  # the run held the lock and added its record before drop got it
            current = json.loads(json_path.read_text())
            current["records"].append(rec("random"))
            json_path.write_text(json.dumps(current))
            yield

    monkeypatch.setattr(report, "_locked", another_run_wrote_first)
    assert report.main(["drop", str(tmp_path / "x.md"), "--method", "hydra"]) == 0
    assert sorted(r["method"] for r in json.loads((tmp_path / "x.json").read_text())["records"]) == ["lwm", "random"]


def test_a_report_file_that_cannot_be_replaced_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    a = write(tmp_path / "A.json", doc([rec(), rec("hydra")]))
    assert report.main(["merge", str(a), "-o", str(tmp_path / "x.md")]) == 0
    write_bytes = report.atomic_write_bytes

    def immutable_markdown(path, data):
        if str(path).endswith(".md"):
            raise PermissionError(1, "Operation not permitted", str(path))
        write_bytes(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", immutable_markdown)
    capsys.readouterr()
    for argv in (["drop", str(tmp_path / "x.md"), "--method", "hydra"], ["merge", str(a), "-o", str(tmp_path / "x.md")]):
        assert report.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: could not write {tmp_path / 'x.md'} (Operation not permitted)") and "\n" not in err
        assert f"re-render with python -m pytest_advprune.report merge {tmp_path / 'x.json'} -o {tmp_path / 'x.md'}" in err


def test_merge_to_an_empty_output_path_is_one_line_exit_2(tmp_path, capsys):
    a = write(tmp_path / "A.json", doc([rec()]))
    assert report.main(["merge", str(a), "-o", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "give the markdown file's path, ending in .md" in err and "\n" not in err
