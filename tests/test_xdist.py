"""Runs over several processes: GPU per worker, the cache built once, records joined, one report.

The end-to-end check runs the smoke preset's ``dense`` and ``lwm`` cells (cached by the shared
smoke fixtures and by test_methods_smoke) with ``-n 0`` and with ``-n 2`` and compares the records.
"""

from __future__ import annotations

import multiprocessing
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pytest_advprune.report  # noqa: F401  (imported before any pytester snapshot of sys.modules)
import pytest_advprune.session  # noqa: F401
from pytest_advprune import report
from pytest_advprune.cache import Cache
from pytest_advprune.parallel import worker_device, worker_index

CELL = "fashion_mnist-cnn"
# Fields that differ between two runs of the same cells by nature: timing, where and when it ran.
# timings, where a cell ran, and its measured latencies (inference); the CPU thread count differs between this
# process (tests set 1 thread) and the workers, and only matters for cells built anew, which these are not
VOLATILE = {"duration_s", "eval_s", "date", "device", "worker", "inference", "latency_speedup"}

# ------------------------------------------------------------------ device per worker


@pytest.mark.parametrize("requested, worker, count, expected", [
    ("auto", "gw0", 4, "cuda:0"),
    ("auto", "gw5", 4, "cuda:1"),
    ("cuda", "gw3", 2, "cuda:1"),
    ("auto", "gw1", 1, "cuda:0"),
    ("cuda:3", "gw0", 4, "cuda:3"),  # explicit index respected
    ("cpu", "gw1", 4, "cpu"),
    ("auto", None, 4, "auto"),  # the main process resolves auto itself
    ("auto", "gw2", 0, "auto"),  # no GPU: auto falls back to the CPU later
    ("cuda", "gw2", 0, "cuda"),  # no GPU: left for RunConfig.torch_device's one-line error
    ("auto", "master", 4, "auto"),
])
def test_worker_device(requested, worker, count, expected):
    assert worker_device(requested, worker, count) == expected


@given(k=st.integers(0, 512), count=st.integers(1, 16))
def test_workers_spread_round_robin_over_the_gpus(k, count):
    assert worker_device("auto", f"gw{k}", count) == f"cuda:{k % count}"
    assert worker_device(f"cuda:{count - 1}", f"gw{k}", count) == f"cuda:{count - 1}"


@pytest.mark.parametrize("worker, index", [("gw0", 0), ("gw12", 12), (None, None), ("", None), ("gwx", None),
                                           ("xgw1", None)])
def test_worker_index(worker, index):
    assert worker_index(worker) == index


# ------------------------------------------------------------------ cache entry built once


def _ask_for_entry(root: str, marker: str, barrier, results) -> None:
    def build():
        with open(marker, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)  # long enough for the other process to arrive while the entry is being built
        return {"value": 42}

    barrier.wait()
    payload, cached = Cache(root).json("dense", "a" * 24, build)
    results.put((payload, cached))


