"""ADMM pruning state (R-ADMM, PwoA): projection, penalty, dual update, rho schedule, hard prune."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pytest_advprune import models, sparsity
from pytest_advprune.admm import ADMM, MAX_LR_RHO, rho_for_budget


def _model(seed=0):
    return models.build("cnn", "fashion_mnist", seed)


@settings(max_examples=10)
@given(target=st.floats(0.0, 0.99), seed=st.integers(0, 5))
def test_projection_keeps_exactly_k_largest_magnitudes_per_layer(target, seed):
    model = _model()
    admm = ADMM(model, "weights", target, rho=1e-3)
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(m.weight.shape, generator=gen) for n, m in admm.layers.items()}
    projected = admm.project(tensors)
    for n, t in tensors.items():
        kept = projected[n] != 0
        assert int((~kept).sum()) == round(target * t.numel()), n
        assert torch.equal(projected[n][kept], t[kept]), "the projection must not rescale kept entries"
        if kept.any() and (~kept).any():
            assert t[kept].abs().min() >= t[~kept].abs().max(), f"{n}: a smaller entry was kept over a larger one"


def test_structured_projection_zeros_whole_filters_by_l2_norm():
    model = _model()
    admm = ADMM(model, "filters", 0.5, rho=1e-3)
    for n, z in admm.Z.items():
        rows = z.flatten(1)
        zero = (rows == 0).all(dim=1)
        assert int(zero.sum()) == round(0.5 * rows.shape[0]), n
        norms = admm.layers[n].weight.detach().flatten(1).norm(dim=1)
        assert norms[~zero].min() >= norms[zero].max()


def test_starts_at_the_projection_of_w_with_zero_dual():
    model = _model()
    admm = ADMM(model, "weights", 0.9, rho=1e-3)
    projected = admm.project({n: m.weight.detach() for n, m in admm.layers.items()})
    for n in admm.layers:
        assert torch.equal(admm.Z[n], projected[n])
        assert not admm.U[n].any()


def test_penalty_gradient_is_rho_times_w_minus_z_plus_u():
    model = _model()
    admm = ADMM(model, "weights", 0.8, rho=0.3)
    for u in admm.U.values():
        u.normal_()
    admm.penalty().backward()
    for n, m in admm.layers.items():
        expected = 0.3 * (m.weight.detach() - admm.Z[n] + admm.U[n])
        assert torch.allclose(m.weight.grad, expected, atol=1e-6), n


def test_dual_update_and_rho_growth():
    model = _model()
    admm = ADMM(model, "weights", 0.8, rho=0.1, growth=1.3)
    with torch.no_grad():
        for m in admm.layers.values():
            m.weight.add_(0.01)
    admm.update()  # a non-zero dual for the update under test
    with torch.no_grad():
        for m in admm.layers.values():
            m.weight.add_(0.01)
    w = {n: m.weight.detach().clone() for n, m in admm.layers.items()}
    u_before, rho_before = {n: u.clone() for n, u in admm.U.items()}, admm.rho
    assert any(u.abs().sum() > 0 for u in u_before.values())
    admm.update()
    for n in w:
        assert torch.equal(admm.Z[n], admm.project({n: w[n] + u_before[n]} | {k: w[k] for k in w if k != n})[n])
        # unscaled dual y = rho * U: y <- y + rho (W - Z), then rho grows and U = y / rho
        assert torch.allclose(admm.rho * admm.U[n], rho_before * (u_before[n] + w[n] - admm.Z[n]), atol=1e-7)
    assert admm.rho == pytest.approx(0.1 * 1.3**2)


def test_minimising_the_penalty_with_updates_reaches_the_sparse_set():
    # ADMM on the penalty alone (L = 0): W is pulled to Z, dual updates close the gap, so the
    # primal residual falls toward 0 (feasibility), from its starting value.
    model = _model()
    admm = ADMM(model, "weights", 0.9, rho=1.0, growth=1.0)
    params = [m.weight for m in admm.layers.values()]
    opt = torch.optim.SGD(params, lr=0.1)
    residuals = []
    for _ in range(20):
        for _ in range(20):
            opt.zero_grad()
            admm.penalty().backward()
            opt.step()
        admm.update()
        residuals.append(admm.primal_residual())
    assert residuals[-1] < 1e-3 < residuals[0], residuals
    masks = admm.hard_prune_masks()
    for n, m in admm.layers.items():
        assert torch.allclose(m.weight.detach() * masks[n], m.weight.detach(), atol=1e-3), "W is not sparse at the end"


def test_hard_prune_masks_meet_the_target_in_every_layer():
    model = _model()
    masks = ADMM(model, "weights", 0.95, rho=1e-3).hard_prune_masks()
    for n, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.95 * mask.numel()), n


def test_rho_for_budget_reproduces_the_total_pull():
    lr, steps, updates, growth = 0.05, 470, 10, 1.3
    rho = rho_for_budget(1.2, lr, steps, updates, growth)
    pull = sum(rho * growth**k * lr / 2 * steps / updates for k in range(updates))
    assert pull == pytest.approx(1.2)


def test_rho_for_budget_is_capped_for_stability_on_tiny_budgets():
    lr, updates, growth = 0.05, 10, 1.3
    rho = rho_for_budget(1.2, lr, steps=4, updates=updates, growth=growth)
    assert lr * rho * growth ** (updates - 1) == pytest.approx(MAX_LR_RHO)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(steps=0), dict(updates=0)])
def test_rho_for_budget_rejects_empty_budgets(bad):
    args = dict(total_pull=1.0, lr=0.05, steps=100, updates=4, growth=1.3) | bad
    with pytest.raises(ValueError, match="positive"):
        rho_for_budget(**args)


def test_counting_rule_layers_are_the_admm_layers():
    model = _model()
    assert list(ADMM(model, "weights", 0.5, 1e-3).layers) == list(sparsity.prunable_layers(model))
    assert list(ADMM(model, "filters", 0.5, 1e-3).layers) == list(sparsity.structured_layers(model, "filters"))
    assert math.isfinite(ADMM(model, "channels", 0.5, 1e-3).primal_residual())
