"""benchmarks/mad_ranking.py: MAD's saliency under other rankings, on the smoke preset."""

import json
import shutil

import pytest
import torch
from torch import nn

from pytest_advprune import presets, registry
from tests.benchmark_helpers import exits_before_building, load_benchmark


def _script():
    return load_benchmark("mad_ranking")


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 4, 3), nn.Linear(4, 3)


def test_rankings_change_the_conv_masks_only_and_keep_the_layers_counts():
    registry.load_builtin()
    import importlib
    mad = importlib.import_module(registry.get("mad").__module__)
    model = TwoConv()
    torch.manual_seed(0)
    # conv1's saliencies are all below conv2's: the global ranking empties it to its one guarded weight
    saliency = {"conv1": -torch.rand(2, 1, 3, 3), "conv2": torch.rand(4, 2, 3, 3), "fc": torch.rand(3, 4)}
    repo = _script().ranking_masks(mad, model, saliency, 0.5, "repo")
    assert int(repo["conv1"].sum()) == 1
    for ranking in ("local", "abs", "magnitude-conv"):
        masks = _script().ranking_masks(mad, model, saliency, 0.5, ranking)
        assert int(masks["conv1"].sum()) == 9 and int(masks["conv2"].sum()) == 36
        assert torch.equal(masks["fc"], repo["fc"])
    local, absolute = (_script().ranking_masks(mad, model, saliency, 0.5, r)["conv1"] for r in ("local", "abs"))
    assert torch.equal(local.bool(), saliency["conv1"] >= saliency["conv1"].flatten().sort().values[9])
    assert torch.equal(absolute.bool(), ~local.bool())  # all negative: magnitude keeps the other half
    mag = _script().ranking_masks(mad, model, saliency, 0.5, "magnitude-conv")["conv2"]
    w = model.conv2.weight.detach().abs()
    assert w[mag.bool()].min() >= w[~mag.bool()].max()


def test_each_ranking_is_fine_tuned_and_scored_on_the_smoke_preset(dense_cache, tmp_path, capsys):
    cache = shutil.copytree(dense_cache, tmp_path / "cache")
    assert _script().main(["--preset", "smoke", "--rankings", "repo,local", "--cache-dir", str(cache),
                           "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "mad_ranking_smoke.json").read_text())
    repo, local = doc["records"]
    assert (repo["ranking"], local["ranking"]) == ("repo", "local") and repo["n_points"] == presets.SMOKE.n_eval
    total = sum(repo["kept"].values())
    assert total == sum(local["kept"].values()) and repo["kept"]["fc2"] == local["kept"]["fc2"]
    assert local["kept"]["conv1"] == round(0.1 * 144) and repo["kept"] != local["kept"]
    assert len(repo["finetune_losses"]) == presets.SMOKE.finetune.epochs and repo["versions"]["torch"]
    assert set(repo["saliency_shares"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("clean / PGD-5 (%) at 90% weights: repo ")


@pytest.mark.parametrize("args, message", [
    (["--rankings", "global"], "--rankings: 'global' is not one of repo, local, abs, magnitude-conv"),
    (["--sparsity", "100"], "--sparsity: 100 is not a percentage in 1-99"),
    (["--finetune-epochs", "0"], "--finetune-epochs: 0 is not in (0, 50]"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_is_one_line_before_anything_is_built(tmp_path, args, message):
    assert message in exits_before_building("mad_ranking", args, tmp_path)
