"""benchmarks/unpruned_control.py on the smoke preset: a method's recipe at sparsity 0 beside the dense model."""

import json
import shutil

import pytest

from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("unpruned_control")


def test_control_runs_the_method_at_sparsity_zero_beside_the_dense_model(dense_cache, tmp_path, capsys):
    cache = shutil.copytree(dense_cache, tmp_path / "cache")  # the shared warm cache stays as it is
    assert _script().main(["--method", "lwm", "--preset", "smoke", "--cache-dir", str(cache), "--device", "cpu",
                           "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "unpruned_control_lwm_smoke.json").read_text())
    assert record["control_sparsity"] == 0.0 and record["control_structure"] == "weights"
    assert set(record["accuracy"]) == {"dense", "lwm at 0% (weights)"}
    assert record["control_budget_epochs"]["method"] > 0 and record["versions"]["torch"]
    assert any(k.startswith("FMN") for k in record["control_attacks"]) or "PGD-20" in record["control_attacks"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("control robust - dense robust: ")


def test_control_refuses_a_method_that_prunes_regardless_of_its_target(dense_cache, tmp_path, monkeypatch):
    from pytest_advprune import registry
    from pytest_advprune.sparsity import make_masks

    registry.load_builtin()
    cls = registry.get("lwm")

    def prune_half(self, ctx):
        for name, mask in make_masks(ctx.dense, "weights", 0.5).items():
            ctx.dense.get_submodule(name).weight.data *= mask
        return ctx.dense

    monkeypatch.setattr(cls, "prune", prune_half)
    cache = shutil.copytree(dense_cache, tmp_path / "cache")
    with pytest.raises(SystemExit, match="lwm at sparsity 0 left 50.0% of the weights at zero"):
        _script().main(["--method", "lwm", "--preset", "smoke", "--cache-dir", str(cache), "--device", "cpu",
                        "--out", str(tmp_path)])


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "dense"], "dense prunes nothing"),
    (["--method", "lwm", "--cells", "foo"], "--cells: 'foo' is not STRUCTURE-SPARSITY"),
    (["--method", "hydra", "--cells", "filters-50"], "--cells: 'filters-50' is not STRUCTURE-SPARSITY with a structure "
                                                     "of this method (weights)"),
    (["--method", "lwm", "--preset", "nope"], "unknown preset 'nope'"),
    (["--method", "lwm", "--methods-dir", "/nonexistent"], "not a folder"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("unpruned_control", args, tmp_path)
