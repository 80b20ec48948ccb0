#!/bin/bash
# default-run comparisons for #53, third round: both caches of primitives at 64 (the code before,
# as a user's setting: heap keeps it) and at 32 (now), side by side; run from a worktree's root,
# one run at a time, nothing heavy beside them
set -u
PLAN=1:onednn,2:weight-first,17:onednn,33:weight-first
PLAN32=1:linear,2:mkl,9:onednn,33:linear
PY=/work/venv/bin/python
AT64="ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 LRU_CACHE_CAPACITY=64"
FP32="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 SEMIONLINE_DTYPE=float32"
one() {  # name, then the command (env assignments first)
  name=$1; shift
  [ -f /work/dr3/$name/done ] && return
  rm -rf /work/dr3/$name; mkdir -p /work/dr3/$name
  env "$@" --out /work/dr3/$name/run > /work/dr3/$name/out.txt 2>&1 && touch /work/dr3/$name/done
}
one r3-bf16-64-1 $AT64 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one r3-bf16-now-1 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one r3-fp32-now $FP32 /usr/bin/time -v $PY train.py --decode-matmul $PLAN32
one r3-fp32-64 $FP32 $AT64 /usr/bin/time -v $PY train.py --decode-matmul $PLAN32
one r3-bf16-now-2 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one r3-bf16-64-2 $AT64 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one r3-bf16-2proc-now /usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 train.py --decode-matmul $PLAN
one r3-bf16-2proc-64 $AT64 /usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 train.py --decode-matmul $PLAN
echo ALL DONE
