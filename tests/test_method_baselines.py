"""Core steps of the baselines: lwm (layer-wise magnitude, iterative), random (random mask), dense."""

import pytest
import torch

from pytest_advprune.methods.dense import Dense
from pytest_advprune.methods.lwm import LayerwiseMagnitude
from pytest_advprune.methods.random_mask import RandomPruning
from pytest_advprune import sparsity
from tests.method_helpers import tiny_context


def test_lwm_prunes_the_lowest_magnitudes_of_each_layer():
    ctx = tiny_context(sparsity=0.75)
    dense = {n: m.weight.detach().clone() for n, m in sparsity.prunable_layers(ctx.dense).items()}
    model = LayerwiseMagnitude().prune(ctx)
    for name, layer in sparsity.prunable_layers(model).items():
        kept = layer.weight != 0
        assert abs(int((~kept).sum()) - 0.75 * kept.numel()) <= 0.5 + 1e-9
        # the first round removes the smallest dense weights: none of the smallest 10% survives
        smallest = dense[name].abs().flatten().argsort()[: max(1, kept.numel() // 10)]
        assert not kept.flatten()[smallest].any(), name


def test_lwm_filters_zero_whole_filters():
    ctx = tiny_context(structure="filters", sparsity=0.5)
    model = LayerwiseMagnitude().prune(ctx)
    report = sparsity.measure(model, "filters")
    for name, (zeros, total) in report.per_layer.items():
        assert abs(zeros - 0.5 * total) <= 0.5, name


def test_random_mask_is_seeded_and_differs_from_magnitude():
    a = RandomPruning().prune(tiny_context(sparsity=0.9, epochs=0.25))
    b = RandomPruning().prune(tiny_context(sparsity=0.9, epochs=0.25))
    assert torch.equal(a.fc1.weight != 0, b.fc1.weight != 0)
    magnitude = sparsity.make_masks(tiny_context().dense, "weights", 0.9)["fc1"].bool()
    overlap = (magnitude & (a.fc1.weight != 0)).sum() / magnitude.sum()
    assert overlap < 0.3  # a random 10% keeps about 10% of the magnitude set, far from all of it
    assert abs(sparsity.measure(a, "weights").sparsity - 0.9) < 0.001


def test_dense_returns_the_model_untouched():
    ctx = tiny_context()
    before = {k: v.clone() for k, v in ctx.dense.state_dict().items()}
    model = Dense().prune(ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_budget_accounting_counts_every_training_epoch_and_the_pretraining():
    ctx = tiny_context(sparsity=0.75)
    LayerwiseMagnitude().prune(ctx)
    pre = ctx.preset.dense_train.epochs
    assert ctx.budget() == pytest.approx({"pretrain": pre, "method": ctx.preset.finetune.epochs,
                                          "total": pre + ctx.preset.finetune.epochs})
    assert ctx.budget_epochs == pre + ctx.preset.prune_train.epochs + ctx.preset.finetune.epochs


def test_a_method_trained_from_scratch_is_accounted_without_pretraining():
    ctx = tiny_context()
    with torch.no_grad():
        ctx.dense.fc1.weight.add_(1.0)  # stands for pretraining
    model = ctx.fresh_model()
    assert model is not ctx.dense and not torch.equal(model.fc1.weight, ctx.dense.fc1.weight)
    assert torch.equal(model.fc1.weight, ctx.fresh_model().fc1.weight), "the fresh model must be seeded"
    ctx.train(model, ctx.preset.prune_train.with_(epochs=0.5), "scratch")
    assert ctx.budget() == {"pretrain": 0.0, "method": 0.5, "total": 0.5}
