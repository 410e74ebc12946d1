"""benchmarks/end_to_end.py on the smoke preset, and benchmarks/run_gpu.sh without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock"}


def test_end_to_end_smoke_times_a_cold_method_and_leaves_the_warm_cache_alone(dense_cache, tmp_path):
    before = _snapshot(dense_cache)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "ADVPRUNE_CACHE_DIR")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--smoke", "--method", "dense",
                           "--cache-dir", str(dense_cache), "--device", "cpu", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _snapshot(dense_cache) == before  # the warm cache was only read
    result = json.loads((tmp_path / "end_to_end_cpu.json").read_text())
    assert result["preset"] == "smoke" and result["method"] == "dense" and result["goal_s"] == 600
    assert result["warm_entries"] == {"dense": 1}  # only the dense model travels: everything else is built again
    assert [c["cell"] for c in result["phases"]] == ["dense-0"] and result["phases"][0]["autoattack_pgd_s"] > 0
    assert result["cells"] == {"PASS": 1} and result["dense_warmup_s"] is None
    assert result["cifar10_projected_per_cell_h"] > 0 and result["versions"]["torch"]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("end_to_end: dense smoke grid in ") and "x the goal" in last


def _run_gpu(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN_GPU), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_run_gpu_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    proc = _run_gpu("--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("train_throughput", "eval_autoattack", "pruned_inference", "end_to_end"):
        (line,) = [ln for ln in lines if f"benchmarks/{name}.py" in ln]
        if (ROOT / "benchmarks" / f"{name}.py").exists():
            assert line.strip().startswith("timeout ") and f"--device cuda --out {out}" in line, line
        else:
            assert line.strip().startswith("missing: ") and "skipped in dry-run" in line, line
    assert not out.exists()


def test_run_gpu_help_prints_the_usage_and_an_unknown_option_is_refused(tmp_path):
    proc = _run_gpu("--help")
    assert proc.returncode == 0 and proc.stdout.splitlines()[2].strip() == \
        "bash benchmarks/run_gpu.sh [--dry-run | --help] [OUT_DIR]", proc.stdout
    proc = _run_gpu("--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "unknown option --out" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_run_gpu_takes_a_relative_out_dir_from_where_it_is_called(tmp_path):
    proc = subprocess.run(["bash", str(RUN_GPU), "--dry-run", "rel"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and f"would write to {tmp_path}/rel with" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(RUN_GPU), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": "viaenv"})
    assert proc.returncode == 0 and f"would write to {tmp_path}/viaenv with" in proc.stdout, proc.stdout + proc.stderr


def test_run_gpu_fails_when_a_step_fails(tmp_path):
    fake = tmp_path / "python"  # a "python" whose every run fails, so no step can succeed
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "gpu"
    proc = _run_gpu(str(out), PYTHON=str(fake), PATH=f"{tmp_path}:{os.environ['PATH']}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "versions: FAILED" in summary and "end_to_end: FAILED with exit 3" in summary
    assert summary.strip().splitlines()[-1].startswith("run_gpu.sh: ") and "step(s) failed" in summary


def test_run_gpu_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(RUN_GPU)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "warning", str(RUN_GPU)]).returncode == 0
