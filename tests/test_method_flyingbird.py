"""Flying Bird's core steps (pytest_advprune.dst): IGQ random sparse init, magnitude death and random
growth at constant density, the cosine death rate, the update schedule, and the whole method's
budget and sparsity."""

import math

import pytest
import torch

from pytest_advprune import dst, sparsity
from pytest_advprune.methods.flyingbird import FlyingBird
from tests.method_helpers import tiny_context


def test_igq_counts_hit_the_target_exactly_and_keep_small_layers_denser():
    sizes = [288, 4608, 200704, 1280]
    for target in (0.5, 0.9, 0.99):
        counts = dst.igq_counts(sizes, target)
        assert sum(counts) == sum(sizes) - round(target * sum(sizes))
        densities = [k / n for k, n in zip(counts, sizes)]
        assert sorted(densities, reverse=True) == [densities[i] for i in (0, 3, 1, 2)]
        # IGQ quotas: k_l = N_l / (1 + f N_l) for one force f, up to rounding
        force = (sizes[2] / counts[2] - 1) / sizes[2]
        assert all(abs(k - n / (1 + force * n)) < 2 for k, n in zip(counts, sizes))
    assert dst.igq_counts(sizes, 0.0) == sizes and dst.igq_counts(sizes, 1.0) == [0] * 4


def test_initial_masks_are_random_with_the_igq_counts():
    ctx = tiny_context(sparsity=0.9)
    layers = sparsity.prunable_layers(ctx.dense)
    topo = dst.DynamicSparsity(ctx.dense, 0.9, steps_per_epoch=4, seed=0)
    total = sum(m.weight.numel() for m in layers.values())
    assert topo.active() == total - round(0.9 * total)
    assert list(topo.masks) == list(layers)  # first conv and classifier included
    for n, mask in topo.masks.items():
        assert int(mask.sum()) == topo.quota[n]
    other = dst.DynamicSparsity(ctx.dense, 0.9, steps_per_epoch=4, seed=1)
    assert not torch.equal(topo.masks["fc1"], other.masks["fc1"])


def test_death_rate_is_a_cosine_decay_from_one_half():
    total = 1000
    rates = [dst.death_rate(s, total) for s in range(total + 1)]
    assert rates[0] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.005)
    assert rates[500] == pytest.approx((0.5 + 0.005) / 2)
    assert rates[250] == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_updates_every_half_epoch_then_every_two_thirds_never_at_the_last_step():
    steps = dst.update_steps(total_steps=60, steps_per_epoch=12)
    assert steps == [6, 12, 18, 24, 30, 38, 46, 54]
    assert dst.update_steps(total_steps=6, steps_per_epoch=12) == []


def test_prune_and_grow_removes_the_smallest_active_and_regrows_inactive_positions():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 30)
    mask = dst.random_mask(weight, 200, gen)
    weight *= mask
    new = dst.prune_and_grow(weight, mask, n_prune=50, n_grow=50, generator=gen)
    removed = (mask == 1) & (new == 0)
    grown = (mask == 0) & (new == 1)
    assert int(removed.sum()) == 50 and int(grown.sum()) == 50 and int(new.sum()) == 200
    kept = (mask == 1) & (new == 1)
    assert weight[removed].abs().max() <= weight[kept].abs().min()
    with pytest.raises(ValueError):
        dst.prune_and_grow(weight, mask, n_prune=0, n_grow=401, generator=gen)


