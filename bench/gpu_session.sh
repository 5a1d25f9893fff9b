#!/usr/bin/env bash
# The GPU issue's checks and first numbers in one run of at most 5 minutes (device tool: 15
# minutes of device time in all, so that one rerun after a fix still fits). From the repository
# root on the GPU machine (no network; the copy sent there has no .git):
#
#   ZSPAPRUNE_COMMIT=<sha> OUT=$OUT bash bench/gpu_session.sh            # the GPU run
#   OUT=/tmp/dry bash bench/gpu_session.sh --dry-run                     # here, on the CPU
#
# Stages in priority order, each with its own time cap, all within BUDGET = 285 s (a stage gets
# at most what is left; one that would get under 15 s is skipped and says so), everything logged under $OUT (7 files:
# summary.txt, one log per stage, <device>.json with the result rows, written as they come so a
# cut run still returns what it measured):
#   1 correct   (90 s + 30 s)  compact correctness set: both modes, cooperative P > 1 (and two calls
#                       on two streams), masks, 3 dtypes, B <= 64, N <= 32768, ratio 0/0.5/1;
#                       then the CUDA tests (-m gpu)
#   2 graphs    (30 s)  CUDA-graph capture and replay, torch.compile(fullgraph) reduce-overhead
#   3 bench     (100 s)  the issue's target shapes: fused eager and graph-replayed, reference,
#                       reference_compiled, DivPrune's loop, HBM floor, the model's prediction
#   4 sanitize  (50 s)  compute-sanitizer memcheck and racecheck on three small launches
#   5 e2e       (35 s)  the 7B-shaped LLaVA preset, keep 576 vs 64, selection share
# --dry-run runs the same stages on tiny shapes on the CPU under Triton's interpreter, skipping
# (and saying so) only what needs CUDA, in under 10 minutes: the GPU run is not the script's
# first run.
set -uo pipefail
OUT=${OUT:-/tmp/zspaprune-gpu}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
BUDGET=${BUDGET:-285}  # seconds for every stage together (the dry run: 570)
[ $DRY -eq 1 ] && BUDGET=${BUDGET_DRY:-570}
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$SUMMARY"; }

# stage NAME CAP(seconds) COMMAND...: runs COMMAND under its cap (cut to what is left of the
# session's BUDGET), its output appended to $OUT/NAME.log
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 15 ]; then
    say "stage $name SKIPPED: ${left} s left of the ${BUDGET} s budget: $*"
    return
  fi
  [ $cap -gt $left ] && cap=$left
  say "stage $name (cap ${cap} s): $*"
  timeout -k 5 "$cap" "$@" >>"$OUT/$name.log" 2>&1
  local status=$?
  [ $status -eq 124 ] && say "stage $name: CUT at its cap"
  say "stage $name: exit $status; last lines:"
  tail -4 "$OUT/$name.log" | tee -a "$SUMMARY"
}

if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEVICE=cpu
  CHECK="python3 bench/gpu_check.py --dry-run"
  RESULTS="$OUT/dry-run.json"
else
  DEVICE=cuda
  CHECK="python3 bench/gpu_check.py"
  RESULTS="$OUT/$(python3 -c "import torch, re; print(re.sub('[^A-Za-z0-9._-]+', '_', torch.cuda.get_device_name()))").json"
fi
python3 -c "import torch, triton, transformers; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)', '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)" 2>&1 | tee -a "$SUMMARY"
say "commit ${ZSPAPRUNE_COMMIT:-unknown}; results rows: $RESULTS"

if [ $DRY -eq 0 ]; then
  # compile every kernel variant for the bench dtype in the background (Triton's on-disk cache
  # is shared): the stages below then mostly hit the cache instead of compiling in turn
  for dtype in bfloat16 float16 float32; do
    timeout 120 python3 -c "import torch, zspaprune_ops.kernels as k; k.warmup(torch.device('cuda'), torch.$dtype, 4096)" >>"$OUT/correct.log" 2>&1 &
  done
fi

# 1. correctness
stage correct 90 $CHECK correct
if [ $DRY -eq 0 ]; then
  stage correct 30 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels_gpu.py
else
  say "stage correct: pytest -m gpu SKIPPED (needs CUDA)"
fi
wait

# 2. CUDA graphs and torch.compile
stage graphs 30 $CHECK graphs

# 3. benchmark: the issue's targets (bf16, D = 4096)
if [ $DRY -eq 0 ]; then
  stage bench 45 python3 bench/bench_select.py --out "$RESULTS" \
    --shapes 'llava7b-k64,llava7b-k64-t650-masks,llava7b-k64-b32,next-k288'
  stage bench 35 python3 bench/bench_select.py --out "$RESULTS" --impls fused,fused_graph,reference \
    --shapes 'video-32k'
  stage bench 20 python3 bench/gpu_check.py profile
else
  stage bench 120 python3 bench/bench_select.py --out "$RESULTS" --device cpu --repeat 2 \
    --impls fused,reference,divprune_loop \
    --shapes 'tiny-masks,B=1,N=48,D=16,T=4,keep=6'
  say "stage bench: fused_graph, reference_compiled and the profile SKIPPED (need CUDA)"
fi

# 4. compute-sanitizer on three small launches
if [ $DRY -eq 0 ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    stage sanitize 25 compute-sanitizer --tool "$tool" --print-limit 20 python3 bench/gpu_check.py sanitize
  done
else
  [ $DRY -eq 1 ] && stage sanitize 120 $CHECK sanitize
  say "stage sanitize: compute-sanitizer SKIPPED (needs CUDA and compute-sanitizer)"
fi

# 5. one end-to-end row
if [ $DRY -eq 0 ]; then
  stage e2e 35 python3 bench/bench_e2e.py --preset llava-1.5-7b --keep 576 64 --repeat 3 --out "$RESULTS"
else
  stage e2e 120 python3 bench/bench_e2e.py --preset tiny --keep 576 64 --repeat 2 --device cpu --out "$RESULTS"
fi
say "done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
