"""The fast engine: on-device augmentation, CPU bit-identity of the training loop, GPU-only switches,
compile fallbacks, thread settings, and the two speed benchmarks' ``--smoke`` runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pytest_advprune import speed, training
from pytest_advprune.errors import BadOption
from pytest_advprune.data import AUGMENTATIONS, augment_batch, draw_augmentation
from pytest_advprune.models import build
from pytest_advprune.presets import SMOKE
from pytest_advprune.sparsity import apply_masks, make_masks, prunable_layers
from pytest_advprune.speed import FastPath, configure_threads, prepare_for_eval
from pytest_advprune.training import adversarial_train, robust_loss

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ augmentation


def _crop_flip_one(img: torch.Tensor, row: int, col: int, flip: int, pad: int) -> torch.Tensor:
    """What torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip do to one image."""
    h, w = img.shape[-2:]
    out = F.pad(img, (pad, pad, pad, pad))[:, row : row + h, col : col + w]
    return out.flip(-1) if flip else out


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_augment_batch_is_per_image_crop_then_flip(b, c, h, w, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=gen)
    params = draw_augmentation("crop+flip", b, gen, padding=pad)
    out = augment_batch(x, params, padding=pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(b):
        row, col, flip = params[i].tolist()
        assert torch.equal(out[i], _crop_flip_one(x[i], row, col, flip, pad))


def test_augment_batch_known_values():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # offset (1, 0) with padding 1: one row up, one column of zero padding on the left
    shifted = augment_batch(x, torch.tensor([[1, 0, 0]]), padding=1)
    assert torch.equal(shifted[0, 0, :, 0], torch.zeros(4)) and torch.equal(shifted[0, 0, :, 1:], x[0, 0, :, :3])
    flipped = augment_batch(x, torch.tensor([[1, 1, 1]]), padding=1)  # centre window, mirrored
    assert torch.equal(flipped, x.flip(-1))


def test_draw_augmentation_ranges_and_seed():
    a = draw_augmentation("crop+flip", 1000, torch.Generator().manual_seed(3))
    b = draw_augmentation("crop+flip", 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1000, 3) and a.dtype == torch.long
    assert int(a[:, :2].min()) == 0 and int(a[:, :2].max()) == 8 and set(a[:, 2].tolist()) == {0, 1}
    crop = draw_augmentation("crop", 100, torch.Generator().manual_seed(3))
    assert not crop[:, 2].any()
    assert draw_augmentation("none", 100, torch.Generator()) is None
    with pytest.raises(ValueError, match="crop\\+flip"):
        draw_augmentation("cutout", 10, torch.Generator())
    assert AUGMENTATIONS == ("none", "crop", "crop+flip")


def test_augmentation_keeps_the_data_order():
    """The augmentation draws come from their own generator: with it on, every batch holds the
    same images (before the crop) as with it off."""
    seen = {}

    def record(kind):
        def loss_fn(model, xb, yb, spec):
            seen.setdefault(kind, []).append(yb.clone())
            return model(xb).sum() * 0
        return loss_fn

    x, y = torch.rand(20, 1, 8, 8), torch.arange(20)
    for kind in ("none", "crop+flip"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        adversarial_train(model, x, y, SMOKE.dense_train.with_(epochs=2, batch_size=6), seed=1,
                          device=torch.device("cpu"), loss_fn=record(kind), augment=kind)
    assert all(torch.equal(a, b) for a, b in zip(seen["none"], seen["crop+flip"]))


# ------------------------------------------------------------------ CPU bit-identity


def _reference_loop(model, x, y, spec, seed, masks=None, on_step=None):
    """The training loop as it was before the fast engine (commit d5b971d), written out plainly:
    CPU generator for the order, per-batch copies, SGD (for-loop), cosine LambdaLR per step, mask
    and momentum multiplied after every step one tensor at a time."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    n = len(x)
    total_steps = max(1, math.ceil(spec.epochs * math.ceil(n / spec.batch_size)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    model.train()
    layers = prunable_layers(model)
    pairs = [(layers[k].weight, m) for k, m in (masks or {}).items()]
    if masks:
        apply_masks(model, masks)
    losses, step = [], 0
    while step < total_steps:
        order = torch.randperm(n, generator=gen)
        running, count = torch.zeros(()), 0
        for i in range(0, n, spec.batch_size):
            if step >= total_steps:
                break
            idx = order[i : i + spec.batch_size]
            loss = robust_loss(model, x[idx].to("cpu"), y[idx].to("cpu"), spec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for w, m in pairs:
                    w.mul_(m)
                    opt.state[w]["momentum_buffer"].mul_(m)
            sched.step()
            running += loss.detach()
            count += 1
            step += 1
            if on_step is not None:
                on_step(step, total_steps)
        losses.append(float(running) / max(count, 1))
    model.eval()
    return losses


@pytest.mark.parametrize("loss", ["pgd", "trades"])
def test_cpu_training_is_bit_identical_to_the_reference_loop(loss):
    """The smoke preset's CNN and training spec (a pruned fine-tune with masks, partial last
    batch, 1.5 epochs): every parameter, buffer and epoch loss equal bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    spec = SMOKE.finetune.with_(epochs=1.5, loss=loss, attack_steps=2)
    models, losses, steps = [], [], []
    for run in ("reference", "engine"):
        model = build("cnn", "fashion_mnist", 0)
        masks = make_masks(model, "weights", 0.5)
        calls = []
        if run == "reference":
            losses.append(_reference_loop(model, x, y, spec, seed=5, masks=masks, on_step=lambda s, t: calls.append(s)))
        else:
            losses.append(adversarial_train(model, x, y, spec, seed=5, device=torch.device("cpu"), masks=masks,
                                            on_step=lambda s, t: calls.append(s), augment="none"))
        models.append(model.state_dict())
        steps.append(calls)
    assert losses[0] == losses[1] and steps[0] == steps[1] == list(range(1, 4))
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k


# ------------------------------------------------------------------ device switches


def test_gpu_only_switches_are_off_on_cpu(monkeypatch):
    monkeypatch.delenv(speed.COMPILE_ENV, raising=False)
    assert FastPath.for_device("cpu") == FastPath()
    cuda = FastPath.for_device("cuda")  # only the device type is read: no GPU needed
    assert cuda.channels_last and cuda.fused_sgd and cuda.compile and cuda.cudnn_benchmark
    assert cuda.for_eval().autocast is None
    monkeypatch.setenv(speed.COMPILE_ENV, "1")
    assert FastPath.for_device("cpu").compile
    monkeypatch.setenv(speed.COMPILE_ENV, "0")
    assert not FastPath.for_device("cuda").compile
    monkeypatch.setenv(speed.COMPILE_ENV, "maybe")
    with pytest.raises(BadOption, match="use auto, 0 or 1"):
        FastPath.for_device("cpu")


def test_cuda_features_run_on_cpu_and_leave_the_model_as_found():
    """channels_last + bf16 autocast (the CUDA path) exercised on the CPU: finite losses, masks
    kept exact, and the model handed back in the default memory format, not compiled."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    model = build("cnn", "cifar10", 0)
    masks = make_masks(model, "filters", 0.5)
    fast = FastPath(channels_last=True, autocast=torch.bfloat16)
    losses = adversarial_train(model, x, y, SMOKE.finetune.with_(epochs=1, batch_size=32), seed=0,
                               device=torch.device("cpu"), masks=masks, augment="crop+flip", fast=fast)
    assert all(math.isfinite(v) for v in losses)
    for name, layer in prunable_layers(model).items():
        assert layer.weight.is_contiguous() and layer.weight.dtype == torch.float32
        if name in masks:
            assert torch.equal(layer.weight * (1 - masks[name]), torch.zeros_like(layer.weight))
    assert model._compiled_call_impl is None and not model.training


def _broken_compile(model):
    def boom(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")
    model._compiled_call_impl = boom


def test_training_compile_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(training, "compile_in_place", _broken_compile)
    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    model = build("cnn", "fashion_mnist", 0)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed for fine-tune \(RuntimeError: inductor exploded\)") as rec:
        losses = adversarial_train(model, x, y, SMOKE.finetune.with_(epochs=1, batch_size=20), seed=0,
                                   device=torch.device("cpu"), fast=FastPath(compile=True), desc="fine-tune")
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(losses) == 1 and math.isfinite(losses[0]) and model._compiled_call_impl is None


def test_prepare_for_eval_cpu_is_the_model_itself():
    model = build("cnn", "fashion_mnist", 0).train()
    assert prepare_for_eval(model, torch.device("cpu")) is model and not model.training


def test_prepare_for_eval_channels_last_copy_and_compile_fallback(monkeypatch):
    model = build("cnn", "fashion_mnist", 0)
    fast = FastPath(channels_last=True, compile=True, autocast=torch.bfloat16)

    def broken(m):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3))  # fails on the probe

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.rand(4, 1, 28, 28)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for the evaluated model"):
        fast_model = prepare_for_eval(model, torch.device("cpu"), probe=x, fast=fast)
    assert fast_model is not model and model.conv1.weight.is_contiguous()
    assert fast_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast_model(x), model(x), atol=1e-5)


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads({"PYTEST_XDIST_WORKER_COUNT": "8"}) == before  # unset: torch's default kept
        assert configure_threads({"ADVPRUNE_THREADS": "auto", "OMP_NUM_THREADS": "1",
                                  "PYTEST_XDIST_WORKER_COUNT": "8"}) == before
        monkeypatch.setattr(speed, "_DEFAULT_THREADS", 8)
        assert configure_threads({"ADVPRUNE_THREADS": "auto", "PYTEST_XDIST_WORKER_COUNT": "4"}) == 2 == torch.get_num_threads()
        assert configure_threads({"ADVPRUNE_THREADS": "auto", "PYTEST_XDIST_WORKER_COUNT": "16"}) == 1
        assert configure_threads({"ADVPRUNE_THREADS": "auto"}) == 8 == torch.get_num_threads()
        assert configure_threads({"ADVPRUNE_THREADS": "3"}) == 3 == torch.get_num_threads()
        with pytest.raises(BadOption, match="positive integer or auto"):
            configure_threads({"ADVPRUNE_THREADS": "0"})
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ benchmark scripts


@pytest.mark.parametrize("script", ["train_throughput", "eval_autoattack"])
def test_benchmark_smoke(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / f"{script}_cpu.json").read_text())
    assert record["device"] == "cpu" and "torch" in record["versions"] and record["smoke"] is True
    assert "x" in proc.stdout.strip().splitlines()[-1]  # headline ratio last
