"""RST's core steps: frozen signed-constant weights, only the scores trained (BatchNorm affine and biases
frozen too), per-layer top-k, the subnetwork returned as found, the whole budget spent on the search."""

import math

import pytest
import torch
from torch import nn

from pytest_advprune import models, sparsity, training
from pytest_advprune.methods.rst import RST, scratch_ticket, signed_constant_
from tests.method_helpers import tiny_context


def test_signed_constant_weights_are_plus_minus_sqrt_2_over_fan_in_with_the_init_signs():
    model = models.build("cnn", "fashion_mnist", 0)
    init = {n: m.weight.detach().clone() for n, m in sparsity.prunable_layers(model).items()}
    signed_constant_(model)
    for name, layer in sparsity.prunable_layers(model).items():
        w = layer.weight.detach()
        c = math.sqrt(2.0 / w[0].numel())  # conv1: 1*3*3 inputs per filter; fc1: 1568
        assert torch.equal(w.abs(), torch.full_like(w, c)), name
        assert torch.equal(w.sign(), init[name].sign()), name


def test_only_the_scores_train_even_with_batchnorm_and_biases():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
    )
    scores = scratch_ticket(model, 0.5, seed=0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(s) for s in scores}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("scores") and "running" not in k}
    before = [s.detach().clone() for s in scores]
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    spec = training.TrainSpec(epochs=2, lr=0.5, batch_size=16, eps=0.1)
    training.adversarial_train(model, x, y, spec, seed=0, device=torch.device("cpu"))  # every trainable parameter
    assert any(not torch.equal(a, s) for a, s in zip(before, scores)), "scores did not move"
    for key, value in model.state_dict().items():
        if key in frozen and "num_batches" not in key:
            assert torch.equal(value, frozen[key]), f"{key} changed: only scores may train"
    bn = model[1]
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.bias, torch.zeros(4))
    assert not torch.equal(bn.running_mean, torch.zeros(4)), "running statistics still update (non-affine BN does)"


def test_prune_returns_the_signed_constant_init_under_an_exact_per_layer_mask_on_the_whole_budget():
    ctx = tiny_context(sparsity=0.9)
    model = RST().prune(ctx)
    # Reference built the same way, independently: the seeded fresh model's signs times sqrt(2 / fan_in).
    reference = models.build("cnn", "fashion_mnist", ctx.seed)
    for name, ref in sparsity.prunable_layers(reference).items():
        layer = sparsity.prunable_layers(model)[name]
        w, r = layer.weight.detach(), ref.weight.detach()
        expected = torch.where(r >= 0, 1.0, -1.0) * math.sqrt(2.0 / r[0].numel())
        kept = w != 0
        assert int((~kept).sum()) == round(0.9 * w.numel()), f"{name}: not exactly 90% pruned"
        assert torch.equal(w[kept], expected[kept]), f"{name}: a kept weight is not its signed-constant init"
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), f"{name}: bias not the bias-free repo's 0"
    assert ctx.budget() == pytest.approx({"pretrain": 0.0, "method": ctx.budget_epochs, "total": ctx.budget_epochs})
    state = sparsity.dense_state_dict(model)
    assert not any("parametrizations" in k or "scores" in k for k in state)
