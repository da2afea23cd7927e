#!/usr/bin/env bash
# Every GPU check in one go, for a session that is lent a GPU. Prepare here (PyPI reachable) with
# `bash benchmarks/gpu_wheels.sh`, then on the device tool, in three calls (the machine stays warm
# between them; a session has 15 device minutes, start-up included; 2026-11-29 they took 100, 140
# and 200 s):
#   run(command="bash benchmarks/gpu_check.sh 1 2", carry=[".whl"], timeout_s=330)  # the targets
#   run(command="bash benchmarks/gpu_check.sh 3 4", carry=[".whl"], timeout_s=200)  # tiles, AuxK
#   run(command="bash benchmarks/gpu_check.sh 5", carry=[".whl"], timeout_s=310)    # the CLIs
# Steps 1-2 have limits adding up to 300 s, steps 3-4 to 165 s, step 5 290 s; with no argument all
# five run. The benchmarks save their JSON after each section, so a step stopped at its limit
# keeps what it measured.
# Needs torch, triton, transformers and safetensors, which the GPU machine has; the wheels in .whl/
# (zarr and numcodecs for the store, eai-sparsify, what they import) are installed if carried.
# Each step has its own time limit, so one that hangs leaves the others' numbers; logs and JSON
# land in $OUT.
#   1. the Triton kernels, compiled, against the torch reference (tests/kernels_interpret.py);
#   2. benchmarks/kernels.py: each primitive vs torch vs dense at the Llama-3-8B and a small shape,
#      bf16 and fp32, the whole decoder fwd+bwd, and a training step against eai-sparsify;
#   3. benchmarks/kernels_tune.py: the tile sizes of each kernel at the Llama-3-8B shape;
#   4. benchmarks/auxk.py: AuxK dense over the dead latents vs sparse, at the Llama-3-8B shape
#      (to set sae_core.sae.AUXK_DENSE_RATIO["cuda"], an estimate until then);
#   5. benchmarks/gpu_pipeline.py: actcache collect + saetrain fit + evaluate on CUDA through the
#      CLIs (a random Llama: the embedded SmolLM2, 98 MB, is over the 64 MiB a call can carry),
#      held-out FVU against the same fit on the CPU, and on 2 CPU ranks under torchrun (the
#      gloo + NCCL process group a CUDA machine gets).
set -uo pipefail
STEPS=${*:-1 2 3 4 5}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { [[ " $STEPS " == *" $1 "* ]] && echo "== $1. $2 ($(date +%T))"; }
if step 1 "kernels vs torch reference (compiled)"; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels_interpret.py 2>&1 | tee "$OUT/pytest.log" | tail -15
fi
if step 2 "kernel benchmark"; then
  timeout 180 python3 -m benchmarks.kernels --out-json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
fi
if step 3 "tile sweep"; then
  timeout 120 python3 -m benchmarks.kernels_tune --out-json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log"
fi
if step 4 "AuxK, dense vs sparse"; then
  timeout 45 python3 -m benchmarks.auxk --d-in 4096 --latents 131072 --k 192 --tokens 4096 --repeats 3 \
    --dead-fracs 0.005,0.05,0.25,0.5,1.0 2>&1 | tee "$OUT/auxk.log"
fi
if step 5 "collect + fit on CUDA through the CLIs"; then
  timeout 290 python3 -m benchmarks.gpu_pipeline 2>&1 | tee "$OUT/pipeline.log"
fi
echo "== done ($(date +%T))"
