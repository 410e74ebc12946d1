"""benchmarks/training_attack.py on the smoke preset: one cell built under two training recipes."""

import json
import shutil

import pytest

from pytest_advprune import presets
from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("training_attack")


def test_a_recipe_sets_both_phases_inner_attack_and_nothing_else():
    q = presets.QUICK
    v = _script().with_recipe(q, 1, 4)
    assert (v.prune_train.attack_steps, v.prune_train.step_size) == (1, 1.25)
    assert (v.finetune.attack_steps, v.finetune.step_size) == (4, 2.5 / 4)
    assert _script().with_recipe(q, 1, 5).finetune == q.finetune  # quick's own recipe is 1/5
    assert v.dense_train == q.dense_train and v.autoattack == q.autoattack and v.name == q.name
    assert v.seed == q.seed and _script().with_recipe(q, 1, 4, seed=3).seed == 3
    assert v.finetune.epochs == q.finetune.epochs and v.prune_train.lr == q.prune_train.lr


def test_each_recipe_builds_its_own_model_and_reports_black_box(dense_cache, tmp_path, capsys):
    cache = shutil.copytree(dense_cache, tmp_path / "cache")  # the shared warm cache stays as it is
    assert _script().main(["--cells", "lwm-weights-90", "--recipes", "1/1,1/3", "--preset", "smoke",
                           "--cache-dir", str(cache), "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "training_attack_smoke.json").read_text())
    one, three = doc["records"]
    assert (one["recipe"], three["recipe"]) == ("1/1", "1/3")
    assert one["finetune"].startswith("FGSM-RS") and three["finetune"].startswith("PGD-3")
    assert one["preset_recipe"] and not three["preset_recipe"]
    assert one["pruned_key"] != three["pruned_key"]  # a recipe that was not applied would reuse the model
    assert one["black_box_ok"] is None and one["n_points"] == presets.SMOKE.n_eval  # smoke runs no Square
    assert one["versions"]["torch"] and one["device"] == "cpu"
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "black_box passes per recipe: 1/1 0 of 1, 1/3 0 of 1"




@pytest.mark.parametrize("args, message", [
    (["--recipes", "5"], "--recipes: '5' is not P/F"),
    (["--recipes", "1/0"], "--recipes: '1/0' is not P/F"),
    (["--cells", "nosuch-weights-90"], "--cells: unknown method 'nosuch'"),
    (["--cells", "hydra-filters-50"], "--cells: 'hydra-filters-50': hydra gives weights, not 'filters'"),
    (["--cells", "hydra-weights-100"], "is not METHOD-STRUCTURE-SPARSITY"),
    (["--cells", "dense-dense-0"], "--cells: 'dense-dense-0': dense gives no cell here, not 'dense'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--seeds", "0,x"], "--seeds: 'x' is not a non-negative integer"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("training_attack", args, tmp_path)
