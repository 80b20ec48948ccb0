#!/usr/bin/env bash
# The device check, prepared for a session that is lent a GPU machine (one GPU; torch with CUDA and
# transformers there, no internet). Not run by CI, and not yet run on a GPU: written on CPU.
# Packages the device lacks travel as wheels in .whl/ (the device tool's README says how to fetch
# them here: math-verify, latex2sympy2_extended, antlr4-python3-runtime, gguf, tqdm, pytest,
# pytest-timeout). Run it through the device tool, e.g.
#   run(command="bash tests/gpu_check.sh", carry=[".whl"], timeout_s=540)
# It writes its logs under $OUT. Budget: about 8 minutes.
#  1. the in-process tests with SEMIONLINE_TEST_DEVICE=cuda: train.py on the tiny models on CUDA
#     (bf16 training and rollouts by default there); the multi-process tests stay on CPU processes
#     with gloo (two NCCL ranks cannot share one GPU: NCCL, FSDP's bf16 parameters and 2-rank vLLM
#     wait for a multi-GPU box);
#  2. bench.py --device cuda --parts logps: the log-probs' peak memory on a 128k vocabulary (the other
#     parts read the default model, whose GGUF package is not on the device).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
SEMIONLINE_TEST_DEVICE=cuda timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_dpo.py tests/test_grpo.py \
    tests/test_losses.py tests/test_edge_cases.py tests/test_train.py 2>&1 | tee "$OUT/pytest-cuda.log"
timeout 120 python3 bench.py --device cuda --parts logps --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
