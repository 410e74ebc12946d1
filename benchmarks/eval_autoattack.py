"""AutoAttack standard: our evaluation path vs the survey's reference call, side by side.

Same robust model, same points, same seed and batch size, both AutoAttack standard (APGD-CE,
APGD-T, FAB-T, Square; Linf). The reference is the survey's call (``utils/test.py`` of the
Adversarial Pruning Benchmark): ``AutoAttack(model, norm='Linf', eps, version='standard')
.run_standard_evaluation(x, y, bs=500)`` on the fp32 model in eval mode, default memory format
(pyautoattack spells ``bs`` as ``batch_size``; the seed is fixed here, the survey leaves it to the
clock). Ours is :func:`pytest_advprune.attacks.run_autoattack` on the model from
:func:`pytest_advprune.speed.prepare_for_eval` (on CUDA a channels_last, compiled copy; on the
CPU the model itself), which runs the cascade one attack at a time to keep per-attack flags.
The goal on a GPU: the same robust accuracy (within 0.2 points) at >= 2x the speed.

The model is the preset's cached dense model, read from a temporary copy of the cache's
``dense/`` folder (this script never trains and never writes to the cache; build the model first
with ``pytest --advprune-method=dense --advprune-preset=P``). Default: ``quick`` on the CPU with its
first 200 test points (AutoAttack standard is slow on a CPU), ``cifar10`` on CUDA with all of the
preset's points. ``--smoke`` attacks an untrained small CNN on 8 random images (seconds).

    python benchmarks/eval_autoattack.py [--device auto|cpu|cuda] [--preset P] [--n-points N]
                                         [--cache-dir DIR] [--out DIR] [--smoke]

Writes ``<out>/eval_autoattack_<cpu|cuda>.json``; the last printed line is the headline: the
speed ratio (reference seconds / ours: wall time on CUDA, this process's CPU time on a CPU, which
other load on a shared machine does not inflate) and the robust-accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from pytest_advprune import models, presets, registry
from pytest_advprune.attacks import AutoAttackSpec, run_autoattack
from pytest_advprune.cache import default_dir
from pytest_advprune.session import AdvPruneSession, RunConfig, versions
from pytest_advprune.speed import FastPath, peak_memory_mib, prepare_for_eval, synchronize


def reference(model, x, y, eps, seed, batch_size, device) -> tuple[torch.Tensor, float, float]:
    """The survey's call; returns per-point robustness (bool ``[N]``, CPU), wall seconds and this
    process's CPU seconds (on a shared CPU the fair measure, since other load only adds wall time)."""
    from pyautoattack import AutoAttack

    model = model.to(device).eval()
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    _, y_adv = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    synchronize(device)
    return (y_adv.cpu() == y), time.perf_counter() - t0, time.process_time() - c0


def ours(model, x, y, eps, seed, batch_size, device) -> tuple[torch.Tensor, float, float, dict[str, float]]:
    """Our evaluation path; returns per-point robustness, wall and CPU seconds (preparation
    included) and the wall seconds spent in each attack of the cascade."""
    starts: list[tuple[str, float]] = []
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fast_model = prepare_for_eval(model, device, probe=x[:batch_size])
    out = run_autoattack(fast_model, x, y, eps, AutoAttackSpec(version="standard"), seed, batch_size, device,
                         log=lambda s: starts.append((s.split()[0], time.perf_counter())))
    synchronize(device)
    end, cpu_s = time.perf_counter(), time.process_time() - c0
    per_attack = {name: (starts[i + 1][1] if i + 1 < len(starts) else end) - t for i, (name, t) in enumerate(starts)}
    return out.flags_after["square"], end - t0, cpu_s, per_attack


