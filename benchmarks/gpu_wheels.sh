#!/usr/bin/env bash
# Fetch into .whl/ the wheels that the lent GPU machine lacks (its image has torch, triton,
# transformers, tokenizers, accelerate, einops, pandas, pyarrow, huggingface_hub, typer, tqdm):
# the store's zarr and numcodecs for benchmarks/gpu_pipeline.py, eai-sparsify for
# benchmarks/kernels.py's comparison, and what they import. Run here, where PyPI is reachable;
# `bash benchmarks/gpu_check.sh` on the GPU machine with `.whl` carried installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's python3
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  eai-sparsify==1.3.3 simple-parsing==0.1.9 docstring-parser==0.18.0 natsort==8.4.0 schedulefree==1.4.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
du -sh .whl && ls .whl
