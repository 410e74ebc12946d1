"""Li20's core steps: the mask from the per-layer-normalised global magnitude ranking, the rewind to the
original init, FGSM then PGD phases that spend exactly the budget, exact sparsity, a plain model."""

import copy

import pytest
import torch

from pytest_advprune import models, presets, sparsity
from pytest_advprune.methods import li20
from pytest_advprune.methods.li20 import Li20, normalised_magnitude_masks, phase_specs, rewind
from tests.method_helpers import tiny_context


def _model(seed=0):
    return models.build("cnn", "fashion_mnist", seed)


def test_normalised_ranking_ignores_a_layer_wide_scale_and_keeps_a_small_layer_alive():
    model = _model()
    small = copy.deepcopy(model)
    with torch.no_grad():
        small.conv2.weight.mul_(1e-3)  # uniformly small weights
    normalised = normalised_magnitude_masks(small, 0.9)
    assert all(torch.equal(normalised[n], m) for n, m in normalised_magnitude_masks(model, 0.9).items())
    assert normalised["conv2"].sum() > 0.05 * normalised["conv2"].numel()
    plain = sparsity.make_masks(small, "weights", 0.9, scope="global")
    assert plain["conv2"].sum() == 0, "without the normalisation the small layer is wiped out"


def test_normalised_ranking_is_one_global_ranking_that_prunes_exactly_the_target():
    model = _model()
    with torch.no_grad():
        model.conv2.weight.pow_(5)  # spiky: most weights far below the layer's mean |w|, a few far above
    masks = normalised_magnitude_masks(model, 0.5)
    total = sum(m.numel() for m in masks.values())
    assert set(masks) == set(sparsity.prunable_layers(model))  # first conv and last linear included
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.5 * total)
    assert (masks["conv2"] == 0).float().mean() > 0.6, "a global ranking prunes the spiky layer harder"


def test_rewind_restores_the_init_on_survivors_and_zeros_the_rest():
    model = _model()
    theta0 = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # stands for FGSM training
    masks = normalised_magnitude_masks(model, 0.8)
    rewind(model, theta0, masks)
    for name, layer in sparsity.prunable_layers(model).items():
        keep = masks[name].bool()
        assert torch.equal(layer.weight[keep], theta0[f"{name}.weight"][keep])
        assert (layer.weight[~keep] == 0).all()
        assert torch.equal(layer.bias, theta0[f"{name}.bias"])


def test_phases_are_fgsm_then_the_presets_pgd_and_add_up_to_the_budget():
    dense_train = presets.get("cifar10").dense_train  # PGD-10
    search, ticket = phase_specs(dense_train, 220.0)
    assert (search.attack_steps, search.step_size) == (1, 1.25)
    assert ticket == dense_train.with_(epochs=ticket.epochs)
    assert search.epochs + ticket.epochs == pytest.approx(220.0)
    assert search.epochs == pytest.approx(220.0 * 2 / 7)


def test_prune_rewinds_to_the_fresh_init_spends_the_budget_and_meets_the_target(monkeypatch):
    ctx = tiny_context(sparsity=0.9)
    seen = {}

    def spy(model, theta0, masks):
        seen["theta0"], seen["masks"] = theta0, masks
        rewind(model, theta0, masks)

    monkeypatch.setattr(li20, "rewind", spy)
    model = Li20().prune(ctx)
    init = _model(ctx.seed).state_dict()
    assert all(torch.equal(seen["theta0"][k], v) for k, v in init.items()), "rewind must go to the original init"
    assert ctx.budget() == pytest.approx({"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs})
    report = sparsity.measure(model, "weights")
    assert abs(report.n_zero_weights - 0.9 * report.n_weights) <= 1
    for name, layer in sparsity.prunable_layers(model).items():
        assert (layer.weight[seen["masks"][name] == 0] == 0).all(), name
    assert not any("parametrizations" in k for k in sparsity.dense_state_dict(model))
