#!/usr/bin/env bash
# The real-data cross-validation (bench/real_cv.py) on the GPU machine, alone or after bench/gpu/check.sh
# (where .whl/ is present, bench/gpu/carried_wheels.sh installs it). Where the GPU machine lacks
# ../shared/datasets/kaggle-uns, first, on a machine that has it, copy the nerve frames into the
# git-ignored .gpudata/ (38 MB):
#     bash bench/gpu/real_cv.sh --stage
# then copy the repository with .whl/ and .gpudata/ to the GPU machine and run there each settings file
# in turn until DEADLINE (epoch seconds; default 10 minutes from the start):
#     DEADLINE=$(( $(date +%s) + 3600 )) OUT=gpu-logs bash bench/gpu/real_cv.sh bench/real_cv_96_instance_long_strong.yaml ...
# REAL_CV_ARGS adds options of bench/real_cv.py to each run (e.g. "--folds-to-run 0 --epochs 1" to try it).
# Each run writes $OUT/NAME.log and $OUT/NAME.json (NAME: the settings file's name); summary.txt gets its exit status.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --stage ]; then
    rm -rf .gpudata && mkdir -p .gpudata && cp -r ../shared/datasets/kaggle-uns/positives-256 .gpudata/ && du -sh .gpudata
    exit
fi
OUT=${OUT:-/tmp/nerveseg-gpu-cv}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu/carried_wheels.sh
data=$(cd .. && pwd)/shared/datasets/kaggle-uns   # where bench/real_cv.py looks
if [ ! -e "$data" ]; then
    [ -d .gpudata/positives-256 ] || { echo "no .gpudata/positives-256: run 'bash bench/gpu/real_cv.sh --stage' first" | tee -a "$OUT/summary.txt"; exit 2; }
    mkdir -p "$(dirname "$data")" && ln -s "$PWD/.gpudata" "$data"
fi
end=${DEADLINE:-$(( $(date +%s) + 600 ))}
failed=0
for settings in "$@"; do
    name=$(basename "$settings" .yaml)
    left=$(( end - $(date +%s) ))
    if [ "$left" -lt 60 ]; then echo "$name: not run, ${left} s left" | tee -a "$OUT/summary.txt"; failed=$((failed + 1)); continue; fi
    timeout "$left" "$PY" bench/real_cv.py --threads 8 --loader-workers 6 --settings "$settings" \
        ${REAL_CV_ARGS:-} --work "/tmp/nerveseg-real-cv-$name" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    rc=$?
    tr '\r' '\n' < "$OUT/$name.log" | grep -a "^fold.*Dice\|^mean\|Error" | tail -n 8
    echo "$name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || failed=$((failed + 1))
done
exit "$failed"
