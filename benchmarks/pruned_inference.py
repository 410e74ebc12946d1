"""Does structured pruning make inference faster? Compacted vs dense models, measured side by side.

ResNet18 and VGG16 (CIFAR variants, 32x32x3 inputs) get random structured masks (``filters``,
the engine's local top-k on uniform random unit scores: latency does not depend on weight
values) at 50/75/90% and are physically compacted (:mod:`pytest_advprune.compact`, outputs
verified equal to the masked model's). Per model: parameters, FLOPs of one input
(``FlopCounterMode``), median latency of a batch (the dense and compacted models timed
interleaved, after warm-up, eval mode, no_grad, CUDA synchronised), peak memory of a forward
(CUDA: allocator peak; CPU: the process's peak RSS, once). Masks are drawn per layer, so in a
ResNet residual group a channel goes only where every member's mask drops it: the
``removed %`` column is what was physically removed of the masks' ``filters``.

    python benchmarks/pruned_inference.py [--device auto|cpu|cuda] [--out reports/benchmarks] [--smoke]

Batch 256 on CUDA, 16 on CPU (one thread: ``torch.set_num_threads(1)``, for stable timings on a
shared machine; the JSON records the load average). Writes ``<out>/pruned_inference_<cpu|cuda>.json``; the last printed line is the
headline ratio: ResNet18 at 90% filters, dense over compacted latency (goal on a GPU: >= 4x).
``--smoke`` runs the small CNN at 50/90% with a tiny batch (seconds; used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from pytest_advprune import compact, models
from pytest_advprune.data import DATASETS
from pytest_advprune.session import versions
from pytest_advprune.sparsity import apply_masks, make_masks, measure, structured_layers

STRUCTURE = "filters"


def masked_model(arch: str, dataset: str, sparsity: float, seed: int) -> torch.nn.Module:
    """``arch`` with a random ``filters`` mask of ``sparsity`` (fraction) applied, eval mode, CPU."""
    model = models.build(arch, dataset, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(m.weight.shape[0], generator=gen) for n, m in structured_layers(model, STRUCTURE).items()}
    apply_masks(model, make_masks(model, STRUCTURE, sparsity, scores=scores))
    return model


@torch.no_grad()
def cuda_peak_mib(model: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device) -> float:
    """Allocator peak (MiB) of one forward of a batch, above what was allocated before it."""
    x = torch.rand((batch, *shape), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model.to(device).eval()(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_arch(arch: str, dataset: str, sparsities: list[float], batch: int, device: torch.device, warmup: int,
             repeats: int, seed: int) -> list[dict]:
    info = DATASETS[dataset]
    shape = (info.channels, info.size, info.size)
    dense = models.build(arch, dataset, seed).eval()
    candidates = {"dense": dense}
    rows = {"dense": {"arch": arch, "target": 0.0, "zero_fraction": 0.0, "removed_fraction": 0.0,
                      "params": compact.count_params(dense), "flops": compact.count_flops(dense, shape)}}
    for s in sparsities:
        masked = masked_model(arch, dataset, s, seed)
        t0 = time.perf_counter()
        c = compact.compact(masked, shape)
        key = f"{round(100 * s)}"
        candidates[key] = c.model
        rows[key] = {"arch": arch, "target": s, "zero_fraction": measure(masked, STRUCTURE).sparsity,
                     "removed_fraction": c.removed_fraction(STRUCTURE), "carriers": c.carriers,
                     "max_abs_diff": c.max_abs_diff, "compact_s": time.perf_counter() - t0,
                     "params": compact.count_params(c.model), "flops": compact.count_flops(c.model, shape)}
        print(f"{arch} {key}%: compacted in {rows[key]['compact_s']:.1f} s", flush=True)
    latency = compact.measure_latency(candidates, shape, batch, device, warmup=warmup, repeats=repeats, seed=seed)
    for key, row in rows.items():
        row["latency_ms"] = 1000 * latency[key]
        row["speedup"] = latency["dense"] / latency[key]
        row["peak_mib"] = cuda_peak_mib(candidates[key], shape, batch, device) if device.type == "cuda" else None
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    ap.add_argument("--out", default="reports/benchmarks")
    ap.add_argument("--smoke", action="store_true", help="the small CNN, tiny batch, few repeats (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device not in ("auto", "cpu", "cuda"):
        ap.error(f"--device={args.device}: use auto, cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device=cuda: no CUDA device here; use --device=cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.smoke:
        plan, sparsities, batch, warmup, repeats = [("cnn", "fashion_mnist")], [0.5, 0.9], 4, 1, 3
    else:
        plan, sparsities = [("resnet18", "cifar10"), ("vgg16", "cifar10")], [0.5, 0.75, 0.9]
        batch, warmup, repeats = (256, 10, 50) if device.type == "cuda" else (16, 3, 15)

    rows = []
    for arch, dataset in plan:
        rows += run_arch(arch, dataset, sparsities, batch, device, warmup, repeats, args.seed)
    table = [[r["arch"], f"{100 * r['target']:.0f}", f"{100 * r['removed_fraction']:.1f}", f"{r['params'] / 1e6:.3f}",
              f"{r['flops'] / 1e6:.1f}", f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x",
              "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"] for r in rows]
    print(tabulate(table, ["arch", "filters %", "removed %", "params (M)", "FLOPs (M, 1 input)",
                           f"latency (ms, batch {batch})", "speedup", "peak MiB"], tablefmt="github"))

    head_arch = plan[0][0]
    head = next(r for r in rows if r["arch"] == head_arch and r["target"] == sparsities[-1])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    record = {
        "benchmark": "pruned_inference", "smoke": args.smoke, "structure": STRUCTURE, "masks": "random unit scores, local",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "load_average": os.getloadavg(),
        "batch": batch, "warmup": warmup,
        "repeats": repeats, "seed": args.seed, "versions": versions(), "peak_rss_mib": peak_rss,
        "rows": rows, "headline": {"arch": head_arch, "filters": head["target"], "speedup": head["speedup"]},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pruned_inference_{device.type}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}; process peak RSS {peak_rss:.0f} MiB", file=sys.stderr)
    print(f"headline: {head_arch} at {100 * head['target']:.0f}% filters, compacted vs dense latency: "
          f"{head['speedup']:.2f}x ({device.type}, batch {batch})")


if __name__ == "__main__":
    main()
