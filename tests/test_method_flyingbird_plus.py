"""Flying Bird+'s additions to Flying Bird: the gap/loss decision rule, the extra prune and growth of
an update, the held-out validation slice, and the whole method's budget and sparsity."""

import math

import pytest
import torch

from pytest_advprune import dst, session, sparsity
from pytest_advprune.methods import flyingbird_plus as fbp
from pytest_advprune.methods.flyingbird_plus import FlyingBirdPlus, fbp_decision
from tests.method_helpers import tiny_context


@pytest.mark.parametrize("gaps, losses, expected", [
    ([0.10, 0.12, 0.15, 0.18, 0.20], [2.0, 1.9, 1.8, 1.7, 1.6], (True, False)),  # gap rises 4/4, loss falls
    ([0.20, 0.18, 0.15, 0.12, 0.10], [1.6, 1.7, 1.8, 1.9, 2.0], (False, True)),  # gap falls, loss rises
    ([0.10, 0.12, 0.11, 0.13, 0.12], [2.0, 2.0, 1.9, 1.9, 1.8], (True, True)),  # exactly half: >= threshold
    ([0.10, 0.12, 0.11, 0.10, 0.09], [2.0, 1.9, 1.8, 1.8, 1.7], (False, False)),  # 1/4 each
    ([0.10, 0.10, 0.10, 0.10, 0.10], [1.0, 1.0, 1.0, 1.0, 1.0], (False, True)),  # a flat gap is no rise; a flat loss is
    ([0.10], [1.0], (False, False)),  # no change recorded yet
])
def test_decision_rule(gaps, losses, expected):
    assert fbp_decision(gaps, losses) == expected


def test_decision_looks_only_at_the_last_four_changes():
    rising_then_falling = [0.0, 0.1, 0.2, 0.3, 0.4, 0.3, 0.2, 0.1]
    assert fbp_decision(rising_then_falling, [1.0] * 8) == (False, True)
    assert fbp_decision(rising_then_falling[:5], [1.0] * 5)[0] is True


def test_extra_prune_lowers_the_density_and_extra_growth_never_exceeds_the_quota():
    ctx = tiny_context(sparsity=0.9)
    topo = dst.DynamicSparsity(ctx.dense, 0.9, steps_per_epoch=4, seed=0)
    sparsity.apply_masks(ctx.dense, topo.masks)
    before = {n: int(m.sum()) for n, m in topo.masks.items()}
    removed, grown = topo.update(0.2, prune_ratio=fbp.PRUNE_RATIO)
    for n, mask in topo.masks.items():
        free = mask.numel() - before[n]
        death = min(math.ceil(0.2 * before[n]), free)
        extra = min(math.ceil(0.2 * fbp.PRUNE_RATIO * before[n]), before[n] - death)
        assert int(mask.sum()) == before[n] - extra, n
    assert removed - grown == sum(before.values()) - topo.active() > 0
    after_prune = {n: int(m.sum()) for n, m in topo.masks.items()}
    topo.update(0.2, growth_ratio=0.5)  # a large ratio: growth refills only up to the initial quota
    for n, mask in topo.masks.items():
        assert after_prune[n] <= int(mask.sum()) <= topo.quota[n], n
    assert topo.active() > sum(after_prune.values())
    topo.update(0.2, growth_ratio=0.5)
    assert all(int(m.sum()) <= topo.quota[n] for n, m in topo.masks.items())


def test_monitor_holds_still_in_the_first_half_and_prunes_extra_on_a_rising_gap(monkeypatch):
    # per record: (train acc, loss) then (val acc, val loss); the gap rises by 0.05, the val loss falls
    calls = iter([r for k in range(8) for r in ((0.5 + 0.05 * k, 0.0), (0.5, 2.0 - 0.1 * k))])
    monkeypatch.setattr(fbp, "robust_accuracy_and_loss", lambda *a: next(calls))
    monitor = fbp.GapMonitor(None, (None, None), (None, None), None, None, lambda s: None)
    extras = [monitor(step, 80) for step in range(10, 90, 10)]
    assert extras[:3] == [(0.0, 0.0)] * 3  # steps 10-30 are in the first half
    assert extras[3:] == [(fbp.PRUNE_RATIO, 0.0)] * 5
    assert monitor.gaps == pytest.approx([0.05 * k for k in range(8)])


def test_prune_holds_out_validation_spends_the_budget_and_ends_at_least_at_the_target(monkeypatch):
    ctx = tiny_context(sparsity=0.9)
    x_full = ctx.x_train
    seen = []
    real = fbp.robust_accuracy_and_loss

    def spy(model, x, y, spec, device):
        seen.append(x)
        return real(model, x, y, spec, device)

    monkeypatch.setattr(fbp, "robust_accuracy_and_loss", spy)
    trained_on = []
    real_train = session.adversarial_train
    monkeypatch.setattr(session, "adversarial_train",
                        lambda m, x, y, *a, **k: trained_on.append(x) or real_train(m, x, y, *a, **k))
    model = FlyingBirdPlus().prune(ctx)
    assert ctx.x_train is x_full
    assert ctx.budget() == {"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs}
    n_val = len(x_full) // 10
    assert len(trained_on) == 1 and torch.equal(trained_on[0], x_full[:-n_val])
    assert seen and all(torch.equal(x, x_full[:n_val]) or torch.equal(x, x_full[-n_val:]) for x in seen)
    report = sparsity.measure(model, "weights")
    assert report.n_zero_weights >= round(0.9 * report.n_weights) - 1
    assert list(sparsity.dense_state_dict(model)) == list(model.state_dict())
