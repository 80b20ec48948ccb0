#!/bin/bash
# default-run comparisons for #53, second round: the code before (previous.py) and now, side by
# side; run from a worktree's root, one run at a time, nothing heavy beside them
set -u
PLAN=1:onednn,2:weight-first,17:onednn,33:weight-first
PLAN32=1:linear,2:mkl,9:onednn,33:linear
PY=/work/venv/bin/python
PREV=experiments/memory-growth/default-runs/previous.py
FP32="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 SEMIONLINE_DTYPE=float32"
one() {  # name, then the command (env assignments first)
  name=$1; shift
  [ -f /work/dr2/$name/done ] && return
  rm -rf /work/dr2/$name; mkdir -p /work/dr2/$name
  env "$@" --out /work/dr2/$name/run > /work/dr2/$name/out.txt 2>&1 && touch /work/dr2/$name/done
}
one bf16-previous-1 /usr/bin/time -v $PY $PREV --decode-matmul $PLAN
one bf16-now-1 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one bf16-2proc-previous /usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 $PREV --decode-matmul $PLAN
one bf16-2proc-now /usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 train.py --decode-matmul $PLAN
# fp32: the plan it measured on this machine in the first round
one fp32-now $FP32 /usr/bin/time -v $PY train.py --decode-matmul $PLAN32
one fp32-previous $FP32 /usr/bin/time -v $PY $PREV --decode-matmul $PLAN32
one bf16-now-2 /usr/bin/time -v $PY train.py --decode-matmul $PLAN
one bf16-previous-2 /usr/bin/time -v $PY $PREV --decode-matmul $PLAN
echo ALL DONE
