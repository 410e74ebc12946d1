#!/usr/bin/env bash
# The whole GPU benchmark set in one go, in under 8 minutes on one H200, into one folder.
#
#   bash benchmarks/run_gpu.sh [--dry-run | --help] [OUT_DIR]
#
# OUT_DIR (relative to where you call it) defaults to $OUT, else the repository's reports/benchmarks/gpu. Runs, each with `--device cuda --out OUT_DIR`
# and its own time limit (so one slow step cannot eat the others' time): train_throughput.py,
# eval_autoattack.py, pruned_inference.py, end_to_end.py; before them nvidia-smi and the versions.
# Each step's output goes to OUT_DIR/<step>.log, its JSON to OUT_DIR/<step>_cuda.json; the summary
# (one line per step: status, seconds, headline) to OUT_DIR/summary.txt. Exits 1 if any step failed
# or timed out. --dry-run prints the commands, checks that each script exists and runs nothing.
#
# Environment: PYTHON (default .venv/bin/python, else python3); ADVPRUNE_DATA_DIR when Fashion-MNIST
# is not in /usr/share/datasets/fashion-mnist; ADVPRUNE_WARM_CACHE, the warm cache end_to_end.py copies
# (default ~/.cache/pytest-advprune; without one it first trains the quick dense model, untimed).
set -uo pipefail

DRY=0
case "${1:-}" in
  -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --dry-run) DRY=1; shift ;;
  -*) echo "run_gpu.sh: unknown option $1 (use --dry-run or --help)" >&2; exit 2 ;;
esac
OUT_DIR="${1:-${OUT:-}}"
if [[ -n "$OUT_DIR" && "$OUT_DIR" != /* ]]; then OUT_DIR="$PWD/$OUT_DIR"; fi  # the caller's folder, before the cd
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT_DIR:-reports/benchmarks/gpu}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WARM_CACHE="${ADVPRUNE_WARM_CACHE:-$HOME/.cache/pytest-advprune}"

# name, time limit in seconds, script, extra arguments. The limits, the environment step's 45 s and
# 5 s of grace per step add up to 460 s, under the 8 minutes.
STEPS=(
  "train_throughput 80 benchmarks/train_throughput.py"
  "eval_autoattack 110 benchmarks/eval_autoattack.py"
  "pruned_inference 55 benchmarks/pruned_inference.py"
  "end_to_end 150 benchmarks/end_to_end.py --cache-dir $WARM_CACHE"
)

if (( DRY )); then
  echo "run_gpu.sh --dry-run: would write to $OUT_DIR with $PYTHON"
  echo "  nvidia-smi > $OUT_DIR/nvidia-smi.txt; versions > $OUT_DIR/versions.json"
  for step in "${STEPS[@]}"; do
    read -r name limit script extra <<< "$step"
    if [[ -f "$script" ]]; then
      echo "  timeout ${limit}s $PYTHON $script --device cuda --out $OUT_DIR ${extra:-}"
    else
      echo "  missing: $script (not on this branch yet; skipped in dry-run, a failed step in a real run)"
    fi
  done
  exit 0
fi

mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=()

{ timeout 15s nvidia-smi && timeout 5s nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } \
  > "$OUT_DIR/nvidia-smi.txt" 2>&1 \
  || echo "nvidia-smi: not available (recorded in nvidia-smi.txt)" | tee -a "$SUMMARY"
if timeout 25s "$PYTHON" -c "import json, torch; from pytest_advprune.session import versions
print(json.dumps({**versions(), 'cuda': torch.version.cuda, 'gpus': [torch.cuda.get_device_name(i)
      for i in range(torch.cuda.device_count())]}, indent=2))" > "$OUT_DIR/versions.json" 2> "$OUT_DIR/versions.log"; then
  echo "versions: ok" | tee -a "$SUMMARY"
else
  echo "versions: FAILED (see versions.log)" | tee -a "$SUMMARY"
  FAILED+=(versions)
fi

for step in "${STEPS[@]}"; do
  read -r name limit script extra <<< "$step"
  log="$OUT_DIR/$name.log"
  if [[ ! -f "$script" ]]; then
    echo "$name: FAILED, $script is missing" | tee -a "$SUMMARY"
    FAILED+=("$name")
    continue
  fi
  start=$SECONDS
  # shellcheck disable=SC2086  # extra holds separate arguments
  timeout --kill-after=5s "${limit}s" "$PYTHON" "$script" --device cuda --out "$OUT_DIR" ${extra:-} > "$log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  headline=$(tail -n 1 "$log")
  if (( rc == 0 )); then
    echo "$name: ok in ${took}s: $headline" | tee -a "$SUMMARY"
  elif (( rc == 124 || rc == 137 )); then
    echo "$name: TIMED OUT after ${limit}s (see $log)" | tee -a "$SUMMARY"
    FAILED+=("$name")
  else
    echo "$name: FAILED with exit $rc in ${took}s: $headline (see $log)" | tee -a "$SUMMARY"
    FAILED+=("$name")
  fi
done

if (( ${#FAILED[@]} )); then
  echo "run_gpu.sh: ${#FAILED[@]} step(s) failed: ${FAILED[*]}" | tee -a "$SUMMARY"
  exit 1
fi
echo "run_gpu.sh: all steps passed; results in $OUT_DIR" | tee -a "$SUMMARY"
