"""--advprune-estimate: the projection's counts, its reading of the cache, and the dry run itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pytest_advprune.report  # noqa: F401  (imported before any pytester snapshot of sys.modules)
import pytest_advprune.session  # noqa: F401
from pytest_advprune import presets, registry
from pytest_advprune.estimate import TRAIN_SIZES, eval_passes, estimate, indicator_passes, seconds_per_pass, train_passes
from pytest_advprune.session import AdvPruneSession, RunConfig

registry.load_builtin()


def _session(preset: str, methods: list[str], cache_dir) -> AdvPruneSession:
    return AdvPruneSession(RunConfig(presets.get(preset), methods, device="cpu", cache_dir=str(cache_dir)))


def test_train_passes_count_the_attack_steps_and_the_training_step():
    assert train_passes(presets.QUICK.dense_train, 60000) == 5 * 60000 * 2  # FGSM-RS: 1 attack step + 1 step
    assert train_passes(presets.PRESETS["cifar10"].dense_train, 50000) == 100 * 50000 * 11  # PGD-10 AT


def test_eval_passes_follow_the_cascade():
    # quick: clean forward, PGD-20 on all points, APGD-CE on the correct ones, then on the robust ones APGD-T
    # (3 targets) and Square (3000 queries, forwards: a third of a pass each); FMN Linf and L2 (100 steps)
    # on the correct points plus their tuning grids; the indicators on their 200 points
    fmn = presets.QUICK.fmn
    indicators = 200 * ((3 + 2) / 3 + 1 + 10 * (2 + 4) + 20)
    assert indicator_passes(1000) == pytest.approx(indicators) and indicator_passes(50) == pytest.approx(indicators / 4)
    assert eval_passes(presets.QUICK, 0.8, 0.5) == pytest.approx(
        1000 * (1 / 3 + 20 + 0.8 * 100 + 0.5 * (300 + 3000 / 3)) + 2 * 0.8 * 1000 * 100 + fmn.tuning_cost() + indicators)
    # standard: APGD-T and FAB-T with 9 targets, Square's 5000 queries are forwards (a third of a pass)
    cifar = presets.PRESETS["cifar10"]
    expected = 10000 * (1 / 3 + 20 + 1.0 * 100 + 0.5 * (900 + 900 + 5000 / 3))
    if cifar.fmn is not None:
        expected += len(cifar.fmn.norms) * 10000 * cifar.fmn.steps + cifar.fmn.tuning_cost()
    assert eval_passes(cifar, 1.0, 0.5) == pytest.approx(expected + indicators)


def test_seconds_per_pass_is_measured():
    s = seconds_per_pass("cnn", "fashion_mnist", 8, torch.device("cpu"), budget_s=0.05)
    assert 0 < s and math.isfinite(s)


def test_throughput_is_timed_at_the_training_batch_on_a_cpu_too(tmp_path, monkeypatch):
    """A small batch on a CPU shared with other work over-states the per-sample cost several times."""
    import pytest_advprune.estimate as est_module

    seen = []
    monkeypatch.setattr(est_module, "seconds_per_pass", lambda arch, dataset, batch, device, budget_s: seen.append(batch) or 1e-4)
    estimate(_session("smoke", ["lwm"], tmp_path), budget_s=0.05)
    assert seen == [presets.SMOKE.dense_train.batch_size]


def test_empty_cache_projects_everything_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    est = estimate(_session("smoke", ["hydra", "lwm"], cache), budget_s=0.05)
    assert not cache.exists()
    names = [p.name for p in est.phases]
    assert names == ["dense pretraining", "prune + fine-tune", "evaluation"]
    assert est.todo_h == pytest.approx(est.total_h) and est.total_h > 0
    dense, prune, evaluation = est.phases
    assert dense.passes == train_passes(presets.SMOKE.dense_train, 3000)
    # hydra: weights only (its filters cell is skipped); lwm: weights and filters; both prune after training
    assert prune.passes == 3 * train_passes(presets.SMOKE.finetune.with_(epochs=2), 3000)
    assert (dense.cached, prune.cached, evaluation.cached) == ("no", "0 of 3", "0 of 3")
    text = est.render()
    assert "1 cell(s) the methods do not support" in text and text.splitlines()[-1].startswith("projected:")


def test_before_training_methods_spend_the_whole_budget(tmp_path):
    est = estimate(_session("smoke", ["rst"], tmp_path), budget_s=0.05)
    budget = presets.SMOKE.dense_train.epochs + presets.SMOKE.prune_train.epochs + presets.SMOKE.finetune.epochs
    assert est.phases[1].passes == train_passes(presets.SMOKE.finetune.with_(epochs=budget), 3000)  # one cell


def test_cached_work_is_reported_and_not_counted(dense_cache):
    est = estimate(_session("smoke", ["dense"], dense_cache), budget_s=0.05)
    dense, prune, evaluation = est.phases
    assert dense.cached == "yes" and dense.todo_passes == 0
    assert prune.passes == 0  # the dense reference trains nothing of its own
    assert evaluation.cached == "1 of 1" and est.todo_h == 0


def test_survey_preset_on_cpu_is_projected_with_a_note(tmp_path):
    est = estimate(_session("cifar10", ["lwm"], tmp_path), budget_s=0.01, batch=1)
    assert {p.arch for p in est.phases} == {"resnet18", "vgg16"}
    assert est.phases[0].passes == train_passes(presets.PRESETS["cifar10"].dense_train, TRAIN_SIZES["cifar10"])
    assert est.per_cell_h() > 0
    assert any("needs a GPU" in n for n in est.notes)


# ------------------------------------------------------------------ the option


def test_estimate_option_prints_the_projection_and_trains_nothing(advprune, tmp_path):
    cache = tmp_path / "empty-cache"
    result = advprune.inprocess("--advprune-method=lwm", "--advprune-estimate", f"--advprune-cache-dir={cache}",
                                cache=False)
    out = result.stdout.str()
    assert result.ret == 0, out
    assert "advprune estimate: preset smoke, methods lwm, device cpu" in out
    assert "dense pretraining" in out and "prune + fine-tune" in out and "evaluation" in out
    assert "projected:" in out and "device-hours" in out
    assert not cache.exists() or not any(cache.rglob("*"))
    assert not advprune.report_md.parent.exists()  # no report, no test run


def test_estimate_writes_no_report_so_a_report_of_another_preset_does_not_stop_it(advprune, tmp_path):
    advprune.report_json.parent.mkdir(parents=True, exist_ok=True)
    advprune.report_json.write_text(json.dumps({"schema": 1, "preset": "quick", "records": []}))
    result = advprune.inprocess("--advprune-method=lwm", "--advprune-estimate", f"--advprune-cache-dir={tmp_path / 'c'}",
                                cache=False)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()


def test_estimate_without_method_is_a_usage_error(advprune):
    result = advprune.inprocess("--advprune-estimate")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--advprune-estimate projects a grid of methods" in result.stderr.str()
