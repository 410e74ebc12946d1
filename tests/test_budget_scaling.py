"""benchmarks/budget_scaling.py on the smoke preset: one cell built under two budget scales."""

import json
import shutil

import pytest

from pytest_advprune import presets
from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("budget_scaling")


def test_a_scale_multiplies_the_two_phases_epochs_and_nothing_else():
    q = presets.QUICK
    v = _script().with_scale(q, 1.5, 4.5)
    assert v.prune_train.epochs == 1.5 * q.prune_train.epochs and v.finetune.epochs == 4.5 * q.finetune.epochs
    assert v.prune_train.with_(epochs=q.prune_train.epochs) == q.prune_train
    assert v.finetune.with_(epochs=q.finetune.epochs) == q.finetune
    assert v.dense_train == q.dense_train and v.floors == q.floors and v.name == q.name and v.seed == q.seed
    assert _script().with_scale(q, 1, 1) == q
    assert _script().scale("1.5x4.5") == (1.5, 4.5) and _script().label((1.0, 4.5)) == "1x4.5"


def test_each_scale_builds_its_own_model_and_judges_it_against_the_floors(dense_cache, tmp_path, capsys):
    cache = shutil.copytree(dense_cache, tmp_path / "cache")  # the shared warm cache stays as it is
    assert _script().main(["--cells", "hydra-weights-90", "--scales", "1x1,2x2", "--preset", "smoke",
                           "--cache-dir", str(cache), "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "budget_scaling_smoke.json").read_text())
    one, two = doc["records"]
    assert (one["scale"], two["scale"]) == ("1x1", "2x2") and one["preset_scale"] and not two["preset_scale"]
    assert one["pruned_key"] != two["pruned_key"]  # a scale that was not applied would reuse the model
    smoke = presets.SMOKE
    assert one["budget"]["method"] == smoke.prune_train.epochs + smoke.finetune.epochs
    assert two["budget"]["method"] == 2 * (smoke.prune_train.epochs + smoke.finetune.epochs)  # HYDRA spends it all
    assert two["finetune"].split(" ep,")[0].endswith(f"{2 * smoke.finetune.epochs:g}")
    for r in (one, two):
        assert r["verdicts"]["sparsity"] is True and r["n_points"] == smoke.n_eval
        assert r["meets_floors"] == (r["clean"] >= r["floors"]["clean"] and r["robust"] >= r["floors"]["robust"])
        assert r["versions"]["torch"] and r["device"] == "cpu"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"cells meeting every floor per scale: 1x1 {int(one['meets_floors'])} of 1, " \
                   f"2x2 {int(two['meets_floors'])} of 1"




@pytest.mark.parametrize("args, message", [
    (["--scales", "2"], "--scales: '2' is not PxF"),
    (["--scales", "1x0"], "--scales: '1x0' is not PxF"),
    (["--scales", "1xnan"], "--scales: '1xnan' is not PxF"),
    (["--scales", "1x51"], "--scales: '1x51' is not PxF"),
    (["--cells", "nosuch-weights-90"], "--cells: unknown method 'nosuch'"),
    (["--cells", "mad-filters-50"], "--cells: 'mad-filters-50': mad gives weights, not 'filters'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("budget_scaling", args, tmp_path)
