#!/usr/bin/env bash
# Every check that needs a GPU, in one run on the GPU machine (bench/gpu/README.md):
#   the CUDA path of training and inference (bench/gpu/cuda_path.py), the training throughput
#   ratios (bench/train_throughput.py) and batched inference (bench/inference_speed.py).
# Run from the repository root. Logs and a summary go to $OUT (default gpu-check-logs/, ignored by git).
# QUICK=1 tries the script itself on any machine in seconds: params.yaml's recipe on a tiny network and working
# size, few frames and steps, no compile, and the CUDA-path checks on the CPU (tests/test_bench_scripts.py runs it so).
set -uo pipefail
OUT=${OUT:-gpu-check-logs}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu/carried_wheels.sh
if [ "${QUICK:-0}" = 1 ]; then
    # params.yaml's recipe (its norm, its precision rule) on a tiny network and working size: it proves the plumbing
    quick="$OUT/quick-params.yaml"
    "$PY" -c 'import sys, yaml; p = yaml.safe_load(open("params.yaml")); p["preprocess"].update(height=32, width=48)
p["model"].update(depth=2, base_width=8); p["train"]["batch_size"] = 8
yaml.safe_dump(p, open(sys.argv[1], "w"), sort_keys=False)' "$quick"
    cuda_path=(--params "$quick" --device cpu --frames 30 --epochs 3 --no-compile)
    throughput=(--params "$quick" --steps 2 --batch 4 --workers 1 --no-compile)
    inference=(--params "$quick" --frames 4 --batch 4 --no-compile)
else
    cuda_path=(); throughput=(--steps 50 --batch 64 --workers 4); inference=(--frames 300 --batch 256 --no-compile)
fi
{ date -u; nvidia-smi -L 2>&1 || echo "no nvidia-smi"; "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.cuda.is_available())'; } \
    | tee "$OUT/summary.txt"
failed=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to $OUT/NAME.log, note its exit status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}
step cuda_path 180 "$PY" bench/gpu/cuda_path.py "${cuda_path[@]}"
step train_throughput 200 "$PY" bench/train_throughput.py "${throughput[@]}"
step inference_speed 120 "$PY" bench/inference_speed.py "${inference[@]}"
echo "steps failed: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