def cpu_profile(model, x, y, eps, seed, top: int = 8) -> dict:
    """Self CPU time of the top ops while Square (the cascade's longest attack on the CPU) runs
    200 queries on ``x``: what bounds AutoAttack on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    spec = AutoAttackSpec(version="custom", attacks=("square",), square_queries=200)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_autoattack(model, x, y, eps, spec, seed, len(x), torch.device("cpu"))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {"what": f"Square, 200 queries, {len(x)} points",
            "top_ops": [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count}
                        for e in events[:top]]}


def load_model(preset, cache_dir: Path, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The preset's cached dense model and its evaluation points, read from a temporary copy of the cache."""
    src = cache_dir / "dense"
    with tempfile.TemporaryDirectory(prefix="advprune-bench-") as tmp:
        if src.is_dir():
            shutil.copytree(src, Path(tmp) / "dense", ignore=shutil.ignore_patterns("*.lock"))
        registry.load_builtin()
        session = AdvPruneSession(RunConfig(preset, ["dense"], device=device.type, cache_dir=tmp))
        arch = preset.archs[0]
        load_or_build = session.cache.state

        def load_only(kind, key, build):  # a missing model is an error here, never hours of training
            def refuse():
                raise SystemExit(f"no cached dense {arch} for preset {preset.name} in {cache_dir}; build it first with "
                                 f"`pytest --advprune-method=dense --advprune-preset={preset.name}`")
            return load_or_build(kind, key, refuse)

        session.cache.state = load_only
        model = session.dense_model(arch)
        x, y = session._split(False)
    return model, x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", default=None, help="default: quick on the CPU, cifar10 on CUDA")
    ap.add_argument("--n-points", type=int, default=None, help="default: 200 on the CPU, the preset's on CUDA")
    ap.add_argument("--cache-dir", default=str(default_dir()))
    ap.add_argument("--out", default="reports/benchmarks")
    ap.add_argument("--smoke", action="store_true", help="seconds-long tiny run (the test suite's)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.smoke:
        preset = presets.SMOKE
        model = models.build("cnn", preset.dataset, 0).eval()
        x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = model(x).argmax(1)  # every point correct clean, so every attack of the cascade runs
        source = "untrained small CNN, random images labelled by its own predictions"
    else:
        preset = presets.get(args.preset or ("cifar10" if device.type == "cuda" else "quick"))
        model, x, y = load_model(preset, Path(args.cache_dir), device)
        n = args.n_points or (preset.n_eval if device.type == "cuda" else 200)
        x, y = x[:n], y[:n]
        source = f"preset {preset.name}'s cached dense {preset.archs[0]}, first {len(y)} test points"
    eps, seed, bs = preset.eps, preset.seed, preset.eval_batch
    print(f"AutoAttack standard, Linf eps {eps:.4g}, seed {seed}, batch {bs}, {source}, {device}", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref_flags, ref_s, ref_cpu = reference(model, x, y, eps, seed, bs, device)
    ref_peak = peak_memory_mib(device)
    print(f"reference: robust {100 * ref_flags.float().mean():.2f}% in {ref_s:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    our_flags, our_s, our_cpu, per_attack = ours(model, x, y, eps, seed, bs, device)
    our_peak = peak_memory_mib(device)
    print(f"ours: robust {100 * our_flags.float().mean():.2f}% in {our_s:.1f} s", flush=True)

    ref_acc, our_acc = 100 * float(ref_flags.float().mean()), 100 * float(our_flags.float().mean())
    disagree = int((ref_flags != our_flags).sum())
    record = {"benchmark": "eval_autoattack", "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "smoke": args.smoke, "versions": versions(), "model": source,
              "preset": preset.name, "n_points": len(y), "eps": eps, "seed": seed, "batch_size": bs,
              "fast_path": repr(FastPath.for_device(device).for_eval()),
              "reference": {"robust_acc": ref_acc, "seconds": ref_s, "cpu_seconds": ref_cpu, "peak_mib": ref_peak},
              "ours": {"robust_acc": our_acc, "seconds": our_s, "cpu_seconds": our_cpu, "peak_mib": our_peak,
                       "seconds_per_attack": per_attack},
              "points_disagreeing": disagree, "speedup": ref_s / our_s, "cpu_time_ratio": ref_cpu / our_cpu, "robust_acc_diff_points": our_acc - ref_acc,
              "peak_memory_note": "CUDA: max_memory_allocated per path; CPU: process peak RSS so far (MiB)"}
    if device.type == "cpu" and not args.smoke:
        record["cpu_profile"] = cpu_profile(model, x[:100], y[:100], eps, seed)
    rows = [["reference (survey's call)", f"{ref_acc:.2f}", f"{ref_s:.1f}", f"{ref_cpu:.1f}", f"{ref_peak:.0f}"],
            ["ours (run_autoattack + prepare_for_eval)", f"{our_acc:.2f}", f"{our_s:.1f}", f"{our_cpu:.1f}", f"{our_peak:.0f}"]]
    print(tabulate(rows, headers=["path", "robust acc %", "seconds", "CPU seconds", "peak MiB"], tablefmt="github"))
    print("ours, seconds per attack: " + ", ".join(f"{k} {v:.1f}" for k, v in per_attack.items()))
    if "cpu_profile" in record:
        print("CPU profile of Square (self time): " + ", ".join(
            f"{o['op']} {o['self_cpu_pct']}%" for o in record["cpu_profile"]["top_ops"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_autoattack_{device.type}.json").write_text(json.dumps(record, indent=2))
    ratio = ref_s / our_s if device.type == "cuda" else ref_cpu / our_cpu  # a shared CPU: CPU time, not wall time
    print(f"headline: ours is {ratio:.2f}x the reference's speed, robust accuracy {our_acc:.2f}% vs "
          f"{ref_acc:.2f}% ({our_acc - ref_acc:+.2f} points, {disagree} of {len(y)} points differ, {device.type})")


if __name__ == "__main__":
    main()
