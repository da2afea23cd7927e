#!/usr/bin/env bash
# Every GPU check in one go, for a session that is lent a GPU (the device tool: `bash benchmarks/gpu_check.sh`,
# timeout ~400 s). Needs only torch, triton and safetensors, which the GPU machine has; wheels in .whl/
# (e.g. eai-sparsify for the step comparison) are installed if carried. Prints the numbers; files land in $OUT.
#   1. the Triton kernels, compiled, against the torch reference (tests/kernels_interpret.py);
#   2. benchmarks/kernels.py: each primitive vs torch vs dense at the Llama-3-8B shape, and a whole step.
# (The collection and training benchmarks need the embedded SmolLM2, a 98 MB file: over the 64 MiB
# a device call can carry, so their GPU figures need a model the GPU machine can reach.)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. kernels vs torch reference (compiled)"
python3 -m pytest -q tests/kernels_interpret.py 2>&1 | tail -5
echo "== 2. kernel benchmark"
python3 -m benchmarks.kernels --out-json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
