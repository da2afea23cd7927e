#!/usr/bin/env bash
# Fetch into .whl/ the wheels that the lent GPU machine lacks for benchmarks/kernels.py's comparison
# with EleutherAI's eai-sparsify (its image has torch, triton, transformers, accelerate, einops,
# pandas, pyarrow, huggingface_hub but not these). Run here, where PyPI is reachable; then
# `bash benchmarks/gpu_check.sh` on the GPU machine with `.whl` carried installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's python3
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  eai-sparsify==1.3.3 simple-parsing==0.1.9 docstring-parser==0.18.0 natsort==8.4.0 schedulefree==1.4.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl && ls .whl
