#!/usr/bin/env bash
# The GPU check (issue 13) in one call on a GPU machine: the device-independent tests on CUDA, then
# the benchmark rows (f / VJP times; training steps of L-Broyden, Anderson, plain iteration and the
# unrolled net for CIFAR TINY at batch 32 and 96 and ImageNet MDEQ-Small at batch 16, 224x224; the
# solvers' own time per step; peak memory of implicit vs unrolled steps at T = 10 and 40), without
# and with MODEL.COMPILE. Everything it writes goes to $OUT (default ./gpu_check_out), 4 files:
#
#   summary.md   the card, torch version, the test summary, every benchmark table, the time of each step
#   pytest.log   the full test output (skip reasons included)
#   bench.json   the raw benchmark results, by step name
#   bench.log    the benchmarks' progress log and any error
#
# Usage:  tools/gpu_check.sh                      # on the GPU machine, from the repository root
#         GPU_CHECK_QUICK=1 GPU_CHECK_DEVICE=cpu tools/gpu_check.sh   # tiny sizes, to try it anywhere
# Environment:
#   OUT                  output folder (default ./gpu_check_out)
#   GPU_CHECK_DEVICE     cuda (default) or cpu
#   GPU_CHECK_QUICK      1: small batches, thresholds and repeats, a few tests (proves the script works)
#   GPU_CHECK_BUDGET_S   seconds after which the remaining steps are skipped (default 450: 7.5 minutes;
#                        quick: 1800, and each step's own limit 5 times longer, for a slow or shared CPU)
#   GPU_CHECK_STEPS      comma-separated steps to run (default all): tests, tiny32, inet16, tiny96,
#                        tiny96_compile, inet16_compile; e.g. to rerun the ones a first call skipped
#   MDEQ_REFERENCE       folder of the original's reference files (default tests/data/reference, in
#                        the checkout)
#   PYTHON               the interpreter (default python3)
# Python packages missing on the machine (yacs) are installed from ./.whl when that folder has wheels.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
SCALE=1
[ "$QUICK" = 1 ] && SCALE=5
BUDGET=${GPU_CHECK_BUDGET_S:-$((450 * SCALE))}
STEPS=${GPU_CHECK_STEPS:-tests,tiny32,inet16,tiny96,tiny96_compile,inet16_compile}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.md
: >"$SUMMARY"; : >"$OUT/bench.log"; : >"$OUT/pytest.log"
log() { echo "$*" | tee -a "$SUMMARY"; }

# --- the environment: mdeq from this checkout, missing packages from .whl, the reference files
if ! "$PY" -c "import yacs" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$WORK/pkg" && ln -s "$REPO/lib" "$WORK/pkg/mdeq"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
export MDEQ_REFERENCE=${MDEQ_REFERENCE:-$REPO/tests/data/reference}
REF=$MDEQ_REFERENCE

log "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE, quick $QUICK)"
log ""
"$PY" - >>"$SUMMARY" 2>&1 <<'EOF'
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU visible"
print(f"- card: {gpu}; GPUs visible: {torch.cuda.device_count()}; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}); Python {platform.python_version()}; {torch.get_num_threads()} CPU threads")
EOF
log "- reference files: $REF"
log ""

STEP_TIMES=$WORK/steps.md
wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# run_step NAME LIMIT_S FUNCTION ARGS...: FUNCTION runs its command under `limited`, i.e. under the
# smaller of LIMIT_S and what is left of the budget; a step past the budget is skipped and named
run_step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    wanted "$name" || return 0
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "| $name | skipped: the ${BUDGET} s budget is spent (rerun with GPU_CHECK_STEPS=$name) | - |" >>"$STEP_TIMES"
        return 0
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    STEP_LIMIT=$limit
    t0=$SECONDS
    echo "== $name (limit ${limit} s)" | tee -a "$OUT/bench.log" >&2
    "$@"
    rc=$?
    local what="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then what="stopped at its ${limit} s limit"; fi
    echo "| $name | $what | $((SECONDS - t0)) |" >>"$STEP_TIMES"
    return 0
}
limited() { timeout --signal=INT --kill-after=15 "$STEP_LIMIT" "$@"; }

