#!/usr/bin/env bash
# The CUDA checks in one command, for a machine with a GPU (no internet needed: the benchmarks
# make their own random batches and toy images):
#   1. the tests marked `cuda` (python -m pytest -m cuda);
#   2. the training step, BiSeNetV2 at batch 16, 512x1024 (tools/benchmark_train.py): eager
#      fp32, channels-last, fp16 autocast, fp16 + channels-last, and compile + channels-last +
#      fp16, the default step on CUDA of an --fp16 recipe such as --published;
#   3. the training loop with the real loader, when benchmark_train.py has --end-to-end;
#   4. inference, BiSeNetV1/V2 at 1024x2048 (tools/benchmark_speed.py).
# Each part's output goes to $OUT (or ./gpu_check_out); each part has a time limit (seconds,
# overridable: LIMIT_TESTS, LIMIT_STEP, LIMIT_LOOP, LIMIT_INFER), together 345 s, so that the
# whole check ends within 6 minutes; one summary table is printed at the end. Exit status 0 when
# every part that ran passed. Needs python3 with torch, pytest and tabulate (PYTHON=... to pick
# another interpreter).
#
#   tools/gpu_check.sh                 # on the GPU machine
#   tools/gpu_check.sh --cpu-dry-run   # the same script on the CPU with tiny sizes (a check of
#                                      # the script itself; the cuda tests then skip)
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR" || exit 1
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1

DRY_RUN=0
case "${1:-}" in
  --cpu-dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac

# a shared 2-core CPU needs more time for the dry run's tiny sizes than the GPU for the real ones
SCALE=$((DRY_RUN ? 3 : 1))
LIMIT_TESTS=$((${LIMIT_TESTS:-115} * SCALE))
LIMIT_STEP=$((${LIMIT_STEP:-125} * SCALE))
LIMIT_LOOP=$((${LIMIT_LOOP:-55} * SCALE))
LIMIT_INFER=$((${LIMIT_INFER:-50} * SCALE))

# the test files holding tests marked cuda (collecting only these: the others may import
# packages that the GPU machine lacks)
mapfile -t CUDA_TEST_FILES < <(grep -l "mark\.cuda" tests/test_*.py)

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu
  # all their tests: the cuda ones skip, the CPU dry runs of the same comparisons run
  TEST_ARGS=("${CUDA_TEST_FILES[@]}")
  STEP_ARGS=(--models bisenetv2 --size 64 128 --batch 2 --iters 1 --rounds 1 --compare-iters 1
             --variants eager amp+cl)
  LOOP_ARGS=(--models bisenetv2 --size 64 128 --batch 2 --iters 2 --compare-iters 1
             --images 2 --image-size 128 256 --workers 0)
  INFER_ARGS=(--model bisenetv2 --size 64 128 --repeats 2 --warmup 1 --variants torch:fp32)
else
  DEVICE=cuda
  TEST_ARGS=(-m cuda "${CUDA_TEST_FILES[@]}")
  # two pytest workers where pytest-xdist is installed: the compile test takes most of the time
  "$PYTHON" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n 2)
  STEP_ARGS=(--models bisenetv2 --size 512 1024 --batch 16 --iters 5 --rounds 3
             --variants eager channels-last amp amp+cl compile+cl+amp)
  # the loop is timed with the uncompiled fp16 step: each of its rows builds a new runner, and
  # compiling for each would not fit the time limit
  LOOP_ARGS=(--models bisenetv2 --size 512 1024 --batch 16 --iters 15 --compare-iters 3)
  INFER_ARGS=(--model bisenetv1 bisenetv2 --size 1024 2048)
fi

declare -a PART_NAMES PART_STATUS PART_SECONDS PART_LOGS

# run_part NAME LIMIT COMMAND...: runs COMMAND with a time limit, output to $OUT_DIR/NAME.log
run_part() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT_DIR/$name.log" start=$SECONDS rc status
  echo "== $name (limit ${limit} s): $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out (${limit} s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  PART_NAMES+=("$name"); PART_STATUS+=("$status"); PART_SECONDS+=($((SECONDS - start)))
  PART_LOGS+=("$log")
}

skip_part() {
  PART_NAMES+=("$1"); PART_STATUS+=("skipped: $2"); PART_SECONDS+=(0); PART_LOGS+=("-")
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} 2>&1 | tee "$OUT_DIR/machine.txt"

if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"
then
  echo "no CUDA GPU visible to torch: nothing to check here (tools/gpu_check.sh --cpu-dry-run" \
       "checks the script on the CPU)" >&2
  exit 1
fi

run_part tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider "${TEST_ARGS[@]}"
run_part step "$LIMIT_STEP" "$PYTHON" tools/benchmark_train.py --device "$DEVICE" \
  "${STEP_ARGS[@]}"
HELP=$("$PYTHON" tools/benchmark_train.py --help 2>&1)
if grep -q -- "--end-to-end" <<<"$HELP"; then
  variant=amp+cl
  grep -q "amp+cl" <<<"$HELP" || variant=amp
  run_part loop "$LIMIT_LOOP" "$PYTHON" tools/benchmark_train.py --device "$DEVICE" \
    --end-to-end --variants "$variant" "${LOOP_ARGS[@]}"
else
  skip_part loop "tools/benchmark_train.py has no --end-to-end"
fi
run_part inference "$LIMIT_INFER" "$PYTHON" tools/benchmark_speed.py --devices "$DEVICE" \
  "${INFER_ARGS[@]}"

# ---- summary ----
echo
echo "==================== gpu_check summary ($(head -n 4 "$OUT_DIR/machine.txt" \
  | tr '\n' ';' | sed 's/;$//; s/;/; /g')) ===================="
printf '| %-9s | %-38s | %7s | %-28s |\n' part status seconds log
printf '|%s|%s|%s|%s|\n' ----------- ---------------------------------------- --------- \
  ------------------------------
for i in "${!PART_NAMES[@]}"; do
  printf '| %-9s | %-38s | %7s | %-28s |\n' "${PART_NAMES[$i]}" "${PART_STATUS[$i]}" \
    "${PART_SECONDS[$i]}" "${PART_LOGS[$i]}"
done
echo
# the pytest verdict, then each benchmark's own table (its lines starting with "|")
if [[ -f "$OUT_DIR/tests.log" ]]; then
  verdict=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT_DIR/tests.log" | tail -n 1)
  echo "tests: ${verdict:-(no verdict: see $OUT_DIR/tests.log)}"
fi
for name in step loop inference; do
  log="$OUT_DIR/$name.log"
  [[ -f $log ]] || continue
  echo
  echo "$name:"
  grep -E '^\|' "$log" || echo "(no table: see $log)"
done | tee "$OUT_DIR/summary_tables.txt"
failed=0
for status in "${PART_STATUS[@]}"; do
  [[ $status == ok || $status == skipped* ]] || failed=1
done
echo
echo "outputs in $OUT_DIR; total $SECONDS s"
exit $failed
