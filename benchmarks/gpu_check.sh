#!/usr/bin/env bash
# Every GPU check of the Triton kernels in one go, for a session that is lent a GPU. Prepare here
# (PyPI reachable) with `bash benchmarks/gpu_wheels.sh`, then on the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# About 6 minutes on an H200. Needs only torch, triton and safetensors, which the GPU machine has;
# the wheels in .whl/ (eai-sparsify and what it imports) are installed if carried. Each step has its
# own time limit, so one that hangs leaves the others' numbers; logs and JSON land in $OUT.
#   1. the Triton kernels, compiled, against the torch reference (tests/kernels_interpret.py);
#   2. benchmarks/kernels.py: each primitive vs torch vs dense at the Llama-3-8B and a small shape,
#      bf16 and fp32, the whole decoder fwd+bwd, and a training step against eai-sparsify;
#   3. benchmarks/kernels_tune.py: the tile sizes of each kernel at the Llama-3-8B shape;
#   4. benchmarks/auxk.py: AuxK dense over the dead latents vs sparse, at the Llama-3-8B shape
#      (to set sae_core.sae.AUXK_DENSE_RATIO["cuda"], an estimate until then).
# (The collection and training benchmarks need the embedded SmolLM2, a 98 MB file: over the 64 MiB
# a device call can carry, so their GPU figures need a model the GPU machine can reach.)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. kernels vs torch reference (compiled)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels_interpret.py 2>&1 | tee "$OUT/pytest.log" | tail -15
echo "== 2. kernel benchmark"
timeout 240 python3 -m benchmarks.kernels --out-json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
echo "== 3. tile sweep"
timeout 120 python3 -m benchmarks.kernels_tune --out-json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log"
echo "== 4. AuxK, dense vs sparse"
timeout 90 python3 -m benchmarks.auxk --d-in 4096 --latents 131072 --k 192 --tokens 4096 --repeats 3 \
  --dead-fracs 0.005,0.05,0.1,0.25,0.5 2>&1 | tee "$OUT/auxk.log"
