"""PwoA's core steps: no adversarial example anywhere, self-distillation from the frozen dense
teacher, ADMM pruning, normalised HSIC terms in retraining."""

import types

import pytest
import torch
import torch.nn.functional as F

from pytest_advprune import attacks, sparsity, training
from pytest_advprune.methods import pwoa
from pytest_advprune.methods.pwoa import PwoA, distillation_loss, hsic_operator, normalized_hsic
from tests.method_helpers import tiny_context


def test_prune_meets_the_target_in_every_layer_for_weights_and_filters():
    for structure, target in (("weights", 0.9), ("filters", 0.5)):
        model = PwoA().prune(tiny_context(structure=structure, sparsity=target))
        report = sparsity.measure(model, structure)
        for name, (zeros, total) in report.per_layer.items():
            assert abs(zeros - target * total) <= 0.5, (structure, name)


def test_no_adversarial_example_is_ever_made(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("PwoA must not generate adversarial examples")

    for module in (attacks, training):
        monkeypatch.setattr(module, "pgd", forbidden)
        monkeypatch.setattr(module, "trades_example", forbidden)
    monkeypatch.setattr(training, "robust_loss", forbidden)
    PwoA().prune(tiny_context(sparsity=0.8))


def test_distillation_matches_kl_of_teacher_to_student_with_mean_reduction():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    p_t, p_s = F.softmax(t / pwoa.TAU, 1), F.softmax(s / pwoa.TAU, 1)
    kl_mean = (p_t * (p_t.log() - p_s.log())).sum() / p_t.numel()
    assert distillation_loss(s, t) == pytest.approx(float(pwoa.ALPHA * pwoa.TAU**2 * kl_mean), rel=1e-4)
    assert distillation_loss(t, t) == pytest.approx(0.0, abs=1e-6)


def test_teacher_stays_frozen_and_student_moves(monkeypatch):
    ctx = tiny_context(sparsity=0.8)
    before = {k: v.clone() for k, v in ctx.dense.state_dict().items()}
    teachers = []
    real_deepcopy = pwoa.copy.deepcopy
    monkeypatch.setattr(pwoa, "copy", types.SimpleNamespace(deepcopy=lambda m: teachers.append(real_deepcopy(m)) or teachers[-1]))
    student = PwoA().prune(ctx)
    (teacher,) = teachers
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(before["fc2.weight"], student.state_dict()["fc2.weight"])


def test_normalized_hsic_is_high_for_dependent_and_low_for_independent_samples():
    # Low-dimensional samples: the Gaussian kernel's spectrum decays, so the normalised HSIC
    # separates dependence from independence (in high dimension it saturates near m - 1).
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, generator=gen)
    same = normalized_hsic(hsic_operator(x), hsic_operator(2 * x + 1))
    independent = normalized_hsic(hsic_operator(x), hsic_operator(torch.rand(64, 2, generator=gen)))
    assert same > 10 * independent
    y = F.one_hot(torch.arange(64) % 4, 4)
    r_y = hsic_operator(y, gaussian=False)
    assert normalized_hsic(hsic_operator(y.float() * 3), r_y) > 10 * normalized_hsic(hsic_operator(x), r_y)


def test_retraining_adds_the_hsic_terms(monkeypatch):
    calls = []
    real = pwoa.normalized_hsic
    monkeypatch.setattr(pwoa, "normalized_hsic", lambda a, b: calls.append(1) or real(a, b))
    PwoA().prune(tiny_context(sparsity=0.8))
    hidden_layers = len(sparsity.prunable_layers(tiny_context().dense)) - 1
    assert calls and len(calls) % (2 * hidden_layers) == 0