# --- 1. the device-independent tests on the device (pytest --device): reference, gradients, layouts,
# AMP step, DDP step (2 GPUs), torch.compile
TESTS=(tests/test_reference.py tests/test_core.py tests/test_device.py)
PYTEST_ARGS=(-q -rs -p no:cacheprovider --device "$DEVICE" --run-compile)
if [ "$QUICK" = 1 ]; then
    PYTEST_ARGS=(-q -rs -p no:cacheprovider --device "$DEVICE" -k "unrolled_logits or both_state_layouts or two_process")
fi
tests_step() {
    limited "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
    local rc=$?
    { echo "## Tests: pytest --device $DEVICE (exit $rc)"; echo; echo '```'; tail -n 25 "$OUT/pytest.log"; echo '```'; echo; } >>"$SUMMARY"
    return $rc
}
run_step tests 240 tests_step

# --- 2. the benchmark rows
if [ "$QUICK" = 1 ]; then
    TINY_B=(4 4) INET=(1 64) THRES=(--f-thres 6 --b-thres 6) MEM=4,8 REPEATS=1 SOLVERS=broyden,fixed_point
else
    TINY_B=(32 96) INET=(16 224) THRES=() MEM=10,40 REPEATS=5 SOLVERS=broyden,anderson,fixed_point
fi
TINY_W=()
[ -f "$REF/cifar_tiny.pkl" ] && TINY_W=(--testModel "$REF/cifar_tiny.pkl")
bench() {   # bench NAME TOOL-ARGS...: one tools/benchmark.py run; its tables go to the summary
    local name=$1
    shift
    limited "$PY" tools/benchmark.py --device "$DEVICE" --repeats "$REPEATS" --solvers "$SOLVERS" ${THRES[@]+"${THRES[@]}"} \
        --json "$WORK/$name.json" "$@" >"$WORK/$name.md" 2>>"$OUT/bench.log"
    local rc=$?
    { echo "## $name (exit $rc)"; echo; echo "    python tools/benchmark.py --device $DEVICE --repeats $REPEATS --solvers $SOLVERS ${THRES[*]:-} $*"; echo;
      cat "$WORK/$name.md"; echo; } >>"$SUMMARY"
    return $rc
}
TINY=(--cfg experiments/cifar/cls_mdeq_TINY.yaml --image-size 32 ${TINY_W[@]+"${TINY_W[@]}"})
IMNET=(--cfg experiments/imagenet/cls_mdeq_SMALL.yaml --batch-size "${INET[0]}" --image-size "${INET[1]}")
STEPPY=(--parts components,train,unrolled)
run_step tiny32 90 bench tiny32 "${TINY[@]}" --batch-size "${TINY_B[0]}" --mem-thres "$MEM" MODEL.DROPOUT 0.0
run_step inet16 120 bench inet16 "${IMNET[@]}" --mem-thres "$MEM"
run_step tiny96 60 bench tiny96 "${TINY[@]}" --batch-size "${TINY_B[1]}" "${STEPPY[@]}" MODEL.DROPOUT 0.0
run_step tiny96_compile 150 bench tiny96_compile "${TINY[@]}" --batch-size "${TINY_B[1]}" "${STEPPY[@]}" \
    MODEL.DROPOUT 0.0 MODEL.COMPILE True
run_step inet16_compile 180 bench inet16_compile "${IMNET[@]}" "${STEPPY[@]}" MODEL.COMPILE True

# --- the raw results in one file, and the time of each step
"$PY" - "$WORK" "$OUT/bench.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}, indent=1))
EOF
{ echo "## Steps"; echo; echo "| step | result | wall (s) |"; echo "|---|---|---:|"; cat "$STEP_TIMES"; echo;
  echo "Total: ${SECONDS} s."; } >>"$SUMMARY"
tail -n 12 "$SUMMARY"
