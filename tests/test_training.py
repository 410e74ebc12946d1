"""The shared adversarial training loop and its attacks (pytest_advprune.training, .attacks)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from pytest_advprune import sparsity as sp
from pytest_advprune.attacks import pgd, trades_example
from pytest_advprune.models import SmallCNN
from pytest_advprune.training import TrainSpec, adversarial_train, robust_loss

torch.set_num_threads(1)
CPU = torch.device("cpu")
SIZE = 8  # 8x8 single-channel images keep every run in milliseconds


def tiny_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(1, SIZE, 4, (0.5,), (0.25,), widths=(3, 4), hidden=8)


def toy_data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes told apart by which image quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.3
    h = SIZE // 2
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * h : (r + 1) * h, q * h : (q + 1) * h] += 0.6
    return x, y


SPEC = TrainSpec(epochs=2, lr=0.05, batch_size=16, eps=0.1)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("spec", [SPEC, SPEC.with_(loss="trades", attack_steps=2, step_size=0.5)], ids=["pgd", "trades"])
def test_adversarial_train_is_deterministic_under_a_seed(spec):
    x, y = toy_data()
    init = tiny_model()
    a, b, c = copy.deepcopy(init), copy.deepcopy(init), copy.deepcopy(init)
    losses_a = adversarial_train(a, x, y, spec, seed=7, device=CPU)
    torch.rand(100)  # disturbing the global RNG between runs must not matter
    losses_b = adversarial_train(b, x, y, spec, seed=7, device=CPU)
    assert losses_a == losses_b and len(losses_a) == 2
    assert same_params(a, b)
    assert not same_params(a, init), "training changed nothing"
    adversarial_train(c, x, y, spec, seed=8, device=CPU)
    assert not same_params(a, c), "the seed has no effect"
    assert not a.training  # the loop leaves the model in eval mode


def test_fractional_epochs_and_logging():
    x, y = toy_data(48)
    lines: list[str] = []
    losses = adversarial_train(tiny_model(), x, y, SPEC.with_(epochs=1.5), seed=0, device=CPU, log=lines.append, desc="phase")
    assert len(losses) == 2 and len(lines) == 2  # 1.5 epochs of 3 steps = 5 steps over two passes
    assert all(line.startswith("phase: epoch ") and "\n" not in line for line in lines)


# ----------------------------------------------------------------------------- attacks stay in the threat model


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


attack_cases = dict(
    seed=st.integers(0, 2**16),
    eps=st.floats(0.0, 0.5),
    step_mult=st.floats(0.1, 5.0),
    steps=st.integers(1, 4),
    edge=st.sampled_from(["uniform", "zeros", "ones", "binary"]),
)


def attack_input(seed: int, edge: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 4, 4, generator=g)
    if edge == "zeros":
        x.zero_()
    elif edge == "ones":
        x.fill_(1.0)
    elif edge == "binary":
        x = (x > 0.5).float()
    return x, torch.randint(0, 3, (6,), generator=g)


def assert_in_threat_model(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) <= eps + 1e-6


@settings(max_examples=60, deadline=None)
@given(random_start=st.booleans(), **{**attack_cases, "steps": st.integers(0, 4)})
def test_pgd_stays_in_eps_ball_and_pixel_range(seed, eps, step_mult, steps, edge, random_start):
    model = linear_model(seed)
    x, y = attack_input(seed, edge)
    x_adv = pgd(model, x, y, eps, step_mult * max(eps, 1e-3), steps, random_start=random_start)
    assert_in_threat_model(x_adv, x, eps)
    assert all(p.grad is None for p in model.parameters()), "pgd touched parameter gradients"


@settings(max_examples=60, deadline=None)
@given(**attack_cases)
def test_trades_example_stays_in_eps_ball_and_pixel_range(seed, eps, step_mult, steps, edge):
    model = linear_model(seed)
    x, _ = attack_input(seed, edge)
    x_adv = trades_example(model, x, eps, step_mult * max(eps, 1e-3), steps)
    assert_in_threat_model(x_adv, x, eps)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_increases_the_loss():
    model = linear_model(0)
    x, y = attack_input(0, "uniform")
    loss = nn.functional.cross_entropy
    x_adv = pgd(model, x, y, 0.3, 0.1, 5, random_start=False)
    assert loss(model(x_adv), y) > loss(model(x), y)
    assert float((x_adv - x).abs().max()) > 0.05  # the attack does move


@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_trades_example_without_steps_stays_in_eps_ball(eps):
    """With no ascent step, the 0.001 * N(0, 1) start must still be projected onto the eps-ball."""
    model = linear_model(0)
    x, _ = attack_input(0, "uniform")
    torch.manual_seed(0)
    assert_in_threat_model(trades_example(model, x, eps, 0.1, 0), x, eps)


# ----------------------------------------------------------------------------- masks and params


@pytest.mark.parametrize("structure", ["weights", "filters", "channels"])
def test_training_with_masks_keeps_zeros(structure):
    x, y = toy_data()
    model = tiny_model()
    masks = sp.make_masks(model, structure, 0.5)
    before = {n: m.weight.detach().clone() for n, m in sp.prunable_layers(model).items()}
    adversarial_train(model, x, y, SPEC.with_(weight_decay=1e-2), seed=0, device=CPU, masks=masks)
    layers = sp.prunable_layers(model)
    for n, mask in masks.items():
        w = layers[n].weight.detach()
        assert bool((w[mask == 0] == 0).all()), f"{n}: a pruned weight came back"
        assert not torch.equal(w[mask == 1], before[n][mask == 1]), f"{n}: kept weights were not trained"
    rep = sp.measure(model, structure)
    assert rep.sparsity == pytest.approx(sp.measure(_masked_copy(masks), structure).sparsity)


def _masked_copy(masks):
    model = tiny_model()
    sp.apply_masks(model, masks)
    return model


def test_params_restricts_what_changes():
    x, y = toy_data()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial_train(model, x, y, SPEC, seed=0, device=CPU, params=[model.fc2.weight, model.conv1.bias])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc2.weight", "conv1.bias"}


def test_params_skips_frozen_parameters():
    x, y = toy_data()
    model = tiny_model()
    model.fc1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial_train(model, x, y, SPEC, seed=0, device=CPU)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "fc1.weight" not in changed
    assert changed == set(before) - {"fc1.weight", "normalize.mean", "normalize.std"}


def test_score_training_through_the_loop_changes_only_scores():
    x, y = toy_data()
    model = tiny_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    scores = sp.attach_score_masks(model, 0.5, init=lambda m: m.weight.detach().abs() + 0.01)
    start = [s.detach().clone() for s in scores]
    adversarial_train(model, x, y, SPEC.with_(lr=0.5), seed=0, device=CPU, params=scores)
    assert any(not torch.equal(a, s) for a, s in zip(start, scores))
    for n, m in sp.prunable_layers(model).items():
        assert torch.equal(m.parametrizations.weight.original, dense[f"{n}.weight"])
        assert torch.equal(m.bias, dense[f"{n}.bias"])


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("loss", ["pgd", "trades", "mart"])
def test_divergence_raises_one_line_floating_point_error(loss):
    x, y = toy_data()
    with pytest.raises(FloatingPointError) as info:
        adversarial_train(tiny_model(), x, y, SPEC.with_(lr=1e6, loss=loss, epochs=3), seed=0, device=CPU, desc="dense cnn")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("dense cnn: ") and "learning rate" in msg


def test_unknown_loss_is_rejected():
    x, y = toy_data(8)
    with pytest.raises(ValueError, match="'pgd', 'trades' or 'mart'"):
        adversarial_train(tiny_model(), x, y, SPEC.with_(loss="hinge"), seed=0, device=CPU)


def test_mart_loss_at_eps_zero_is_the_boosted_ce_of_the_clean_input():
    # eps 0: x' = x, so the KL term vanishes and MART (Wang et al. 2020, eq. 9) reduces to
    # CE(f(x), y) - log(1.0001 - max_{k != y} p_k(x)).
    x, y = toy_data(8)
    model = tiny_model().eval()
    got = robust_loss(model, x, y, SPEC.with_(loss="mart", eps=0.0, beta=0.5))
    p = torch.softmax(model(x), 1)
    wrong = p.clone()
    wrong[torch.arange(len(y)), y] = -1
    expected = torch.nn.functional.cross_entropy(model(x), y) - torch.log(1.0001 - wrong.max(1).values).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mart_kl_term_is_weighted_by_the_misclassification_confidence():
    x, y = toy_data(8)
    model = tiny_model().eval()
    spec = SPEC.with_(loss="mart", eps=0.3, attack_steps=3)
    torch.manual_seed(0)
    low = robust_loss(model, x, y, spec.with_(beta=0.0))
    torch.manual_seed(0)
    high = robust_loss(model, x, y, spec.with_(beta=50.0))
    assert high > low, "the KL term must add a positive amount once x' differs from x"


def test_loss_fn_and_on_step_hooks_replace_the_loss_and_see_every_step():
    x, y = toy_data(32)
    steps, seen = [], []

    def loss_fn(model, xb, yb, spec):
        seen.append(len(xb))
        return model(xb).pow(2).mean()

    adversarial_train(tiny_model(), x, y, SPEC.with_(epochs=2, batch_size=8), seed=0, device=CPU, loss_fn=loss_fn,
                      on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(i, 8) for i in range(1, 9)]
    assert seen == [8] * 8
