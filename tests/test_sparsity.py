"""Masks, counting rule, mask enforcement and score masks (pytest_advprune.sparsity).

Property tests draw small random conv/linear stacks and target sparsities in [0, 1); each builds
a model, so their example counts are kept small.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from pytest_advprune import sparsity as sp

torch.set_num_threads(1)

FAST = settings(max_examples=25, deadline=None)
SLOW = settings(max_examples=8, deadline=None)

targets = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


# ----------------------------------------------------------------------------- model builders


class Net(nn.Module):
    """Conv layers (padding keeps H, W) then linear layers; input ``[N, c0, size, size]``."""

    def __init__(self, convs: list[tuple[int, int, int]], linears: list[int], size: int = 3, c0: int = 2):
        super().__init__()
        self.norm = nn.BatchNorm2d(c0)  # never counted: not a Conv2d/Linear
        layers: list[nn.Module] = []
        c = c0
        for out, k, _ in convs:
            layers += [nn.Conv2d(c, out, k, padding=k // 2), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        feats = c * size * size
        head: list[nn.Module] = []
        for i, width in enumerate(linears):
            head.append(nn.Linear(feats, width))
            if i < len(linears) - 1:
                head.append(nn.ReLU())
            feats = width
        self.head = nn.Sequential(*head)
        self.size, self.c0 = size, c0

    def forward(self, x):
        return self.head(self.features(self.norm(x)).flatten(1))


@st.composite
def nets(draw, min_layers: int = 1):
    """A random small Net with at least ``min_layers`` prunable layers (odd kernels keep shapes)."""
    n_conv = draw(st.integers(0, 2))
    n_lin = draw(st.integers(max(1, min_layers - n_conv), 2))
    convs = [(draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), 0) for _ in range(n_conv)]
    linears = [draw(st.integers(1, 9)) for _ in range(n_lin)]
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    return Net(convs, linears)


def zeros_per_layer(model) -> dict[str, tuple[int, int]]:
    return {n: (int((m.weight == 0).sum()), m.weight.numel()) for n, m in sp.prunable_layers(model).items()}


def close_to_target(zeros: int, n: int, target: float) -> bool:
    return abs(zeros - target * n) <= 0.5 + 1e-9


# ----------------------------------------------------------------------------- achieved sparsity


@FAST
@given(model=nets(), target=targets)
def test_local_weight_masks_hit_target_in_every_layer(model, target):
    masks = sp.make_masks(model, "weights", target, scope="local")
    layers = sp.prunable_layers(model)
    assert set(masks) == set(layers)
    for n, m in masks.items():
        assert m.shape == layers[n].weight.shape and m.dtype == layers[n].weight.dtype
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    sp.apply_masks(model, masks)
    rep = sp.measure(model, "weights")
    for n, (z, total) in rep.per_layer.items():
        assert close_to_target(z, total, target), (n, z, total, target)
    assert rep.per_layer == zeros_per_layer(model)


@FAST
@given(model=nets(), target=targets)
def test_global_weight_masks_hit_target_in_total(model, target):
    sp.apply_masks(model, sp.make_masks(model, "weights", target, scope="global"))
    rep = sp.measure(model, "weights")
    assert close_to_target(rep.n_zero_weights, rep.n_weights, target)
    assert rep.n_weights == sum(m.weight.numel() for m in sp.prunable_layers(model).values())
    assert math.isclose(rep.sparsity, rep.n_zero_weights / rep.n_weights)


@FAST
@given(model=nets(min_layers=2), target=targets, scope=st.sampled_from(["local", "global"]))
def test_filter_masks_zero_whole_output_filters(model, target, scope):
    layers = sp.prunable_layers(model)
    names = list(layers)
    masks = sp.make_masks(model, "filters", target, scope=scope)
    assert list(masks) == names[:-1]  # the classifier's rows are never pruned
    for n, m in masks.items():
        rows = m.flatten(1)
        assert ((rows == 0).all(1) | (rows == 1).all(1)).all(), f"{n}: a filter is partly masked"
    last_before = layers[names[-1]].weight.detach().clone()
    sp.apply_masks(model, masks)
    assert torch.equal(layers[names[-1]].weight, last_before)
    rep = sp.measure(model, "filters")
    assert rep.layers_counted == names[:-1]
    for n in names[:-1]:
        w = layers[n].weight.detach().flatten(1)
        zero_rows = int((w == 0).all(1).sum())
        assert rep.per_layer[n] == (zero_rows, w.shape[0])
        # nothing but whole filters is zeroed
        assert int((w == 0).sum()) == zero_rows * w.shape[1]
        if scope == "local":
            assert close_to_target(zero_rows, w.shape[0], target)
    zero = sum(z for z, _ in rep.per_layer.values())
    total = sum(t for _, t in rep.per_layer.values())
    if scope == "global":
        assert close_to_target(zero, total, target)
    assert math.isclose(rep.sparsity, zero / total)


@FAST
@given(model=nets(min_layers=2), target=targets, scope=st.sampled_from(["local", "global"]))
def test_channel_masks_zero_whole_input_channels(model, target, scope):
    layers = sp.prunable_layers(model)
    names = list(layers)
    masks = sp.make_masks(model, "channels", target, scope=scope)
    assert list(masks) == names[1:]  # the image channels are never pruned
    for n, m in masks.items():
        cols = m.transpose(0, 1).flatten(1)
        assert ((cols == 0).all(1) | (cols == 1).all(1)).all(), f"{n}: a channel is partly masked"
    first_before = layers[names[0]].weight.detach().clone()
    sp.apply_masks(model, masks)
    assert torch.equal(layers[names[0]].weight, first_before)
    rep = sp.measure(model, "channels")
    assert rep.layers_counted == names[1:]
    for n in names[1:]:
        w = layers[n].weight.detach().transpose(0, 1).flatten(1)
        zero_cols = int((w == 0).all(1).sum())
        assert rep.per_layer[n] == (zero_cols, w.shape[0])
        assert int((w == 0).sum()) == zero_cols * w.shape[1]
        if scope == "local":
            assert close_to_target(zero_cols, w.shape[0], target)
    zero = sum(z for z, _ in rep.per_layer.values())
    total = sum(t for _, t in rep.per_layer.values())
    if scope == "global":
        assert close_to_target(zero, total, target)


@FAST
@given(n=st.integers(0, 10_000), target=st.floats(0.0, 1.0))
def test_n_to_prune_is_rounded_target(n, target):
    k = sp.n_to_prune(n, target)
    assert isinstance(k, int) and 0 <= k <= n
    assert abs(k - target * n) <= 0.5 + 1e-9


# ----------------------------------------------------------------------------- counting rule


def fixed_net() -> Net:
    torch.manual_seed(0)
    return Net([(4, 3, 0), (5, 3, 0)], [6, 3])  # conv(2->4), conv(4->5), fc(45->6), fc(6->3)


def test_counting_rule_layers():
    model = fixed_net()
    names = ["features.0", "features.2", "head.0", "head.2"]
    assert list(sp.prunable_layers(model)) == names
    assert list(sp.structured_layers(model, "weights")) == names
    assert list(sp.structured_layers(model, "filters")) == names[:-1]
    assert list(sp.structured_layers(model, "channels")) == names[1:]
    assert sp.measure(model, "weights").layers_counted == names
    assert sp.measure(model, "dense").layers_counted == names
    assert sp.measure(model, "filters").layers_counted == names[:-1]
    assert sp.measure(model, "channels").layers_counted == names[1:]


@torch.no_grad()
def test_counting_rule_excluded_units_and_non_prunable_params():
    model = fixed_net()
    model.head[2].weight[0] = 0  # a whole class row of the last layer: not a counted filter
    model.features[0].weight[:, 1] = 0  # an image channel of the first conv: not a counted channel
    model.norm.weight.zero_()  # BatchNorm is neither numerator nor denominator
    model.head[0].bias.zero_()  # nor are biases
    n_weights = sum(m.weight.numel() for m in sp.prunable_layers(model).values())
    filters = sp.measure(model, "filters")
    channels = sp.measure(model, "channels")
    assert filters.sparsity == 0.0 and channels.sparsity == 0.0
    assert filters.n_weights == n_weights
    assert filters.n_zero_weights == 6 + 4 * 9
    assert math.isclose(filters.weight_sparsity, (6 + 4 * 9) / n_weights)
    # the same kind of unit in a counted layer does count
    model.features[0].weight[2] = 0  # filter 2 of 4 in the first conv
    model.head[0].weight[:, 7] = 0  # input column 7 of 45 of the hidden linear
    f = sp.measure(model, "filters")
    assert f.per_layer["features.0"] == (1, 4)
    assert f.sparsity == 1 / (4 + 5 + 6)
    c = sp.measure(model, "channels")
    # conv2's input 2 is fed by the zeroed filter, but only a layer's own weights count
    assert c.per_layer == {"features.2": (0, 4), "head.0": (1, 45), "head.2": (0, 6)}
    assert c.sparsity == 1 / (4 + 45 + 6)


@torch.no_grad()
def test_channel_count_uses_only_the_layers_own_weights():
    model = fixed_net()
    model.features[2].weight[:, 3] = 0  # input channel 3 of conv2
    model.head[2].weight[:, 5] = 0  # input column 5 of the classifier (last layer counts for channels)
    c = sp.measure(model, "channels")
    assert c.per_layer == {"features.2": (1, 4), "head.0": (0, 45), "head.2": (1, 6)}
    assert c.sparsity == 2 / (4 + 45 + 6)
    f = sp.measure(model, "filters")
    assert f.sparsity == 0.0


# ----------------------------------------------------------------------------- bad input


def test_make_masks_rejects_bad_structure_and_scope():
    model = fixed_net()
    with pytest.raises(ValueError, match="structure"):
        sp.make_masks(model, "neurons", 0.5)
    with pytest.raises(ValueError, match="scope"):
        sp.make_masks(model, "weights", 0.5, scope="layerwise")
    with pytest.raises(ValueError, match="scope"):
        sp.make_masks(model, "filters", 0.5, scope="")
    with pytest.raises(ValueError):
        sp.measure(model, "neurons")
    with pytest.raises(ValueError):
        sp.unit_view(model.head[0].weight, "weights")


@pytest.mark.parametrize("bad", [-1e-9, -0.5, 1.0000001, 2.0, 90.0, float("nan"), float("inf"), float("-inf")])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sp.n_to_prune(100, bad)
    with pytest.raises(ValueError):
        sp.make_masks(fixed_net(), "weights", bad)


def test_sparsity_bounds_are_inclusive():
    assert sp.n_to_prune(7, 0.0) == 0
    assert sp.n_to_prune(7, 1.0) == 7
    model = fixed_net()
    sp.apply_masks(model, sp.make_masks(model, "weights", 1.0))
    assert sp.measure(model, "weights").sparsity == 1.0


# ----------------------------------------------------------------------------- measure: exact zeros


@pytest.mark.parametrize(
    "dtype, tiny",
    [
        (torch.float32, 1e-30),
        (torch.float32, 1e-45),  # float32 subnormal
        (torch.float16, 6e-8),  # float16 subnormal
        (torch.bfloat16, 1e-30),
        (torch.bfloat16, 1e-38),
    ],
)
@torch.no_grad()
def test_measure_counts_exact_zeros_without_lossy_cast(dtype, tiny):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)
    w = model[0].weight
    w.fill_(0.25)
    w[0, 0] = 0.0
    w[0, 1] = -0.0
    w[1] = tiny  # a whole filter of tiny, non-zero weights
    w[2, 0] = tiny
    assert bool((w[1] != 0).all()), "test setup: the tiny value must be representable in this dtype"
    model[1].weight.fill_(1.0)
    rep = sp.measure(model, "weights")
    assert rep.n_zero_weights == 2
    assert rep.per_layer["0"] == (2, 12)
    assert rep.n_weights == 12 + 6
    f = sp.measure(model, "filters")
    assert f.per_layer == {"0": (0, 3)}  # the tiny filter is not an all-zero filter
    w[0] = 0.0
    assert sp.measure(model, "filters").per_layer == {"0": (1, 3)}
    c = sp.measure(model, "channels")
    model[1].weight[:, 2] = tiny
    assert sp.measure(model, "channels").per_layer == c.per_layer == {"1": (0, 3)}


# ----------------------------------------------------------------------------- global ranking


def test_global_keep_ranks_across_layers():
    scores = {"a": torch.full((4, 3), 5.0), "b": torch.full((2, 6), 1.0), "c": torch.arange(6.0).view(6, 1) + 10}
    keep = sp.global_keep(scores, 12 / 30)
    assert keep["a"].all() and keep["c"].all()
    assert not keep["b"].any()
    local = sp.local_keep(scores, 0.5)
    assert [int((~k).sum()) for k in local.values()] == [6, 6, 3]


@torch.no_grad()
def test_make_masks_global_scope_ranks_across_layers():
    model = fixed_net()  # weights per layer: 72, 180, 270, 18
    model.head[0].weight.mul_(1000)  # the hidden linear dominates the ranking
    masks = sp.make_masks(model, "weights", 270 / 540, scope="global")
    assert masks["head.0"].all()
    assert not any(masks[n].any() for n in ("features.0", "features.2", "head.2"))
    local = sp.make_masks(model, "weights", 270 / 540, scope="local")
    assert int((local["head.0"] == 0).sum()) == 135
    # structured: filters per counted layer 4, 5, 6; conv2's filters dominate
    model = fixed_net()
    model.features[2].weight.mul_(1000)
    masks = sp.make_masks(model, "filters", 10 / 15, scope="global")
    assert masks["features.2"].all()
    assert not masks["features.0"].any() and not masks["head.0"].any()
    assert "head.2" not in masks


@FAST
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    target=targets,
    seed=st.integers(0, 2**16),
)
def test_global_keep_drops_the_lowest_scores(sizes, target, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    keep = sp.global_keep(scores, target)
    flat_s = torch.cat([scores[k] for k in scores])
    flat_k = torch.cat([keep[k] for k in scores])
    n_drop = int((~flat_k).sum())
    assert n_drop == round(target * flat_s.numel())
    if 0 < n_drop < flat_s.numel():
        assert flat_s[flat_k].min() >= flat_s[~flat_k].max()


# ----------------------------------------------------------------------------- mask enforcement


@SLOW
@given(
    model=nets(min_layers=2),
    target=st.floats(0.05, 0.95),
    structure=st.sampled_from(["weights", "filters", "channels"]),
    opt_name=st.sampled_from(["sgd", "nesterov", "adam"]),
)
def test_masks_survive_optimizer_steps(model, target, structure, opt_name):
    masks = sp.make_masks(model, structure, target)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=opt_name == "nesterov")
    enforcer = sp.MaskEnforcer(opt, model, masks)
    layers = sp.prunable_layers(model)
    pruned = {n: m == 0 for n, m in masks.items()}
    for n, p in pruned.items():  # the enforcer applies the masks at once
        assert bool((layers[n].weight[p] == 0).all())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(5, model.c0, model.size, model.size, generator=g)
        out = model(x)
        loss = (out**2).mean() + out.sum()
        opt.zero_grad()
        loss.backward()
        # the gradient does reach pruned weights, so only the enforcer can keep them at zero
        opt.step()
        for n, p in pruned.items():
            w = layers[n].weight
            assert bool((w[p] == 0).all()), f"{n}: a pruned weight came back to life"
            state = opt.state[w]
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in state:
                    assert bool((state[key][p] == 0).all()), f"{n}: {key} of pruned weights is not zero"
    assert sp.measure(model, "weights").n_zero_weights >= sum(int(p.sum()) for p in pruned.values())
    enforcer.remove()


def test_masks_need_the_enforcer_and_stop_with_remove():
    """Control: without the enforcer, momentum and weight decay revive pruned weights."""
    model = fixed_net()
    masks = sp.make_masks(model, "weights", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    enforcer = sp.MaskEnforcer(opt, model, masks)
    enforcer.remove()
    x = torch.rand(4, 2, 3, 3)
    model(x).sum().backward()
    opt.step()
    pruned = masks["head.0"] == 0
    assert bool((model.head[0].weight[pruned] != 0).any())


@torch.no_grad()
def test_masks_from_model_round_trip():
    model = fixed_net()
    sp.apply_masks(model, sp.make_masks(model, "weights", 0.7))
    masks = sp.masks_from_model(model)
    for n, m in sp.prunable_layers(model).items():
        assert torch.equal(masks[n], (m.weight != 0).float())


# ----------------------------------------------------------------------------- score masks


def score_init(layer):
    g = torch.Generator().manual_seed(layer.weight.numel())
    return torch.randn(layer.weight.shape, generator=g)


def test_attach_score_masks_freezes_weights_and_masks_top_k():
    model = fixed_net()
    target = 0.6
    dense = {n: m.weight.detach().clone() for n, m in sp.prunable_layers(model).items()}
    scores = sp.attach_score_masks(model, target, init=score_init)
    assert len(scores) == 4 and all(s.requires_grad for s in scores)
    sms = sp.score_mask_layers(model)
    assert list(sms) == list(dense)
    for n, m in sp.prunable_layers(model).items():
        assert m.parametrizations.weight.original.requires_grad is False
        assert m.bias.requires_grad is False
        numel = m.weight.numel()
        mask = sms[n].mask().detach()
        assert int((mask == 0).sum()) == round(target * numel)
        assert int((mask == 1).sum()) == numel - round(target * numel)
        # top-k of |scores|
        s = sms[n].scores.detach().abs()
        assert s[mask == 1].min() >= s[mask == 0].max()
        # the effective weight is the masked dense weight, and it is what measure counts
        assert torch.equal(m.weight.detach(), dense[n] * mask)
    rep = sp.measure(model, "weights")
    assert all(close_to_target(z, t, target) for z, t in rep.per_layer.values())
    with pytest.raises(ValueError, match="bake"):
        sp.dense_state_dict(model)


class _EveryOther(torch.nn.utils.prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


def test_fold_reparametrizations_folds_a_tensor_pruned_twice_and_a_custom_pruning_method():
    import torch.nn.utils.prune as torch_prune

    model = fixed_net()
    first, last = list(sp.prunable_layers(model).values())[0], list(sp.prunable_layers(model).values())[-1]
    torch_prune.l1_unstructured(first, "weight", amount=0.3)
    torch_prune.random_unstructured(first, "weight", amount=0.3)  # a PruningContainer on one tensor
    _EveryOther.apply(last, "weight")
    x = torch.rand(3, 2, 3, 3)
    before = model(x)
    state = sp.dense_state_dict(sp.fold_reparametrizations(model))
    assert torch.equal(model(x), before)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert int((state[[k for k in state if k.endswith("weight")][-1]] == 0).sum()) >= last.weight.numel() // 2


def test_fold_reparametrizations_keeps_the_forward_and_leaves_plain_weights():
    import torch.nn.utils.prune as torch_prune

    model = fixed_net()
    sp.attach_score_masks(model, 0.5, init=score_init, layers=[list(sp.prunable_layers(model))[0]])
    torch_prune.random_unstructured(list(sp.prunable_layers(model).values())[-1], "weight", amount=0.3)
    x = torch.rand(3, 2, 3, 3)
    before = model(x)
    state = sp.dense_state_dict(sp.fold_reparametrizations(model))
    assert torch.equal(model(x), before)
    assert not any(k.endswith(("_orig", "_mask")) or "parametrizations" in k or "scores" in k for k in state)
    assert sp.measure(model, "weights").n_zero_weights > 0


def test_score_gradient_is_straight_through():
    model = fixed_net()
    scores = sp.attach_score_masks(model, 0.5, init=score_init)
    model(torch.rand(3, 2, 3, 3)).pow(2).sum().backward()
    for n, sm in sp.score_mask_layers(model).items():
        assert sm.scores.grad is not None, n
        pruned = sm.mask().detach() == 0
        # pruned scores get a gradient too (straight-through), so they can come back
        assert bool((sm.scores.grad[pruned] != 0).any()), n
    for m in sp.prunable_layers(model).values():
        assert m.parametrizations.weight.original.grad is None
        assert m.bias.grad is None
    assert all(s.grad is not None for s in scores)


def test_score_gradient_reaches_the_scores_through_their_magnitude():
    # m = topk(|s|): dL/ds = sign(s) * dL/dm, so raising a negative score's importance lowers it
    # (HYDRA's GetSubnet applied to popup_scores.abs()). For y = (w * m) x, dL/dm = w * x.
    layer = torch.nn.Linear(4, 3, bias=False)
    scores = torch.tensor([[1.0, -2.0, 0.5, -0.1], [-1.0, 2.0, -0.5, 0.1], [0.3, -0.3, 3.0, -3.0]])
    sp.attach_score_masks(layer, 0.5, init=lambda m: scores)
    x = torch.rand(5, 4)
    layer(x).sum().backward()
    sm = sp.score_mask_layers(layer)[""]
    w = layer.parametrizations.weight.original.detach()
    expected = scores.sign() * w * x.sum(0)
    assert torch.allclose(sm.scores.grad, expected, atol=1e-6)


def test_score_training_changes_only_scores_and_mask_follows():
    model = fixed_net()
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = sp.attach_score_masks(model, 0.5, init=score_init)
    before = [s.detach().clone() for s in scores]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0, momentum=0.9)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(s) for s in scores} | {
        id(model.norm.weight), id(model.norm.bias)
    }
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.rand(4, 2, 3, 3, generator=g)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert any(not torch.equal(b, s) for b, s in zip(before, scores))
    for n, m in sp.prunable_layers(model).items():
        assert torch.equal(m.parametrizations.weight.original, frozen[f"{n}.weight"])
        assert torch.equal(m.bias, frozen[f"{n}.bias"])
    changed_mask = False
    for n, sm in sp.score_mask_layers(model).items():
        mask = sm.mask().detach()
        fresh = sp.keep_mask(sm.scores.detach().abs(), sp.n_to_prune(sm.scores.numel(), 0.5)).float()
        s = sm.scores.detach().abs()
        assert s[mask == 1].min() >= s[mask == 0].max(), f"{n}: mask is stale after the scores changed"
        assert int(mask.sum()) == int(fresh.sum())
        b = before[list(sp.score_mask_layers(model)).index(n)].abs()
        old = sp.keep_mask(b, sp.n_to_prune(b.numel(), 0.5)).float()
        changed_mask |= not torch.equal(old, mask)
    assert changed_mask, "test setup: training should have moved some scores across the top-k boundary"


def test_bake_score_masks_gives_a_plain_model_with_the_same_forward():
    model = fixed_net().eval()
    sp.attach_score_masks(model, 0.7, init=score_init)
    x = torch.rand(5, 2, 3, 3)
    with torch.no_grad():
        masked_out = model(x)
    masked_rep = sp.measure(model, "weights")
    effective = {n: m.weight.detach().clone() for n, m in sp.prunable_layers(model).items()}
    masks = sp.bake_score_masks(model)
    assert not sp.score_mask_layers(model)
    for n, m in sp.prunable_layers(model).items():
        assert not hasattr(m, "parametrizations")
        assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad and m.bias.requires_grad
        assert torch.equal(m.weight.detach(), effective[n])
        assert torch.equal(masks[n], (effective[n] != 0).float())
    with torch.no_grad():
        assert torch.allclose(model(x), masked_out, rtol=0, atol=1e-6)
    state = sp.dense_state_dict(model)
    assert not any("parametrizations" in k or "scores" in k or "original" in k for k in state)
    assert set(state) == set(fixed_net().state_dict())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    fresh = fixed_net()
    fresh.load_state_dict(state, strict=True)
    assert sp.measure(fresh, "weights").per_layer == masked_rep.per_layer
    # the baked masks fix the pattern for fine-tuning
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sp.MaskEnforcer(opt, model, masks)
    model(x).sum().backward()
    opt.step()
    assert sp.measure(model, "weights").per_layer == masked_rep.per_layer


@SLOW
@given(model=nets(), target=targets)
def test_score_masks_top_k_count_is_exact_for_any_shape(model, target):
    sp.attach_score_masks(model, target, init=lambda m: torch.randn_like(m.weight))
    for n, sm in sp.score_mask_layers(model).items():
        k = int((sm.mask().detach() == 0).sum())
        assert k == sp.n_to_prune(sm.scores.numel(), target)
        assert close_to_target(k, sm.scores.numel(), target)
    sp.bake_score_masks(model)
    rep = sp.measure(model, "weights")
    assert all(close_to_target(z, t, target) for z, t in rep.per_layer.values())
