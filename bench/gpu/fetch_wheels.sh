#!/usr/bin/env bash
# Wheels of the packages the GPU machine's image lacks (it has torch, numpy, opencv, pandas, scipy,
# tqdm, PyYAML, Pillow; see bench/gpu/README.md), at the versions of requirements.lock, for its
# Python 3.12, into .whl/ (git-ignored; copy it to the GPU machine with the repository). Run on a machine
# where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
packages="albumentations albucore pydantic pydantic_core annotated-types typing-inspection typing_extensions simsimd stringzilla"
rm -rf .whl && mkdir -p .whl
for name in $packages; do
    pin=$(grep -i "^${name//[-_]/[-_]}==" requirements.lock) || { echo "$name: not in requirements.lock" >&2; exit 1; }
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$pin"
done
ls .whl
du -sh .whl