def test_two_processes_build_one_cache_entry_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results, marker = ctx.Barrier(2), ctx.Queue(), tmp_path / "builds.txt"
    procs = [ctx.Process(target=_ask_for_entry, args=(str(tmp_path / "cache"), str(marker), barrier, results))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert marker.read_text() == "built\n"
    assert sorted(cached for _, cached in got) == [False, True]
    assert all(payload == {"value": 42} for payload, _ in got)


# ------------------------------------------------------------------ records of one cell from several workers


def _rec(checks: dict, *, evaluated: bool = True, error=None, **changes) -> dict:
    rec = {"method": "lwm", "preset": "smoke", "dataset": "fashion_mnist", "arch": "cnn", "structure": "weights",
           "target_sparsity": 0.9, "checks": dict(checks), "skip_reason": None, "error": error, "device": "cpu"}
    rec["status"], rec["passed"] = report.record_status(rec["checks"], None, error)
    if evaluated:
        rec.update(clean_acc=0.7, robust_acc={"worst_case": 0.4})
    return {**rec, **changes}


def test_combine_joins_a_cell_split_over_workers():
    sparsity_only = _rec({"sparsity": "passed"}, evaluated=False, worker="gw0")
    indicators = {k: "passed" for k in report.cell_checks() if k.startswith("indicator:")}
    accuracy = _rec({"clean": "passed", "robust": "passed", **indicators}, worker="gw1")
    assert sparsity_only["status"] == accuracy["status"] == "partial"
    (joined,) = report.combine([sparsity_only, accuracy])
    assert joined["checks"] == {"sparsity": "passed", "clean": "passed", "robust": "passed", **indicators}
    assert joined["status"] == "PASS" and joined["passed"] is True and joined["clean_acc"] == 0.7


@pytest.mark.parametrize("second, status", [
    (_rec({"clean": "failed", "robust": "passed"}), "FAIL"),
    (_rec({"clean": "passed", "robust": "passed"}, evaluated=False, error="RuntimeError: CUDA out of memory"), "ERROR"),
])
def test_combine_never_passes_a_cell_that_failed_on_one_worker(second, status):
    (joined,) = report.combine([_rec({"sparsity": "passed"}, evaluated=False), second])
    assert joined["status"] == status and joined["passed"] is False


def test_combine_keeps_distinct_cells_and_single_records_unchanged():
    a = _rec({"sparsity": "passed", "clean": "passed", "robust": "passed"})
    b = _rec({"sparsity": "passed", "clean": "passed", "robust": "passed"}, target_sparsity=0.5, structure="filters")
    assert report.combine([a, b]) == [a, b]


# ------------------------------------------------------------------ dist mode


CONFTEST_PRINTS_DIST = """
def pytest_configure(config):
    print("DIST=" + str(config.option.dist))
"""


@pytest.mark.parametrize("args, dist", [
    (["-n", "2", "--advprune-method=lwm"], "loadgroup"),  # chosen for the user
    (["-n", "2", "--dist", "load", "--advprune-method=lwm"], "load"),  # the user's choice is kept
    (["-n", "2", "--dist=loadscope", "--advprune-method=lwm"], "loadscope"),
    (["-n", "2"], "load"),  # plugin inactive: pytest-xdist's own default
    (["-n", "0", "--advprune-method=lwm"], "no"),
])
def test_loadgroup_is_the_default_dist_mode(advprune, args, dist):
    advprune.pytester.makeconftest(CONFTEST_PRINTS_DIST)
    result = advprune.inprocess(*args, "--collect-only", "-q")
    assert f"DIST={dist}" in result.stdout.str()


# ------------------------------------------------------------------ -n 2 against -n 0, end to end


def _stable(records: dict[str, dict]) -> dict[str, dict]:
    def keep(rec: dict) -> dict:
        out = {k: v for k, v in rec.items() if k not in VOLATILE}
        out["versions"] = {k: v for k, v in rec["versions"].items() if k != "cpu threads"}
        return out
    return {cell: keep(rec) for cell, rec in records.items()}


def test_two_workers_write_the_same_report_as_one_process(advprune, dense_cache):
    methods = "--advprune-method=dense,lwm"
    single = advprune.inprocess(methods)  # cells cached by the smoke fixtures (and test_methods_smoke)
    assert single.ret == 0, single.stdout.str()
    one = advprune.records()
    advprune.report_json.unlink()
    advprune.report_md.unlink()

    result = advprune.subprocess(methods, "-n", "2", "-v")
    out = result.stdout.str()
    assert result.ret == 0, out
    two = advprune.records()
    assert _stable(two) == _stable(one)
    assert {r["status"] for r in two.values()} == {"PASS"}
    assert {r["worker"] for r in two.values()} == {"gw0", "gw1"}  # both workers got cells
    assert all(r["device"] == "cpu" for r in two.values())
    # --dist loadgroup (chosen by the plugin): every test of a cell ran on one worker
    where: dict[str, set[str]] = {}
    for worker, cell in re.findall(r"\[(gw\d)\][^\n]*?(?:PASSED|SKIPPED|FAILED)[^\n]*?\[([^\]]+)\]", out):
        cell = re.match(r".*?-(?:weights|filters|channels|dense)-\d+", cell).group(0)  # indicator ids add a suffix
        where.setdefault(cell, set()).add(worker)
    assert len(where) == len(two) and all(len(w) == 1 for w in where.values()), where
    # exactly one report, consistent with its JSON, and the leaderboard on the controller's terminal
    doc = advprune.load_report()
    assert advprune.report_md.read_text() == report.render_markdown(doc)
    assert sorted(p.name for p in advprune.report_md.parent.iterdir() if not p.name.endswith(".lock")) == \
        ["smoke.json", "smoke.md", "smoke_curves"]
    assert "advprune leaderboard" in out
    assert re.search(r"^lwm\s", out, re.M), out  # the lwm row of the terminal leaderboard
