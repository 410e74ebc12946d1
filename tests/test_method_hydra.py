"""HYDRA's core steps: scaled score init, score-only search with frozen weights, per-layer top-k, fine-tune."""

import copy

import torch

from pytest_advprune.methods.hydra import Hydra
from pytest_advprune import sparsity
from pytest_advprune.sparsity import attach_score_masks, bake_score_masks, scaled_score_init
from tests.method_helpers import tiny_context


def test_scaled_score_init_is_proportional_to_the_weights():
    layer = torch.nn.Conv2d(3, 8, 3)
    s = scaled_score_init(layer)
    ratio = s / layer.weight.detach()
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    assert torch.isclose(s.abs().max(), torch.tensor((6 / 27) ** 0.5))


def test_score_search_changes_scores_only_and_keeps_per_layer_top_k():
    ctx = tiny_context(sparsity=0.8)
    model = ctx.dense
    before = copy.deepcopy(model.state_dict())
    scores = attach_score_masks(model, ctx.sparsity, init=scaled_score_init)
    initial = [s.detach().clone() for s in scores]
    ctx.train(model, ctx.preset.prune_train.with_(loss="trades"), "search", params=scores)
    assert any(not torch.equal(a, s) for a, s in zip(initial, scores)), "scores did not move"
    for name, layer in sparsity.prunable_layers(model).items():
        original = layer.parametrizations.weight.original
        assert torch.equal(original, before[f"{name}.weight"]), f"{name}: weights changed during score search"
    masks = bake_score_masks(model)
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.8 * mask.numel())


def test_prune_meets_the_target_in_every_layer_and_leaves_a_plain_model():
    ctx = tiny_context(sparsity=0.9)
    model = Hydra().prune(ctx)
    report = sparsity.measure(model, "weights")
    for name, (zeros, total) in report.per_layer.items():
        assert abs(zeros - 0.9 * total) <= 0.5 + 1e-9, name
    assert not any("parametrizations" in k or "scores" in k for k in sparsity.dense_state_dict(model))


def test_prune_search_is_driven_by_the_scores_not_plain_magnitude():
    # After the search, the kept set differs from one-shot magnitude pruning of the same weights:
    # the adversarial loss, not |w|, chose the mask.
    ctx = tiny_context(sparsity=0.9, epochs=2.0)
    dense = copy.deepcopy(ctx.dense)
    model = ctx.dense
    scores = attach_score_masks(model, ctx.sparsity, init=scaled_score_init)
    ctx.train(model, ctx.preset.prune_train.with_(loss="trades", lr=0.5), "search", params=scores)
    learned = bake_score_masks(model)
    magnitude = sparsity.make_masks(dense, "weights", 0.9)
    assert any(not torch.equal(learned[n], magnitude[n]) for n in learned)
