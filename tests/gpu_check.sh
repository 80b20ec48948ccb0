#!/usr/bin/env bash
# The checks that need one CUDA GPU (torch with CUDA and transformers installed; no internet needed).
# Not run by CI. Packages the machine lacks can come as wheels in .whl/ (math-verify,
# latex2sympy2_extended, antlr4-python3-runtime, gguf, tqdm, pytest, pytest-timeout):
#   bash tests/gpu_check.sh          # logs under $OUT (default /tmp/gpu_check), about 8 minutes
#  1. the in-process tests with SEMIONLINE_TEST_DEVICE=cuda: train.py on the tiny models on CUDA
#     (bf16 training and rollouts by default there); the multi-process tests stay on CPU processes
#     with gloo (two NCCL ranks cannot share one GPU: NCCL, FSDP's bf16 parameters and 2-rank vLLM
#     wait for a multi-GPU box);
#  2. bench.py --device cuda --parts logps: the log-probs' peak memory on a 128k vocabulary (the other
#     parts read the default model, whose GGUF package is not on the device);
#  3. memory.py's plan against CUDA's measured peak: a train.py run on a Llama-shaped random model of
#     ~0.5B parameters (config written here), its printed plan and the logged `peak_gb` per step.
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
timeout 120 python3 experiments/bench.py --device cuda --parts logps --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
python3 - "$OUT/mid" <<'PY'
import sys
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "tests")
from conftest import make_tokenizer
tok = make_tokenizer()
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PY
timeout 150 python3 train.py --model "$OUT/mid" --engine hf --steps 3 --loss grpo --kl-coef 0.01 --group-size 8 --batch-prompts 4 \
    --max-new-tokens 128 --eval-problems 0 --out "$OUT/mid-run" 2>&1 | tee "$OUT/memory.log"
grep -h peak_gb "$OUT/mid-run/log.jsonl" | python3 -c "import sys, json; print('measured peak_gb per step:', [json.loads(l)['peak_gb'] for l in sys.stdin])" \
    | tee -a "$OUT/memory.log"
