#!/usr/bin/env bash
# The GPU issue's checks and benchmarks in stages, for a lent H100/H200 (device tool: each call
# at most 10 minutes, 30 minutes of device time a session). Run from the repository root there:
#
#   bash bench/gpu_session.sh correct     # test suite on CUDA, sweep vs reference, cooperative
#                                         # path beside other work, graphs and torch.compile
#   bash bench/gpu_session.sh sanitize    # compute-sanitizer memcheck, racecheck, synccheck
#   bash bench/gpu_session.sh bench       # kernel benchmark (all impls), per-kernel profile
#   bash bench/gpu_session.sh e2e         # end-to-end prefill, LLaVA-1.5-7B and Qwen2.5-VL-7B shapes
#
# Pass the commit measured (the copy sent there has no .git): ZSPAPRUNE_COMMIT=<sha> bash ...
# Logs and result files go to $OUT (the device tool's folder that comes back); results land in
# $OUT/<device>.json, to be merged into bench/results/ and rendered by bench/results.py.
set -uo pipefail
OUT=${OUT:-/tmp/zspaprune-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch',
torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" |
    tee "$OUT/versions.txt"
results="$OUT/$(python3 -c "import torch, re; print(re.sub('[^A-Za-z0-9._-]+', '_', torch.cuda.get_device_name()))").json"

case "${1:-}" in
  correct)
    timeout 300 pytest tests -q -p no:cacheprovider -x --durations=10 2>&1 | tee "$OUT/pytest.log" | tail -15
    timeout 240 python3 bench/gpu_check.py launches contend graphs sweep 2>&1 | tee "$OUT/check.log" | grep -v ": ok$" | tail -40
    ;;
  sanitize)
    for tool in memcheck racecheck synccheck; do
      timeout 150 compute-sanitizer --tool "$tool" --print-limit 20 python3 bench/gpu_check.py launches \
        2>&1 | tee "$OUT/sanitize-$tool.log" | tail -6
    done
    ;;
  bench)
    timeout 180 python3 bench/gpu_check.py profile modes 2>&1 | tee "$OUT/profile.log" | tail -12
    for shapes in 'llava*' 'next*' 'video-8k,video-16k' 'video-32k' 'video-32k-b8-masks'; do
      timeout 200 python3 bench/bench_select.py --shapes "$shapes" --out "$results" 2>&1 |
        tee -a "$OUT/bench.log" | tail -20
    done
    ;;
  e2e)
    timeout 280 python3 bench/bench_e2e.py --out "$results" 2>&1 | tee "$OUT/e2e.log" | tail -12
    timeout 280 python3 bench/bench_e2e.py --family qwen2_5_vl --out "$results" 2>&1 | tee -a "$OUT/e2e.log" | tail -12
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh correct|sanitize|bench|e2e" >&2
    exit 2
    ;;
esac
