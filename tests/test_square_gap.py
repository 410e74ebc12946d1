"""benchmarks/square_gap.py: the white-box runs on the points only Square broke, the cells it picks, bad input."""

import json
import pytest
import torch
from torch import nn

from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("square_gap")


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("label, attack, settings", _script().RUNS)
def test_every_white_box_run_breaks_a_linear_model_in_the_whole_box_and_nothing_at_tiny_eps(label, attack, settings):
    model = _Linear().eval()
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)  # every point correct clean
    run = _script().broken_by
    assert run(model, x, y, 1.0, attack, settings, 0, torch.device("cpu")).all(), label
    assert not run(model, x, y, 1e-6, attack, settings, 0, torch.device("cpu")).any(), label


def test_failed_cells_are_the_reports_black_box_failures_of_the_preset(tmp_path):
    def rec(method, preset, passed):
        return {"method": method, "preset": preset, "dataset": "fashion_mnist", "arch": "cnn", "structure": "weights",
                "target_sparsity": 0.99, "indicators": {"black_box": {"passed": passed}}}
    report = tmp_path / "quick.json"
    report.write_text(json.dumps({"records": [rec("hydra", "quick", False), rec("lwm", "quick", True),
                                              rec("radmm", "smoke", False), {**rec("dense", "quick", None), "indicators": None}]}))
    cells = _script()._failed_cells(report, "quick")
    assert [c.id for c in cells] == ["hydra-fashion_mnist-cnn-weights-99"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "smoke"], "preset smoke runs no Square attack"),
    (["--cell", "hydra-99"], "--cell: 'hydra-99' is not METHOD-STRUCTURE-SPARSITY"),
    (["--cell", "nosuch-weights-90"], "--cell: unknown method 'nosuch'"),
    (["--cell", "dense-dense-90"], "--cell: 'dense-dense-90': sparsity 0 is the dense cell's alone"),
    (["--cell", "hydra-filters-50"], "--cell: 'hydra-filters-50': hydra gives weights, not 'filters'"),
    (["--report", "/nonexistent/quick.json"], "no report /nonexistent/quick.json"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("square_gap", args, tmp_path)
    assert not list(tmp_path.glob("square_gap_*.json"))


def test_a_cell_is_analysed_from_the_suites_own_evaluation_and_written_to_json(dense_cache, tmp_path, monkeypatch, capsys):
    import dataclasses
    import shutil

    from pytest_advprune import presets
    from pytest_advprune.attacks import AutoAttackSpec

    # smoke with Square in its cascade: same dense model (its key has no preset name or attacks)
    square = dataclasses.replace(presets.SMOKE, name="smoke_square", autoattack=AutoAttackSpec(
        version="custom", attacks=("apgd-ce", "square"), apgd_iters=5, n_target_classes=1, square_queries=20))
    monkeypatch.setitem(presets.PRESETS, "smoke_square", square)
    cache = shutil.copytree(dense_cache, tmp_path / "cache")
    assert _script().main(["--preset", "smoke_square", "--cell", "dense-dense-0", "--cache-dir", str(cache),
                           "--device", "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "square_gap_smoke_square.json").read_text())
    entry = record["cells"]["dense-fashion_mnist-cnn-dense-0"]
    assert entry["of_points"] == presets.SMOKE.n_eval and record["versions"]["torch"]
    assert entry["broken_by_any_run"] <= entry["square_only_points"]
    assert len(entry["runs"]) == (len(_script().RUNS) if entry["square_only_points"] else 0)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("square_gap: the stronger white-box runs together break ") if entry["square_only_points"] \
        else last == "square_gap: Square broke no point beyond the white-box attacks in these cells"
