"""Flying Bird+ — Chen, Zhang, Liu, Chang, Wang, "Sparsity Winning Twice: Better Robust
Generalization from More Efficient Training", ICLR 2022 (repository
VITA-Group/Sparsity-Win-Robust-Generalization, root ``main_adv.py`` with ``--fbp``, ``sparselearning/core.py``).

Algorithm: Flying Bird (random IGQ sparse init, adversarial training, periodic magnitude-death /
random-growth topology updates with a cosine-decayed death rate; see ``methods/flyingbird.py`` and
:mod:`pytest_advprune.dst`) plus an adaptive capacity rule:
  1. after every update period, measure on a held-out validation slice the robust accuracy and
     robust loss, and on a slice of the training data the robust accuracy; the generalisation gap
     is train minus validation robust accuracy;
  2. from the middle of training on, at each topology update look at the last EPOCH_RANGE = 4
     changes of these records (:func:`fbp_decision`): if the gap rose (> 0) in at least
     UPDATE_THRESHOLD = 0.5 of them, every layer also prunes ceil(r * PRUNE_RATIO * nnz) extra
     weights (PRUNE_RATIO 0.4); if the validation loss did not fall (>= 0) in at least half of them,
     every layer regrows int(GROWTH_RATIO * death) extra weights (GROWTH_RATIO 0.05);
  3. so the network can end sparser than the target; the achieved sparsity is logged.

Facts from the repo: ``scripts/fbp.sh`` runs ``--fbp --dynamic_fre --density 0.2``; defaults
``--dynamic_epoch 100`` (of 200), ``--epoch_range 4``, ``--update_threshold 0.5``, ``--prune_ratio
0.4``, ``--growth_ratio 0.05``; the records are per epoch: the running robust accuracy of the
training batches and PGD-20 robust accuracy/loss on 5k held-out CIFAR-10 training images
(``Masking.get_dst_ratio``, ``Masking.magnitude_death``, ``Masking.random_growth``). The extra
rules are gated on ``args.dynamic_sparse``, which ``main_adv.py`` never defines; we take ``--fbp``
(the Flying Bird+ switch by its help text) as enabling them.

Budget: as Flying Bird, one run of ``ctx.preset.dense_train`` for all ``ctx.budget_epochs`` epochs,
on the training points minus the validation slice.

Deviations, with reasons (Flying Bird's apply too):
  * records are taken at every topology update (every half epoch or 2/3 epoch) instead of every
    epoch, so the 4-change window fits a budget of a few epochs;
  * validation: the last min(VAL_POINTS = 500, n / 10) training points (the repo holds out the last
    10%); the training robust accuracy is measured on the first as many training points, both with
    the preset's training attack in eval mode, instead of the running accuracy of the training
    batches and PGD-20: the same cheap attack on both sides keeps the gap an estimate of
    generalisation alone, at about 1/60 of an epoch per record on the quick preset;
  * the extra growth never lifts a layer above its initial quota, so the density never exceeds the
    target (in the repo growth could; the conformance cell asks for at least the target sparsity).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from pytest_advprune.attacks import pgd
from pytest_advprune.dst import DynamicSparsity
from pytest_advprune.methods.flyingbird import FlyingBird
from pytest_advprune.registry import Method, register

EPOCH_RANGE = 4  # repo --epoch_range: changes looked at
UPDATE_THRESHOLD = 0.5  # repo --update_threshold
PRUNE_RATIO = 0.4  # repo --prune_ratio
GROWTH_RATIO = 0.05  # repo --growth_ratio
VAL_POINTS = 500  # held-out slice; at most a tenth of the training points
EVAL_BATCH = 250


def fbp_decision(gaps: list[float], val_losses: list[float], window: int = EPOCH_RANGE,
                 threshold: float = UPDATE_THRESHOLD) -> tuple[bool, bool]:
    """Flying Bird+'s rule (repo ``Masking.get_dst_ratio``, ``dst_prune``, ``dst_growth``):
    ``(prune extra, grow extra)`` from the last ``window`` changes of the records. Prune if the
    train-minus-validation robust-accuracy gap rose in at least ``threshold`` of them; grow if the
    validation robust loss rose or stayed in at least ``threshold`` of them. No changes: neither."""

    def share(records: list[float], rising) -> bool:
        changes = np.diff(np.asarray(records[-(window + 1):], dtype=float))
        return changes.size > 0 and float(rising(changes).mean()) >= threshold

    return share(gaps, lambda d: d > 0), share(val_losses, lambda d: d >= 0)


def robust_accuracy_and_loss(model, x, y, spec, device) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy on ``(x, y)`` under ``spec``'s training attack
    (PGD with its eps, steps and step size; FGSM-RS for the quick preset), model in eval mode;
    the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), EVAL_BATCH):
        xb, yb = x[i : i + EVAL_BATCH].to(device), y[i : i + EVAL_BATCH].to(device)
        x_adv = pgd(model, xb, yb, spec.eps, spec.step_size * spec.eps, spec.attack_steps)
        with torch.no_grad():
            logits = model(x_adv)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    return correct / len(x), loss / len(x)


class GapMonitor:
    """Flying Bird+'s ``extras``: records the gap and validation loss at every topology update and,
    from the middle of training on, returns the extra ``(prune_ratio, growth_ratio)``."""

    def __init__(self, model, probe, val, spec, device, log):
        self.model, self.probe, self.val, self.spec, self.device, self.log = model, probe, val, spec, device, log
        self.gaps: list[float] = []
        self.val_losses: list[float] = []
        self.prunes = self.grows = 0

    def __call__(self, step: int, total_steps: int) -> tuple[float, float]:
        train_acc, _ = robust_accuracy_and_loss(self.model, *self.probe, self.spec, self.device)
        val_acc, val_loss = robust_accuracy_and_loss(self.model, *self.val, self.spec, self.device)
        self.gaps.append(train_acc - val_acc)
        self.val_losses.append(val_loss)
        if step < total_steps / 2:  # repo --dynamic_epoch 100 of 200
            return 0.0, 0.0
        prune, grow = fbp_decision(self.gaps, self.val_losses)
        self.prunes, self.grows = self.prunes + prune, self.grows + grow
        self.log(f"step {step}: robust acc train {train_acc:.3f} / val {val_acc:.3f}, val loss {val_loss:.3f}; "
                 f"extra prune {prune}, extra growth {grow}")
        return (PRUNE_RATIO if prune else 0.0), (GROWTH_RATIO if grow else 0.0)


@register
class FlyingBirdPlus(Method):
    name = "flyingbird_plus"
    taxonomy = FlyingBird.taxonomy  # the same paper's variant: only the capacity rule is new
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.fresh_model()
        spec = ctx.preset.dense_train.with_(epochs=ctx.budget_epochs)
        x, y = ctx.x_train, ctx.y_train
        n_val = max(1, min(VAL_POINTS, len(x) // 10))
        log = lambda s: ctx.log(f"flyingbird_plus {s}")
        monitor = GapMonitor(model, (x[:n_val], y[:n_val]), (x[-n_val:], y[-n_val:]), spec, ctx.device, log)
        steps_per_epoch = math.ceil((len(x) - n_val) / spec.batch_size)
        dst = DynamicSparsity(model, ctx.sparsity, steps_per_epoch, ctx.seed, log=log, extras=monitor)
        # ctx.train trains on ctx.x_train: narrow it to the points before the validation slice for this call.
        ctx.x_train, ctx.y_train = x[:-n_val], y[:-n_val]
        try:
            ctx.train(model, spec, "flyingbird_plus sparse AT", masks=dst.masks, on_step=dst.on_step)
        finally:
            ctx.x_train, ctx.y_train = x, y
        ctx.log(f"flyingbird_plus: final mask sparsity {dst.sparsity():.4%} (target {ctx.sparsity:.2%}); "
                f"extra prune at {monitor.prunes}, extra growth at {monitor.grows} of {len(monitor.gaps)} updates")
        return model
