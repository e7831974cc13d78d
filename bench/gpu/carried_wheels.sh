# Sourced by bench/gpu/check.sh and bench/gpu/real_cv.sh, from the repository root, after PY and OUT are
# set: puts the wheels of bench/gpu/fetch_wheels.sh on PYTHONPATH. They are for Python 3.12 (the GPU
# machine's), so they are installed only there, into /tmp/site (a few seconds; each script does it, so
# either runs alone).
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed" | tee -a "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
