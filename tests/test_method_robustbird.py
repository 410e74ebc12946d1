"""Robust Bird's core steps: the Hamming mask distance, the early-bird stopping rule (on fake masks), the
search cap, and a prune that spends exactly the budget wherever the search stopped, keeps the searched
weights (no rewind) and meets the target with one global magnitude ranking."""

import copy

import pytest
import torch

from pytest_advprune import models, sparsity
from pytest_advprune.methods import robustbird
from pytest_advprune.methods.robustbird import RobustBird, early_bird_search, mask_distance, search_plan
from tests.method_helpers import tiny_context


def flipped(n_flips, size=100):
    """A fake flat mask: the first ``n_flips`` positions of an all-ones mask set to 0."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[:n_flips] = False
    return mask


def feed(masks):
    calls = []

    def next_mask(k):
        calls.append(k)
        return masks[k]

    return next_mask, calls


def test_mask_distance_is_the_fraction_of_differing_positions():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert mask_distance(a, torch.tensor([1, 0, 0, 1], dtype=torch.bool)) == 0.5
    assert mask_distance(a, a) == 0.0
    assert mask_distance(flipped(3), flipped(10)) == pytest.approx(0.07)


def test_search_stops_at_the_first_check_whose_window_is_within_the_threshold():
    # Distances of the newest mask to the two before it, from the 3rd check on: (0.2, 0.1), (0.18, 0.08),
    # (0.09, 0.01): one above 0.08, so go on; then (0.06, 0.07): stop there, not after.
    masks = [flipped(n) for n in (30, 20, 10, 2, 1, 8, 8, 8)]
    next_mask, calls = feed(masks)
    assert early_bird_search(next_mask, max_checks=8, keep=3, threshold=0.08) == 6
    assert calls == [0, 1, 2, 3, 4, 5], "no training after the early bird is found"


def test_search_threshold_is_inclusive_and_needs_a_full_window():
    # 1 of 8 positions differs: distance exactly 0.125.
    next_mask, calls = feed([flipped(0, 8), flipped(1, 8), flipped(1, 8)])
    assert early_bird_search(next_mask, max_checks=3, keep=2, threshold=0.125) == 2
    next_mask, _ = feed([flipped(0, 8), flipped(2, 8), flipped(2, 8), flipped(2, 8)])
    assert early_bird_search(next_mask, max_checks=4, keep=2, threshold=0.125) == 3
    next_mask, calls = feed([flipped(0, 8)] * 5)
    assert early_bird_search(next_mask, max_checks=5, keep=4, threshold=0.1) == 4  # identical, but 4 are needed


def test_search_that_never_converges_stops_at_the_cap():
    next_mask, calls = feed([flipped(0 if k % 2 else 50) for k in range(20)])
    assert early_bird_search(next_mask, max_checks=7, keep=3, threshold=0.08) == 7
    assert len(calls) == 7


def test_search_plan_checks_every_half_epoch_on_quick_and_every_epoch_on_long_budgets():
    assert search_plan(7.0) == (0.5, 7)  # quick: 5 + 1 + 1 epochs, cap 3.5 epochs
    assert search_plan(220.0) == (1.0, 110)  # survey presets: 100 + 20 + 100


@pytest.mark.parametrize("threshold", [1.0, -1.0], ids=["stops-at-first-full-window", "never-converges"])
def test_prune_spends_the_budget_wherever_the_search_stops(monkeypatch, threshold):
    ctx = tiny_context(sparsity=0.9)
    real_search = robustbird.early_bird_search
    monkeypatch.setattr(robustbird, "early_bird_search", lambda *a, **kw: real_search(*a, **kw, threshold=threshold))
    calls, real_train = [], ctx.train

    def spy(model, spec, desc, **kw):
        calls.append((desc, spec.epochs, copy.deepcopy(model.state_dict()), kw.get("masks")))
        return real_train(model, spec, desc, **kw)

    monkeypatch.setattr(ctx, "train", spy)
    model = RobustBird().prune(ctx)
    interval, max_checks = search_plan(ctx.budget_epochs)
    searches = calls[:-1]
    assert len(searches) == (robustbird.KEEP if threshold > 0 else max_checks)
    assert calls[-1][1] == pytest.approx(ctx.budget_epochs - len(searches) * interval)
    assert ctx.budget() == pytest.approx({"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs})

    _, _, start, masks = calls[-1]
    init = models.build("cnn", "fashion_mnist", ctx.seed).state_dict()
    assert not torch.equal(start["fc1.weight"], init["fc1.weight"]), "the sparse phase must start from the searched weights"
    assert masks is not None and all((model.get_submodule(n).weight[m == 0] == 0).all() for n, m in masks.items())
    report = sparsity.measure(model, "weights")
    assert abs(report.n_zero_weights - 0.9 * report.n_weights) <= 1
    zeros = {n: z / t for n, (z, t) in report.per_layer.items()}
    assert zeros["fc1"] > zeros["conv1"] + 0.1, "one global ranking, not the same fraction per layer"
    assert not any("parametrizations" in k for k in sparsity.dense_state_dict(model))
