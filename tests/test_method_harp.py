"""HARP's core steps: straight-through rate gradient, bounded keep rates, dynamic gamma, score/rate-only
search, learned non-uniform layer rates under one global budget met exactly, plain exported model."""

import dataclasses

import pytest
import torch

from pytest_advprune import sparsity
from pytest_advprune.sparsity import scaled_score_init
from pytest_advprune.methods.harp import (
    DynamicGamma,
    Harp,
    RateMask,
    channel_score_init,
    fit_budget,
    keep_rate,
    kept_fraction,
    rate_logit,
)
from tests.method_helpers import tiny_context


@pytest.mark.parametrize("structure", ["weights", "channels"])
def test_ste_gives_scores_the_mask_gradient_and_the_rate_its_sum(structure):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 4, 3)
    init = scaled_score_init if structure == "weights" else channel_score_init
    rm = RateMask(init(layer), structure, k_init=0.5, k_min=0.05)
    w = layer.weight.detach()
    c = torch.randn_like(w)
    (rm(w) * c).sum().backward()
    g = w * c  # dL/dmask, weight-shaped
    g_units = g if structure == "weights" else sparsity.unit_view(g, "channels").sum(dim=1)
    # identity through the top-k of |s|, chained through the abs
    assert torch.allclose(rm.scores.grad, rm.scores.detach().sign() * g_units)
    k = torch.sigmoid(rm.rate.detach())
    dk_dr = k * (1 - k) * (1 - rm.k_min)
    assert torch.allclose(rm.rate.grad, g.sum() * dk_dr, rtol=1e-4)
    assert int(rm.unit_mask().sum()) == round(0.5 * rm.units)


def test_mask_follows_a_changed_rate():
    rm = RateMask(scaled_score_init(torch.nn.Linear(20, 10)), "weights", k_init=0.5, k_min=0.05)
    assert int(rm.unit_mask().sum()) == 100
    with torch.no_grad():
        rm.rate.copy_(rate_logit(0.2, 0.05))
    assert int(rm.unit_mask().sum()) == 40


def test_keep_rate_never_falls_below_k_min_and_inverts():
    k = keep_rate(torch.tensor([-1e4, -30.0, 0.0, 30.0]), 0.01)
    assert bool((k >= torch.tensor(0.01)).all()) and float(k[0]) == pytest.approx(0.01)
    assert float(k[-1]) == pytest.approx(1.0)
    for target in (0.5, 0.1, 0.01):
        assert float(keep_rate(rate_logit(target, 0.1 * target), 0.1 * target)) == pytest.approx(target, rel=1e-5)


def test_dynamic_gamma_grows_while_the_budget_is_unmet_and_freezes_once_met():
    gamma = DynamicGamma(0.5, periods=10)
    seen = []
    for step in range(1, 31):  # three periods over budget
        gamma.update(step, 100, hw=0.2)
        seen.append(gamma.value)
    assert seen[0] == 0.5 and seen[9] == 1.0 and seen[-1] == 2.0
    for step in range(31, 40):  # met mid-period, missed again at its end: only a period's end counts
        gamma.update(step, 100, hw=0.0)
    gamma.update(40, 100, hw=0.1)
    assert gamma.frozen is None and gamma.value == 2.5
    gamma.update(50, 100, hw=0.0)
    assert gamma.frozen == 2.5  # the value used in the period that met the budget
    for step in range(51, 101):
        gamma.update(step, 100, hw=0.3)
    assert gamma.value == 2.5
    never = DynamicGamma(0.5, periods=10)
    for step in range(1, 101):
        never.update(step, 100, hw=1.0)
    assert never.frozen is None and never.value == 5.0  # the last period's gamma