def test_update_keeps_every_layer_count_zeroes_removed_and_starts_regrown_at_zero():
    ctx = tiny_context(sparsity=0.8)
    model = ctx.dense
    topo = dst.DynamicSparsity(model, 0.8, steps_per_epoch=4, seed=0)
    sparsity.apply_masks(model, topo.masks)
    before = {n: m.clone() for n, m in topo.masks.items()}
    weights = {n: m.weight.detach().clone() for n, m in sparsity.prunable_layers(model).items()}
    removed, grown = topo.update(0.3)
    # a layer swaps ceil(0.3 * nnz) weights, or all its free positions when fewer
    assert removed == grown == sum(min(math.ceil(0.3 * int(m.sum())), int((m == 0).sum())) for m in before.values())
    for n, layer in sparsity.prunable_layers(model).items():
        old, new = before[n], topo.masks[n]
        assert int(new.sum()) == int(old.sum()) == topo.quota[n], n
        assert (layer.weight[new == 0] == 0).all(), n
        regrown = (old == 0) & (new == 1)
        assert regrown.any() or not (old == 0).any(), n  # only a dense layer has nothing to swap
        assert (layer.weight[regrown] == 0).all(), n
        dropped = (old == 1) & (new == 0)
        kept = (old == 1) & (new == 1)
        if dropped.any():
            assert weights[n][dropped].abs().max() <= weights[n][kept].abs().min(), n


def test_masks_are_enforced_by_reference_so_in_place_updates_take_effect():
    ctx = tiny_context(sparsity=0.8)
    model = ctx.dense
    topo = dst.DynamicSparsity(model, 0.8, steps_per_epoch=4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enforcer = sparsity.MaskEnforcer(opt, model, topo.masks)
    try:
        assert all(mask is topo.masks[n] for (_, mask), n in zip(enforcer.pairs, topo.masks))
        model(ctx.x_train[:8]).sum().backward()
        opt.step()
        before = {n: m.clone() for n, m in topo.masks.items()}
        topo.update(0.5)
        assert all(mask is topo.masks[n] for (_, mask), n in zip(enforcer.pairs, topo.masks))
        for n, layer in sparsity.prunable_layers(model).items():
            regrown = (before[n] == 0) & (topo.masks[n] == 1)
            assert (opt.state[layer.weight]["momentum_buffer"][regrown] == 0).all(), n
    finally:
        enforcer.remove()


def test_prune_trains_the_whole_budget_at_constant_density_and_meets_the_target(monkeypatch):
    ctx = tiny_context(sparsity=0.9)
    counts, topologies = [], []
    real_update = dst.DynamicSparsity.update

    def spy(self, *args, **kwargs):
        before = {n: m.clone() for n, m in self.masks.items()}
        out = real_update(self, *args, **kwargs)
        topologies.append(self)
        counts.append({n: (int(before[n].sum()), int(m.sum()), bool((before[n] != m).any())) for n, m in self.masks.items()})
        return out

    monkeypatch.setattr(dst.DynamicSparsity, "update", spy)
    model = FlyingBird().prune(ctx)
    assert ctx.budget() == {"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs}
    steps_per_epoch = math.ceil(len(ctx.x_train) / ctx.preset.dense_train.batch_size)
    total_steps = math.ceil(ctx.budget_epochs * steps_per_epoch)
    assert len(counts) == len(dst.update_steps(total_steps, steps_per_epoch)) > 3
    assert all(b == a for update in counts for b, a, _ in update.values())
    assert any(changed for update in counts for _, _, changed in update.values())
    final = topologies[-1]
    assert abs(final.active() - round(0.1 * sum(m.numel() for m in final.masks.values()))) <= 1
    nonzero = 0
    for n, layer in sparsity.prunable_layers(model).items():  # the training loop enforced the final masks
        assert (layer.weight[final.masks[n] == 0] == 0).all(), n
        nonzero += int((layer.weight != 0).sum())
    # Zeros beyond the mask are active weights that never got a gradient (dead inputs on random data):
    # the measured sparsity is at least the target, and most active weights did train.
    report = sparsity.measure(model, "weights")
    assert report.n_weights - report.n_zero_weights == nonzero >= 0.8 * final.active()
    assert report.n_zero_weights >= round(0.9 * report.n_weights) - 1
    assert list(sparsity.dense_state_dict(model)) == list(model.state_dict())
