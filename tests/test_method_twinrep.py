"""TwinRep's core steps: the reparameterised forward, the implicit sparsity regulariser of weight decay on
both factors, the one-shot global cut on W_eff (exact for weights, whole channels with one kept per layer),
and the plain model baked at the end on the whole budget."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from pytest_advprune import models, sparsity
from pytest_advprune.methods.twinrep import ChannelMix, Twin, TwinRep, global_prune_masks, reparameterise
from tests.method_helpers import tiny_context


def _by_hand(kind, w, a, mask):
    if kind is Twin:
        return w * a * mask
    out = torch.zeros_like(w)
    for p in range(w.shape[1]):  # W_eff[:, p] = sum_q A[p, q] W[:, q]
        for q in range(w.shape[1]):
            out[:, p] += a[p, q] * w[:, q]
    return out * mask


@pytest.mark.parametrize("kind", [Twin, ChannelMix])
@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 3, padding=1), nn.Linear(6, 4)], ids=["conv", "linear"])
def test_reparameterised_forward_equals_a_plain_layer_with_the_effective_weight(kind, layer):
    torch.manual_seed(0)
    w = layer.weight.detach().clone()
    rep = kind(w, torch.Generator().manual_seed(1))
    rep.mask.copy_((torch.rand_like(w) > 0.3).float())
    parametrize.register_parametrization(layer, "weight", rep)
    x = torch.randn(2, 3, 4, 4) if isinstance(layer, nn.Conv2d) else torch.randn(2, 6)
    plain = F.conv2d(x, _by_hand(kind, w, rep.twin.detach(), rep.mask), layer.bias, padding=1) \
        if isinstance(layer, nn.Conv2d) else F.linear(x, _by_hand(kind, w, rep.twin.detach(), rep.mask), layer.bias)
    assert torch.allclose(layer(x), plain, atol=1e-6)


def test_weight_decay_on_both_twin_factors_drives_small_effective_weights_to_zero():
    # Fit W_eff to targets with small and large entries under weight decay lam. Plain decay only shrinks
    # (w = t / (1 + lam)); on a balanced product it acts as lam * |W_eff|, a soft threshold at lam.
    lam, target = 0.1, torch.tensor([[0.05, 0.05, 1.0, 1.0]])
    small, large = target < lam, target > lam

    def fit(weight, extra, effective):
        opt = torch.optim.SGD([weight, *extra], lr=0.05, momentum=0.9, weight_decay=lam)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * (effective() - target).square().sum()).backward()
            opt.step()
        return effective().detach()

    plain_w = nn.Parameter(torch.full((1, 4), 0.25))
    plain = fit(plain_w, [], lambda: plain_w)
    twin_w = nn.Parameter(torch.full((1, 4), 0.5))
    twin = Twin(twin_w.detach(), torch.Generator().manual_seed(0))
    twin.twin.data.fill_(0.5)  # balanced start, W_eff = 0.25 as the plain weight
    product = fit(twin_w, [twin.twin], lambda: twin(twin_w))
    assert torch.allclose(plain, target / (1 + lam), atol=1e-3)
    assert product[small].abs().max() < 0.1 * plain[small].min(), "small effective weights not driven to zero"
    assert product[large].min() > 0.8, "large effective weights should survive (shrunk by about lam)"


def test_twin_factors_start_balanced_at_the_default_init_scale():
    model = models.build("cnn", "fashion_mnist", 0)
    twins = reparameterise(model, "weights", seed=0)
    for name, layer in sparsity.prunable_layers(model).items():
        w, a = layer.parametrizations.weight.original.detach(), twins[name].twin.detach()
        bound = (3 / w[0].numel()) ** 0.25  # (3 fan_in)^(1/4) / sqrt(fan_in): both factors, one law
        assert w.abs().max() <= bound and a.abs().max() <= bound, name
        if w.numel() > 1000:
            default_std = 1 / math.sqrt(3 * w[0].numel())
            assert layer.weight.std().item() == pytest.approx(default_std, rel=0.1), name


def test_global_weight_cut_on_the_effective_weights_is_exact_and_global():
    model = models.build("cnn", "fashion_mnist", 0)
    reparameterise(model, "weights", seed=0)
    masks = global_prune_masks(model, "weights", 0.9)
    layers = sparsity.prunable_layers(model)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.9 * total)
    eff = {n: layers[n].weight.detach().abs() for n in masks}
    cut = max(eff[n][masks[n] == 0].max() for n in masks)
    kept = min(eff[n][masks[n] == 1].min() for n in masks)
    assert cut <= kept, "the cut is not on |W_eff|"
    fractions = {n: float((m == 0).float().mean()) for n, m in masks.items()}
    assert max(fractions.values()) - min(fractions.values()) > 0.1, "one global ranking, not per layer"


def test_global_channel_cut_zeroes_whole_channels_meets_the_target_and_keeps_one_per_layer():
    model = models.build("cnn", "fashion_mnist", 0)
    twins = reparameterise(model, "channels", seed=0)
    assert "conv1" not in twins, "the first layer's channels are not counted, so it is not reparameterised"
    with torch.no_grad():
        model.fc2.parametrizations.weight.original.mul_(1e-4)  # the global ranking would empty fc2
    masks = global_prune_masks(model, "channels", 0.5)
    for name, mask in masks.items():
        twins[name].mask.copy_(mask)
    report = sparsity.measure(model, "channels")
    units = sum(t for _, t in report.per_layer.values())
    assert sum(z for z, _ in report.per_layer.values()) == round(0.5 * units)
    assert report.sparsity >= 0.5
    assert report.per_layer["fc2"][0] == report.per_layer["fc2"][1] - 1, "fc2 keeps exactly its strongest channel"
    for name, mask in masks.items():
        per_channel = sparsity.unit_view(mask, "channels")
        assert bool(((per_channel == 0).all(1) | (per_channel == 1).all(1)).all()), f"{name}: partial channels"


@pytest.mark.parametrize("structure, target", [("weights", 0.9), ("channels", 0.5)])
def test_prune_bakes_a_plain_model_at_the_target_after_pruning_early_on_the_whole_budget(structure, target):
    ctx = tiny_context(structure=structure, sparsity=target)
    lines = []
    ctx.log = lines.append
    model = TwinRep().prune(ctx)
    assert any("pruned" in line and "step 2/20" in line for line in lines), "prune at 9% of the 20 steps"
    state = sparsity.dense_state_dict(model)
    assert not any("parametrizations" in k or "twin" in k or "mask" in k for k in state)
    report = sparsity.measure(model, structure)
    assert abs(report.sparsity - target) * sum(t for _, t in report.per_layer.values()) <= 1
    assert ctx.budget() == pytest.approx({"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs})