def test_fit_budget_hits_the_budget_exactly_within_floors_and_sizes():
    sizes, floors = [100, 1000, 50], [1, 10, 1]
    over = fit_budget([60, 200, 40], floors, sizes, budget=150)
    assert sum(over) == 150 and all(f <= n <= c for f, n, c in zip(floors, over, [60, 200, 40]))
    under = fit_budget([10, 60, 5], floors, sizes, budget=150)
    assert sum(under) == 150 and all(c <= n <= s for c, n, s in zip([10, 60, 5], under, sizes))
    assert fit_budget([10, 130, 10], floors, sizes, budget=150) == [10, 130, 10]


def _with_prune_lr(ctx, lr):
    # A large lr so the tiny context's 4 steps move the rates past the rounding of the counts.
    ctx.preset = dataclasses.replace(ctx.preset, prune_train=ctx.preset.prune_train.with_(lr=lr))
    return ctx


def test_search_trains_scores_and_rates_only_and_learns_different_rates():
    ctx = _with_prune_lr(tiny_context(sparsity=0.9), 1.0)
    dense = {k: v.clone() for k, v in ctx.dense.state_dict().items()}
    train, seen = ctx.train, {}

    def spy(model, spec, desc, **kwargs):
        if "search" in desc:
            masks = {n: layer.parametrizations.weight[0] for n, layer in sparsity.prunable_layers(model).items()}
            before = {n: (rm.scores.detach().clone(), float(rm.rate.detach())) for n, rm in masks.items()}
            losses = train(model, spec, desc, **kwargs)
            seen["rates"] = [float(rm.keep().detach()) for rm in masks.values()]
            seen["kept"] = float(kept_fraction(masks).detach())
            for name, layer in sparsity.prunable_layers(model).items():
                assert torch.equal(layer.parametrizations.weight.original, dense[f"{name}.weight"]), name
                assert torch.equal(layer.bias, dense[f"{name}.bias"]), name
                assert not torch.equal(masks[name].scores, before[name][0]), f"{name}: scores did not move"
                assert float(masks[name].rate.detach()) != before[name][1], f"{name}: rate did not move"
            return losses
        return train(model, spec, desc, **kwargs)

    ctx.train = spy
    Harp().prune(ctx)
    assert len(set(seen["rates"])) == len(seen["rates"]), "layers did not learn their own rates"
    assert round(seen["kept"] / 0.1 - 1, 4) <= 0, "the phase ended over the budget (L_hw > 0)"


def test_prune_meets_the_global_weight_target_with_non_uniform_layers_and_leaves_a_plain_model():
    ctx = _with_prune_lr(tiny_context(sparsity=0.9), 1.0)
    logs = []
    ctx.log = logs.append
    model = Harp().prune(ctx)
    report = sparsity.measure(model, "weights")
    assert abs(report.n_zero_weights - 0.9 * report.n_weights) <= 1
    # Away from the uniform allocation by more than rounding and the budget fit (a unit or two per layer).
    off_uniform = [abs(zeros - round(0.9 * total)) for zeros, total in report.per_layer.values()]
    assert max(off_uniform) > 3, f"per-layer sparsities are uniform: {report.per_layer}"
    assert any("learned layer sparsities" in line for line in logs)
    state = sparsity.dense_state_dict(model)
    assert set(state) == set(tiny_context().dense.state_dict())


def test_prune_zeroes_whole_channels_to_the_global_channel_target():
    ctx = tiny_context(structure="channels", sparsity=0.5)
    model = Harp().prune(ctx)
    report = sparsity.measure(model, "channels")
    assert report.sparsity >= 0.5 - 0.01
    zero_units = sum(z for z, _ in report.per_layer.values())
    assert zero_units == round(0.5 * sum(t for _, t in report.per_layer.values()))
    for name, layer in sparsity.structured_layers(model, "channels").items():
        units = sparsity.unit_view(layer.weight.detach(), "channels")
        zero = units == 0
        assert torch.equal(zero.any(dim=1), zero.all(dim=1)), f"{name}: a channel is only partly zero"
    assert int((model.conv1.weight == 0).sum()) == 0, "the first conv's input channels are not pruned"
    assert not any("parametrizations" in k for k in sparsity.dense_state_dict(model))
