"""benchmarks/arch_width.py: the widened CNN, a smoke run over two widths, and bad input."""

import dataclasses
import json
import shutil

import pytest
import torch

from pytest_advprune import models, presets
from pytest_advprune.sparsity import prunable_layers
from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("arch_width")


@pytest.fixture(autouse=True)
def _architectures(monkeypatch):
    """The script registers its widened CNNs for the process; here they must not outlive the test."""
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))


def test_a_width_multiplies_every_layer_of_the_cnn_and_nothing_else_of_the_preset():
    q = presets.QUICK
    assert _script().widened(q, 1) == q
    v = _script().widened(q, 2)
    assert v.archs == ("cnn_x2",) and dataclasses.replace(v, archs=q.archs) == q
    model = models.build("cnn_x2", q.dataset, q.seed)
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}
    assert shapes == {"conv1": (32, 1, 3, 3), "conv2": (64, 32, 3, 3), "fc1": (256, 64 * 7 * 7), "fc2": (10, 256)}
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_each_width_builds_its_own_dense_and_pruned_models_and_judges_them_against_the_floors(dense_cache, tmp_path, capsys):
    cache = shutil.copytree(dense_cache, tmp_path / "cache")  # the shared warm cache stays as it is
    assert _script().main(["--cells", "lwm-weights-90,dense-dense-0", "--widths", "1,2", "--preset", "smoke",
                           "--cache-dir", str(cache), "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "arch_width_smoke.json").read_text())
    by = {(r["cell"], r["width"]): r for r in doc["records"]}
    assert sorted(by) == [("dense-dense-0", 1), ("dense-dense-0", 2), ("lwm-weights-90", 1), ("lwm-weights-90", 2)]
    assert by["lwm-weights-90", 1]["arch"] == "cnn" and by["lwm-weights-90", 2]["arch"] == "cnn_x2"
    assert by["lwm-weights-90", 2]["weights"] > 3 * by["lwm-weights-90", 1]["weights"]
    assert by["lwm-weights-90", 1]["pruned_key"] != by["lwm-weights-90", 2]["pruned_key"]
    assert by["dense-dense-0", 1]["clean"] != by["dense-dense-0", 2]["clean"] or \
        by["dense-dense-0", 1]["robust"] != by["dense-dense-0", 2]["robust"]  # a width not applied reuses the model
    for r in doc["records"]:
        assert r["n_points"] == presets.SMOKE.n_eval and r["versions"]["torch"] and r["device"] == "cpu"
        assert r["meets_floors"] == all(r["verdicts"].values())
        assert ("sparsity" in r["verdicts"]) == (r["cell"] != "dense-dense-0")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "cells meeting every floor per width: " + ", ".join(
        f"x{w} {sum(by[c, w]['meets_floors'] for c in ('lwm-weights-90', 'dense-dense-0'))} of 2" for w in (1, 2))


@pytest.mark.parametrize("args, message", [
    (["--widths", "0"], "--widths: '0' is not one of 1, 2, 3, 4"),
    (["--widths", "1.5"], "--widths: '1.5' is not one of 1, 2, 3, 4"),
    (["--widths", "8"], "--widths: '8' is not one of 1, 2, 3, 4"),
    (["--cells", "nosuch-weights-90"], "--cells: unknown method 'nosuch'"),
    (["--cells", "mad-filters-50"], "--cells: 'mad-filters-50': mad gives weights, not 'filters'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "cifar10"], "--preset cifar10: its architecture is resnet18, not the SmallCNN"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("arch_width", args, tmp_path)
