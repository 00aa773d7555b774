#!/usr/bin/env bash
# Chapter 5's run on a lent GPU (issue 19), as one script whose results go to $OUT (/tmp/gpu-run when unset):
#   1. nvidia-smi: name, clocks, power limit, ECC, before and after                      -> smi.csv
#   2. pytest -m gpu on the CUDA kernel tests                                            -> run.log
#   3. the race check of bnref.cuda.checks: two inputs in turn, NaN-poisoned buffers,
#      200 runs a shape and layout                                                        -> run.log
#   4. benchmarks/gpu_batchnorm.py, 30 repeats (commit the json as benchmarks/results/gpu/<gpu>.json)
#   5. ncu (SpeedOfLight, Occupancy, MemoryWorkloadAnalysis, WarpStateStats) on the forward and the backward
#      of (32, 64, 56, 56) in NCHW and NHWC, clocks left as they are (--clock-control none) -> ncu.ncu-rep, ncu.csv
# The goals the json meets or misses are printed last. STEPS picks steps ("1 4" reruns those); each step has a
# time limit (TIMEOUT_<n> seconds) that keeps the whole inside one 10-minute call. Without a GPU every step
# says so and is skipped, and the script exits 0 (DRY_RUN=1 runs the steps anyway, to try the script: each then
# fails or skips on its own); otherwise it exits 1 if a step that ran failed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-run}
PY=${PYTHON:-python3}
STEPS=${STEPS:-1 2 3 4 5}
SHAPES=${SHAPES:-256,4096 8192,4096 32,64,56,56 256,256,14,14 256,512,7,7 64,256,56,56 256,64,112,112}
export PYTHONPATH="solutions${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

failed=""
run_step() {   # run_step N seconds command...: step N of STEPS, within its time limit (a function: none)
    local n=$1 limit=$2
    shift 2
    case " $STEPS " in *" $n "*) ;; *) return 0 ;; esac
    echo "== step $n: $* (at most ${limit}s)"
    if [ "$(type -t "$1")" = function ]; then "$@"; else timeout "$limit" "$@"; fi \
        || { echo "== step $n failed (exit $?)"; failed="$failed $n"; }
}

SMI_FIELDS=timestamp,name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw
SMI_FIELDS=$SMI_FIELDS,power.limit,enforced.power.limit,ecc.mode.current,temperature.gpu,clocks_throttle_reasons.active
smi() {   # the GPU's state, appended to smi.csv
    set -o pipefail
    nvidia-smi --query-gpu="$SMI_FIELDS" --format=csv | tee -a "$OUT/smi.csv"
}

if [ -z "${DRY_RUN:-}" ] && { ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$PY" -c "import cupy, sys; sys.exit(0 if cupy.is_available() else 1)" 2>/dev/null; }; then
    echo "no usable CUDA GPU here (nvidia-smi, or cupy.is_available()): steps $STEPS skipped, nothing measured"
    exit 0
fi

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
profile() {   # ncu's four sections on the four kernels of a forward and a backward, NCHW and NHWC
    [ -n "$NCU" ] || { echo "ncu not found: not profiled"; return 1; }
    timeout "${TIMEOUT_5:-90}" "$NCU" --clock-control none --section SpeedOfLight --section Occupancy \
        --section MemoryWorkloadAnalysis --section WarpStateStats -k regex:^bn_ -f -o "$OUT/ncu" \
        "$PY" benchmarks/gpu_batchnorm.py --profile --shapes 32,64,56,56 \
        && "$NCU" --import "$OUT/ncu.ncu-rep" --csv --page details > "$OUT/ncu.csv"
}
run_step 1 30 smi
run_step 2 ${TIMEOUT_2:-120} "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu -q -rs tests/test_cuda_kernels.py
# shellcheck disable=SC2086  # SHAPES is a list of words
run_step 3 ${TIMEOUT_3:-90} "$PY" -m bnref.cuda.checks --runs 200 --shapes $SHAPES
# shellcheck disable=SC2086
run_step 4 ${TIMEOUT_4:-240} "$PY" benchmarks/gpu_batchnorm.py --repeats 30 --race-runs 10 --out "$OUT" --shapes $SHAPES
run_step 5 ${TIMEOUT_5:-90} profile
run_step 1 30 smi

for result in "$OUT"/*.json; do
    [ -f "$result" ] && "$PY" -c "import json, sys; from bnref.cuda import roofline
r = json.load(open(sys.argv[1])); print(roofline.results_table(r)); print(roofline.goals_table(r))" "$result"
done
echo "== steps failed:${failed:- none}"
[ -z "$failed" ]
