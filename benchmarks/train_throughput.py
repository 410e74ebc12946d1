"""PGD-10 adversarial-training throughput: our engine vs a reference loop, side by side.

The reference is written in the style of the AP methods' public training code: a torch
``DataLoader`` over a ``TensorDataset`` (shuffled, no workers), a ``.to(device)`` copy of every
batch, fp32, the default memory format, plain ``torch.optim.SGD``, a PGD loop of its own, and a
``loss.item()`` per batch for the running average. Ours is
:func:`pytest_advprune.training.adversarial_train` with the device's default
:class:`~pytest_advprune.speed.FastPath` (on CUDA: resident data, on-device crop/flip,
channels_last, bf16 autocast, fused SGD, torch.compile; on the CPU: the same ops as the reference,
minus the DataLoader). Both train the same architecture from the same initial weights on the same
random data (images in [0, 1]; throughput does not depend on the pixels) with PGD-10 (eps 8/255,
step 2/255, random start) and the preset's SGD settings.

Models: ResNet18 (CIFAR variant, 32x32x3) always; on the CPU also the small CNN on
Fashion-MNIST-shaped data (28x28x1), with small batch counts since ResNet18 on a CPU is slow.
Each engine runs once untimed (warm-up: cuDNN autotuning, compilation; its seconds are reported),
then timed rounds alternate between the two engines and the fastest round gives images/s. On the CPU
a ``torch.profiler`` summary of one step of our engine says what bounds it.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--archs cnn,resnet18] [--out DIR] [--smoke]

Writes ``<out>/train_throughput_<cpu|cuda>.json``; the last printed line is the headline ratio
(images/s of ours over the reference's, on ResNet18 on a GPU, on the small CNN on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.data import DataLoader, TensorDataset

from pytest_advprune import data, models
from pytest_advprune.session import versions
from pytest_advprune.speed import FastPath, peak_memory_mib, synchronize
from pytest_advprune.training import TrainSpec, adversarial_train

EPS = 8 / 255
SPEC = TrainSpec(epochs=1, lr=0.1, batch_size=128, eps=EPS, attack_steps=10, step_size=0.25, weight_decay=5e-4)


def reference_pgd(model, x, y, eps, alpha, steps):
    """PGD as the methods' public code writes it: uniform start, signed gradient, clip to the ball and [0, 1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def reference_train(model, x, y, spec: TrainSpec, device: torch.device, steps: int) -> float:
    """``steps`` steps of the reference loop (see module docstring); returns the mean loss."""
    loader = DataLoader(TensorDataset(x, y), batch_size=spec.batch_size, shuffle=True, num_workers=0,
                        pin_memory=device.type == "cuda")
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    total, done = 0.0, 0
    for xb, yb in loader:
        if done >= steps:
            break
        xb, yb = xb.to(device), yb.to(device)
        model.eval()
        x_adv = reference_pgd(model, xb, yb, spec.eps, spec.step_size * spec.eps, spec.attack_steps)
        model.train()
        loss = F.cross_entropy(model(x_adv), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        done += 1
    return total / max(done, 1)


def ours_train(model, x, y, spec: TrainSpec, device: torch.device, steps: int, augment: str) -> float:
    """``steps`` steps of :func:`adversarial_train` with the device's default fast path."""
    losses = adversarial_train(model, x, y, spec.with_(epochs=steps * spec.batch_size / len(x)), seed=0,
                               device=device, augment=augment)
    return losses[-1]


def measure(arch: str, dataset: str, batch: int, steps: int, attack_steps: int, repeats: int,
            device: torch.device) -> dict[str, dict]:
    """Both engines on fresh weights of ``arch``: one untimed warm-up run each, then ``repeats``
    rounds that time ``steps`` steps of the reference and of ours, alternating (so a busy
    machine slows both alike); images/s from each engine's fastest round (as ``timeit`` does:
    other load only ever adds time). Counts training images, each with
    its ``attack_steps``-step attack."""
    info = data.DATASETS[dataset]
    gen = torch.Generator().manual_seed(0)
    n = batch * steps
    x = torch.rand(n, info.channels, info.size, info.size, generator=gen)
    y = torch.randint(0, info.n_classes, (n,), generator=gen)
    spec = SPEC.with_(batch_size=batch, attack_steps=attack_steps)
    runs = {"reference": lambda m, k: reference_train(m, x, y, spec, device, k),
            "ours": lambda m, k: ours_train(m, x, y, spec, device, k, info.augment)}
    out = {}
    for engine, run in runs.items():
        t0 = time.perf_counter()
        run(models.build(arch, dataset, 0), min(2, steps))
        synchronize(device)
        out[engine] = {"engine": engine, "arch": arch, "data": f"{dataset}-shaped {info.channels}x{info.size}x{info.size}",
                       "batch": batch, "steps": steps, "attack_steps": attack_steps, "warmup_s": time.perf_counter() - t0,
                       "rounds_s": [], "peak_mib": 0.0}
    for _ in range(repeats):
        for engine, run in runs.items():
            model = models.build(arch, dataset, 0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            loss = run(model, steps)
            synchronize(device)
            r = out[engine]
            r["rounds_s"].append(time.perf_counter() - t0)
            r["peak_mib"] = max(r["peak_mib"], peak_memory_mib(device))
            r["last_loss"] = loss if math.isfinite(loss) else None
    for r in out.values():
        r["seconds"] = min(r["rounds_s"])
        r["images_per_s"] = n / r["seconds"]
    return out


def cpu_profile(arch: str, dataset: str, batch: int, attack_steps: int, top: int = 8) -> list[dict]:
    """Self CPU time of the top ops over one step of our engine (what bounds it on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    info = data.DATASETS[dataset]
    x = torch.rand(batch, info.channels, info.size, info.size)
    y = torch.randint(0, info.n_classes, (batch,))
    model = models.build(arch, dataset, 0)
    spec = SPEC.with_(batch_size=batch, attack_steps=attack_steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        adversarial_train(model, x, y, spec, seed=0, device=torch.device("cpu"), augment=info.augment,
                          fast=FastPath())
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count}
            for e in events[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default="reports/benchmarks")
    ap.add_argument("--smoke", action="store_true", help="seconds-long tiny run (the test suite's)")
    ap.add_argument("--archs", default="cnn,resnet18", help="architectures to measure (CPU: cnn, resnet18)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.smoke:
        configs = [("cnn", "fashion_mnist", 16, 2, 2, 1)]
    elif device.type == "cuda":
        configs = [("resnet18", "cifar10", 128, 40, 10, 3), ("resnet18", "cifar10", 512, 20, 10, 3)]
    else:
        configs = [("cnn", "fashion_mnist", 128, 4, 10, 3), ("resnet18", "cifar10", 8, 1, 10, 2)]
    configs = [c for c in configs if c[0] in args.archs.split(",")] or configs
    results, rows, ratios = [], [], {}
    for arch, dataset, batch, steps, attack_steps, repeats in configs:
        pair = measure(arch, dataset, batch, steps, attack_steps, repeats, device)
        for engine, r in pair.items():
            results.append(r)
            rows.append([arch, r["data"], batch, f"PGD-{attack_steps}", engine, f"{r['images_per_s']:.1f}",
                         f"{r['seconds']:.2f}", f"{r['warmup_s']:.2f}", f"{r['peak_mib']:.0f}"])
            print(f"{arch} bs {batch} {engine}: {r['images_per_s']:.1f} images/s (rounds {r['rounds_s']})", flush=True)
        ratios[f"{arch} bs {batch}"] = pair["ours"]["images_per_s"] / pair["reference"]["images_per_s"]
    record = {"benchmark": "train_throughput", "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "smoke": args.smoke, "versions": versions(),
              "fast_path": repr(FastPath.for_device(device)), "results": results, "ratios": ratios,
              "peak_memory_note": "CUDA: max_memory_allocated per engine run; CPU: process peak RSS so far (MiB)"}
    if device.type == "cpu":
        arch, dataset, batch, _, attack_steps, _ = configs[0]
        record["cpu_profile"] = {"what": f"one step of ours, {arch} bs {batch}, PGD-{attack_steps}",
                                 "top_ops": cpu_profile(arch, dataset, batch, attack_steps)}
    print(tabulate(rows, headers=["model", "data", "batch", "attack", "engine", "images/s", "best s", "warm-up s",
                                  "peak MiB"], tablefmt="github"))
    if device.type == "cpu":
        print("CPU profile of ours (self time): " + ", ".join(
            f"{o['op']} {o['self_cpu_pct']}%" for o in record["cpu_profile"]["top_ops"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput_{device.type}.json").write_text(json.dumps(record, indent=2))
    head = next(iter(ratios))
    print(f"headline: ours / reference = {ratios[head]:.2f}x images/s ({head}, PGD-{configs[0][4]} training, {device.type})")


if __name__ == "__main__":
    main()
