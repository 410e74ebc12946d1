"""The benchmark scripts' shared command-line pieces, and bad input to the scripts that have no test file
of their own (attack_subset, fmn_gap): a one-line SystemExit before anything is built."""

import json

import pytest

from pytest_advprune import presets
from tests.benchmark_helpers import exits_before_building, load_benchmark


def test_load_preset_returns_the_preset_or_exits_with_the_known_names():
    cli = load_benchmark("benchmark_cli")
    assert cli.load_preset("quick") is presets.QUICK
    with pytest.raises(SystemExit) as info:
        cli.load_preset("quik")
    assert "unknown preset 'quik'" in str(info.value) and "quick" in str(info.value).split("quik'", 1)[1]


@pytest.mark.parametrize("script, args, message", [
    ("attack_subset", ["--cell", "lwm-weights"], "--cell: 'lwm-weights' is not METHOD-STRUCTURE-SPARSITY"),
    ("attack_subset", ["--cell", "nosuch-weights-90"], "--cell: unknown method 'nosuch'"),
    ("attack_subset", ["--cell", "hydra-filters-50"], "--cell: 'hydra-filters-50': hydra gives weights, not 'filters'"),
    ("attack_subset", ["--preset", "nope"], "unknown preset 'nope'"),
    ("fmn_gap", ["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, script, args, message):
    assert message in exits_before_building(script, args, tmp_path)


def test_a_run_adds_its_records_to_those_of_earlier_runs_and_replaces_only_its_own(tmp_path):
    cli = load_benchmark("benchmark_cli")
    path = tmp_path / "training_attack_quick.json"
    earlier = [{"cell": "c", "recipe": "1/1", "seed": 0, "robust": 0.4}, {"cell": "c", "recipe": "1/5", "seed": 0, "robust": 0.4}]
    cli.write_records(path, {"preset": "old"}, earlier, ("cell", "recipe", "seed"))
    now = [{"cell": "c", "recipe": "1/5", "seed": 0, "robust": 0.5}, {"cell": "c", "recipe": "1/5", "seed": 1, "robust": 0.3}]
    assert cli.write_records(path, {"preset": "quick"}, now, ("cell", "recipe", "seed")) == [earlier[0], *now]
    assert json.loads(path.read_text()) == {"preset": "quick", "records": [earlier[0], *now]}
    assert not path.with_suffix(".tmp").exists()
    assert cli.write_records(tmp_path / "budget_scaling_quick.json", {}, now, ("cell", "scale")) == now  # no earlier file
