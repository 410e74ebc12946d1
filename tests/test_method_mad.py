"""MAD's core steps: mask optimisation, K-FAC adversarial saliency, budget, global prune, fine-tune."""

import copy

from hypothesis import given, settings, strategies as st
import torch
from torch import nn
import torch.nn.functional as F

from pytest_advprune import registry, sparsity
from pytest_advprune.sparsity import n_to_prune
from pytest_advprune.methods import mad
from pytest_advprune.methods.mad import (
    Mad, adversarial_saliency, keep_best_per_layer, kfac_factors, kfac_saliency, mad_masks, optimise_masks, row_keep,
    saliency_batches, saliency_epochs,
)
from tests.method_helpers import tiny_context


class Gated(nn.Module):
    """logits = fc((x - 0.5) * [1, 1, 0]): inputs 0 and 1 carry the class, input 2 never reaches fc."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gate", torch.tensor([1.0, 1.0, 0.0]))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((x - 0.5) * self.gate)


def test_saliency_is_the_damage_of_the_masked_weights_not_their_magnitude():
    # Input 0 (class at 0.5 -/+ 0.25) is flipped by the eps-0.35 attack, so its weights hurt the
    # adversarial loss and their masks shrink: positive saliency. Input 1 (class at 0 / 1) survives
    # the attack, its masks stay at 1 (dw = 0); input 2 is dead. Both have larger weights, and no saliency.
    torch.manual_seed(0)
    model = Gated().eval()
    weight = torch.tensor([[-3.0, -10.0, 20.0], [3.0, 10.0, -20.0]])
    with torch.no_grad():
        model.fc.weight.copy_(weight)
        model.fc.bias.zero_()
    y = torch.arange(64) % 2
    x = torch.stack([0.25 + 0.5 * y.float(), y.float(), torch.full((64,), 0.5)], dim=1)
    s = adversarial_saliency(model, x, y, eps=0.35, steps=10)["fc"]
    assert torch.all(s[:, 0] > 0), "the weights the attack exploits must have positive saliency"
    assert torch.all(s[:, 1:] == 0), "weights left unmasked or on a dead input must have none"
    assert torch.equal(model.fc.weight, weight)


def test_kfac_factors_and_saliency_match_per_sample_loops_on_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    params = {k: p.detach() * torch.rand_like(p) for k, p in model.named_parameters()}
    factors = kfac_factors(model, x, y, params)

    # Direct: explicit forward, analytic per-sample output gradients (softmax - onehot) and backprop.
    w1, b1, w2, b2 = (params[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    h = x @ w1.T + b1
    r = h.relu()
    g2 = F.softmax(r @ w2.T + b2, dim=1) - F.one_hot(y, 3)
    g1 = (g2 @ w2) * (h > 0)
    for name, a, g in (("0", x, g1), ("2", r, g2)):
        a1 = torch.cat([a, torch.ones(8, 1)], dim=1)
        A = sum(torch.outer(a1[b], a1[b]) for b in range(8)) / 8
        G = (g**2).mean(0)
        assert torch.allclose(factors[name][0], A, atol=1e-5), name
        assert torch.allclose(factors[name][1], G, atol=1e-5), name

        delta = torch.randn(g.shape[1], a1.shape[1])
        S = torch.empty_like(delta)
        for i in range(delta.shape[0]):
            for j in range(delta.shape[1]):
                S[i, j] = 0.5 * G[i] * delta[i, j] * sum(delta[i, k] * A[k, j] for k in range(delta.shape[1]))
        assert torch.allclose(kfac_saliency(delta, A, G), S, atol=1e-6), name


def test_conv_factors_follow_the_patches_in_weight_order():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(2, 3, 2, stride=2, padding=1), nn.Linear(12, 4)
    model = nn.Sequential(conv, nn.Flatten(), fc)
    x, y = torch.randn(5, 2, 3, 3), torch.randint(0, 4, (5,))
    A, G = kfac_factors(model, x, y, dict(model.named_parameters()))["0"]

    out = conv(x)
    # the repo backpropagates the mean loss, and its hooks see these output gradients
    (g,) = torch.autograd.grad(F.cross_entropy(fc(out.flatten(1)), y), out)
    xp = F.pad(x, (1, 1, 1, 1))
    patches = [xp[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten() for b in range(5) for i in range(2) for j in range(2)]
    a1 = torch.stack([torch.cat([p, torch.ones(1)]) for p in patches])
    assert a1.shape[1] == conv.weight[0].numel() + 1
    # the repo's ComputeCovA: patches / P (P = 4 output positions), a^T (a / batch)
    assert torch.allclose(A, (a1 / 4).T @ (a1 / 4) / 5, atol=1e-5)
    # its ComputeCovG (batch_averaged): gradients x batch x P, g^T (g / rows), rows = batch x P
    scaled = g * 5 * 4
    assert torch.allclose(G, scaled.pow(2).sum(dim=(0, 2, 3)) / (5 * 4), atol=1e-5)


def test_mask_optimisation_keeps_masks_in_the_unit_interval_and_the_weights_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)).eval()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = copy.deepcopy(model.state_dict())
    masks = optimise_masks(model, x, y)
    assert set(masks) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    values = torch.cat([m.flatten() for m in masks.values()])
    assert values.min() >= 0 and values.max() <= 1
    assert values.min() < 0.5, "the masks did not move"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()), "the weights (or BatchNorm) collected gradients"


def test_saliency_batches_follow_the_budget():
    assert saliency_batches(3000, 64, 1, 1) == 5  # smoke: ceil(47 * 2 / 23)
    assert saliency_batches(60000, 128, 1, 1) == 41  # quick: ceil(469 * 2 / 23)
    assert saliency_batches(3000, 64, 0, 1) == 1  # at least one batch, even on a zero budget
    assert saliency_batches(50000, 128, 20, 10) == 391  # survey budget buys more than a pass: one pass


def test_the_saliency_pass_charges_the_prune_phase_or_less_when_one_pass_caps_it():
    n_batches = saliency_batches(512, 64, 2.0, 1)  # 2 batches of 23 passes buy 2 epochs of 8 batches x 2 passes
    assert saliency_epochs(512, 64, 2.0, 1, n_batches) == 2.0
    capped = saliency_batches(512, 64, 40.0, 1)  # one pass, 8 batches, costs 8 x 23 / (8 x 2) = 11.5 epochs
    assert capped == 8 and saliency_epochs(512, 64, 40.0, 1, capped) == 11.5
    assert saliency_epochs(512, 64, 0.0, 1, saliency_batches(512, 64, 0.0, 1)) == 0.0


def test_keep_best_per_layer_stops_a_global_ranking_from_emptying_a_layer():
    scores = {"big": torch.arange(100.0) + 10, "small": torch.tensor([1.0, 3.0, 2.0])}
    assert not sparsity.global_keep(scores, 0.5)["small"].any()
    keep = sparsity.global_keep(keep_best_per_layer(scores), 0.5)
    assert keep["small"].tolist() == [False, True, False]
    assert sum(int((~k).sum()) for k in keep.values()) == round(0.5 * 103)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_row_keep_prunes_each_row_by_its_lowest_scores_and_the_layer_exactly(rows, cols, sparsity, seed):
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = row_keep(scores, sparsity)
    dropped = (~keep).sum(1)
    assert int(dropped.sum()) == n_to_prune(rows * cols, sparsity)
    assert int(dropped.max() - dropped.min()) <= 1, "rows must lose the same count, give or take one"
    for r in range(rows):
        if 0 < dropped[r] < cols:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_row_keep_gives_the_remainder_to_the_rows_with_the_lowest_next_score():
    scores = torch.tensor([[0.0, 5.0, 9.0], [0.0, 1.0, 9.0]])
    assert row_keep(scores, 0.5).tolist() == [[False, True, True], [False, False, True]]


def test_mad_masks_rank_convs_globally_and_linear_layers_per_row():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 3))
    saliency = {
        "0": torch.full((2, 1, 3, 3), 1.0),  # far below the other conv: the global ranking empties it, but for its best
        "1": torch.arange(36.0).view(2, 2, 3, 3) + 10,
        "3": torch.arange(32.0).view(4, 8) * torch.tensor([[1.0], [1e9], [-1.0], [0.5]]),  # per row: same count each
        "4": torch.randn(3, 4),
    }
    saliency["0"][1, 0, 2, 2] = 2.0
    masks = mad_masks(model, saliency, 0.5)
    assert masks["0"].sum() == 1 and masks["0"][1, 0, 2, 2] == 1, "conv ranking must be global, with the best kept"
    assert masks["1"].sum() == 54 - 27 - 1
    assert masks["3"].sum(1).tolist() == [4.0] * 4
    assert masks["3"][[0, 1, 3], 4:].all() and masks["3"][2, :4].all(), "each row must keep its highest saliencies"
    assert masks["4"].sum() == 6 and masks["4"].sum(1).tolist() == [2.0] * 3
    assert torch.equal(masks["4"].bool(), row_keep(saliency["4"], 0.5))


def test_prune_meets_the_target_and_fine_tunes_under_the_mask(monkeypatch):
    assert registry.get("mad") is Mad
    calls, made = [], []
    monkeypatch.setattr(mad, "adversarial_saliency", lambda *a, **k: calls.append(1) or adversarial_saliency(*a, **k))
    monkeypatch.setattr(mad, "mad_masks", lambda *a, **k: made.append(mad_masks(*a, **k)) or made[-1])
    ctx = tiny_context(sparsity=0.9, n=512, epochs=2.0)
    dense = copy.deepcopy(ctx.dense)
    model = Mad().prune(ctx)
    assert len(calls) == saliency_batches(512, 64, 2.0, 1) == 2
    # the saliency pass is charged as the 2 prune-phase epochs it replaces, the fine-tune as its 2
    assert ctx.budget()["method"] == 4.0

    report = sparsity.measure(model, "weights")
    assert abs(report.n_zero_weights - 0.9 * report.n_weights) <= len(report.per_layer)
    assert all(z < t for z, t in report.per_layer.values()), "a layer was emptied"
    layers, dense_layers = sparsity.prunable_layers(model), sparsity.prunable_layers(dense)
    for n, mask in made[0].items():
        assert torch.all(layers[n].weight[mask == 0] == 0), n
        if isinstance(layers[n], nn.Linear):
            assert mask.sum(1).max() - mask.sum(1).min() <= 1, f"{n} is not pruned per row"
    assert any(not torch.equal(layers[n].weight[m == 1], dense_layers[n].weight[m == 1]) for n, m in made[0].items())
