"""R-ADMM's core steps: the ADMM phase trains on the adversarial loss plus the penalty, then a
hard prune meets the target in every layer and masked retraining keeps it."""

import torch

from pytest_advprune import sparsity, training
from pytest_advprune.methods import radmm
from pytest_advprune.methods.radmm import RADMM
from tests.method_helpers import tiny_context


def test_prune_meets_the_target_in_every_layer_for_weights_and_filters():
    for structure, target in (("weights", 0.9), ("filters", 0.5)):
        model = RADMM().prune(tiny_context(structure=structure, sparsity=target))
        report = sparsity.measure(model, structure)
        for name, (zeros, total) in report.per_layer.items():
            assert abs(zeros - target * total) <= 0.5, (structure, name)


def test_admm_phase_uses_the_adversarial_loss_plus_the_penalty(monkeypatch):
    seen = []
    real = training.robust_loss

    def spy(model, x, y, spec):
        seen.append(spec.loss)
        return real(model, x, y, spec)

    monkeypatch.setattr(radmm, "robust_loss", spy)
    penalties = []
    real_penalty = radmm.ADMM.penalty
    monkeypatch.setattr(radmm.ADMM, "penalty", lambda self: penalties.append(self.rho) or real_penalty(self))
    RADMM().prune(tiny_context(sparsity=0.8))
    assert seen and set(seen) == {"pgd"}
    assert len(penalties) == len(seen), "every ADMM step must add the penalty"
    assert sorted(set(penalties)) == sorted(set(penalties), key=lambda r: r) and len(set(penalties)) == radmm.UPDATES


def test_admm_moves_the_weights_toward_the_sparse_set():
    # With the penalty, the weights that the final hard prune removes shrink relative to the kept
    # ones, compared with the same training without ADMM: the constraint is being enforced.
    ctx = tiny_context(sparsity=0.9, n=512, epochs=4.0)
    dense = {n: m.weight.detach().clone() for n, m in sparsity.prunable_layers(ctx.dense).items()}
    admm = radmm.ADMM(ctx.dense, "weights", 0.9, rho=0.5, growth=1.0)
    for k in range(4):
        ctx.train(ctx.dense, ctx.preset.prune_train.with_(epochs=1.0), "admm", part=k,
                  loss_fn=lambda m, x, y, s: training.robust_loss(m, x, y, s) + admm.penalty())
        admm.update()
    pruned = admm.hard_prune_masks()
    fc1 = sparsity.prunable_layers(ctx.dense)["fc1"].weight.detach()
    removed = pruned["fc1"] == 0
    shrink = fc1[removed].norm() / dense["fc1"][removed].norm()
    assert shrink < 0.5, f"pruned weights kept {shrink:.0%} of their norm: the penalty did not pull them to zero"


def test_retrain_keeps_pruned_weights_at_zero():
    model = RADMM().prune(tiny_context(sparsity=0.9))
    masks = sparsity.masks_from_model(model)
    assert all(int((m == 0).sum()) > 0 for m in masks.values())
    assert not any("parametrizations" in k for k in sparsity.dense_state_dict(model))
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
