"""Adversarial training loops shared by every method, deterministic under a seed.

Losses (``TrainSpec.loss``):
* ``pgd`` — PGD adversarial training, min E[max CE] (Madry et al., ICLR 2018); with one step of
  size 1.25*eps and a random start it is FGSM-RS "fast" adversarial training (Wong et al., ICLR 2020).
* ``trades`` — CE(f(x), y) + beta * KL(p(x) || p(x')) (Zhang et al., ICML 2019, eq. 5), beta = 6.
* ``mart`` — BCE(f(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)) (Wang et al., ICLR 2020, eq. 9), where
  BCE = CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x')); the fine-tuning loss of MAD (beta 0.5 there).

A method with its own objective (e.g. distillation, an ADMM penalty) passes ``loss_fn`` and keeps
the rest of the loop (order, schedule, masks, determinism); ``on_step`` runs after every step.

SGD with momentum, cosine learning-rate decay per step, inputs as tensors resident on the device
(no DataLoader, no per-batch copies), augmentation as batched tensor ops on the device.
Adversarial examples are generated with the model in eval mode, so BatchNorm statistics are
updated only by the training forward pass. On CUDA the loop runs channels_last, under bf16
autocast, with fused SGD and ``torch.compile`` (see :mod:`~pytest_advprune.speed`); on the CPU it
runs the same ops as ever, so CPU results are bit-identical for a seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn
import torch.nn.functional as F

from .attacks import pgd, trades_example
from .data import augment_batch, draw_augmentation
from .sparsity import Masks, MaskEnforcer
from .speed import FastPath, compilable, compile_in_place, has_conv, uncompile, warn_fallback

_AUGMENT_SEED = 7919  # offset of the augmentation generator's seed from the data-order seed


@dataclass(frozen=True)
class TrainSpec:
    """One training phase's budget and loss. ``epochs`` may be fractional (passes over the data);
    ``eps`` in [0, 1] pixel scale; ``step_size`` of the inner attack as a multiple of eps."""

    epochs: float
    lr: float
    batch_size: int = 128
    eps: float = 0.1
    attack_steps: int = 1
    step_size: float = 1.25
    loss: str = "pgd"
    beta: float = 6.0
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def with_(self, **changes) -> "TrainSpec":
        return replace(self, **changes)

    def label(self) -> str:
        kind = "FGSM-RS" if self.attack_steps == 1 and self.loss == "pgd" else f"{self.loss.upper()}-{self.attack_steps}"
        return f"{kind} {self.epochs:g} ep, lr {self.lr:g}, bs {self.batch_size}"


def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> torch.Tensor:
    """The adversarial training loss of ``spec.loss`` on one batch (a scalar with its graph).

    The inner attack runs with the model in eval mode; the training forward in the caller's mode.
    Raises ValueError for an unknown loss name.
    """
    was_training = model.training
    model.eval()
    alpha = spec.step_size * spec.eps
    if spec.loss == "pgd":
        x_adv = pgd(model, x, y, spec.eps, alpha, spec.attack_steps, random_start=True)
        model.train(was_training)
        return F.cross_entropy(model(x_adv), y)
    if spec.loss == "trades":
        x_adv = trades_example(model, x, spec.eps, alpha, spec.attack_steps)
        model.train(was_training)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + spec.beta * kl
    if spec.loss == "mart":
        x_adv = pgd(model, x, y, spec.eps, alpha, spec.attack_steps, random_start=True)
        model.train(was_training)
        logits_adv, logits = model(x_adv), model(x)
        p_adv, p_nat = F.softmax(logits_adv, dim=1), F.softmax(logits, dim=1)
        wrong = p_adv.scatter(1, y[:, None], -1.0).max(dim=1).values
        bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - wrong).mean()
        kl = (p_nat * (torch.log(p_nat + 1e-12) - F.log_softmax(logits_adv, dim=1))).sum(dim=1)
        true_p = p_nat.gather(1, y[:, None]).squeeze(1)
        return bce + spec.beta * (kl * (1.0 - true_p)).mean()
    raise ValueError(f"unknown training loss {spec.loss!r}; use 'pgd', 'trades' or 'mart'")


def adversarial_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    seed: int,
    device: torch.device,
    params: Iterable[nn.Parameter] | None = None,
    masks: Masks | None = None,
    log: Callable[[str], None] = lambda s: None,
    desc: str = "train",
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainSpec], torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    augment: str = "none",
    fast: FastPath | None = None,
) -> list[float]:
    """Train ``model`` in place with the adversarial loss of ``spec`` on ``(x, y)``.

    ``params`` (default: every parameter with ``requires_grad``) are the ones optimised, so a
    method can train only scores or only weights. ``masks`` keep pruned weights exactly zero
    through every step (see :class:`~pytest_advprune.sparsity.MaskEnforcer`). ``loss_fn(model, xb,
    yb, spec)`` replaces :func:`robust_loss`; ``on_step(step, total_steps)`` is called after every
    optimiser step (1-based ``step``). ``x`` is ``[N, C, H, W]`` in [0, 1]. ``augment`` is a kind of
    :data:`~pytest_advprune.data.AUGMENTATIONS` applied to every batch on the device (its draws come
    from their own generator, so the data order is the same with or without it). ``fast`` defaults
    to :meth:`FastPath.for_device` (see :mod:`~pytest_advprune.speed`: nothing on the CPU).
    Returns the mean loss of every epoch; logs one line per epoch.
    Raises FloatingPointError if the loss becomes NaN or inf.
    """
    fast = fast or FastPath.for_device(device)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + _AUGMENT_SEED)
    torch.manual_seed(seed)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    model.to(device)
    channels_last = fast.channels_last and has_conv(model)
    if channels_last:  # before the optimiser exists, so its state takes the same layout
        model.to(memory_format=torch.channels_last)
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                          **({"fused": True} if fast.fused_sgd else {}))
    n = len(x)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total_steps = max(1, math.ceil(spec.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    model.train()
    enforcer = MaskEnforcer(opt, model, masks) if masks else None
    x, y = x.to(device), y.to(device)  # resident for the whole phase; a no-op on the CPU
    compiled = fast.compile and compilable(model)
    if compiled:
        compile_in_place(model)
    loss_of = loss_fn or robust_loss
    epoch_losses: list[float] = []
    step, epoch = 0, 0
    t0 = time.perf_counter()
    try:
        while step < total_steps:
            order = torch.randperm(n, generator=gen).to(device)
            aug = draw_augmentation(augment, n, aug_gen)
            aug = aug.to(device) if aug is not None else None
            running, count = torch.zeros((), device=device), 0
            for i in range(0, n, spec.batch_size):
                if step >= total_steps:
                    break
                idx = order[i : i + spec.batch_size]
                xb, yb = x[idx], y[idx]
                if aug is not None:
                    xb = augment_batch(xb, aug[i : i + spec.batch_size])
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                try:
                    with fast.autocast_region(device):
                        loss = loss_of(model, xb, yb, spec)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                except Exception as exc:
                    if not (compiled and step == 0):
                        raise
                    warn_fallback(desc, exc)  # the failed step changed no weight; redo it eagerly
                    uncompile(model)
                    compiled = False
                    with fast.autocast_region(device):
                        loss = loss_of(model, xb, yb, spec)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
                running += loss.detach()
                count += 1
                step += 1
                if on_step is not None:
                    on_step(step, total_steps)
            epoch += 1
            mean = float(running) / max(count, 1)  # the loop's one host-device sync per epoch
            if not math.isfinite(mean):
                raise FloatingPointError(f"{desc}: training loss became {mean} in epoch {epoch}; lower the learning rate")
            epoch_losses.append(mean)
            log(f"{desc}: epoch {epoch}/{math.ceil(spec.epochs)} loss {mean:.4f} ({time.perf_counter() - t0:.0f}s)")
    finally:
        if enforcer is not None:
            enforcer.remove()
        if compiled:
            uncompile(model)
        if channels_last:  # hand back the default layout (safetensors and methods expect contiguous weights)
            model.to(memory_format=torch.contiguous_format)
    model.eval()
    return epoch_losses
