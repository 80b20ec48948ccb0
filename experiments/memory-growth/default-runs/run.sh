#!/bin/bash
# default-run comparisons for #53; run from a worktree; one run at a time
set -u
PLAN=1:onednn,2:weight-first,17:onednn,33:weight-first
KEPT="import heap, models; heap.MAP_FROM = None; models.CHUNK_LOGITS['cpu'] = 2**25"
PY=/work/venv/bin/python
one() {  # name, arm code, env...
  name=$1; code=$2; shift 2
  [ -f /work/dr/$name/done ] && return
  rm -rf /work/dr/$name
  mkdir -p /work/dr/$name
  env "$@" /usr/bin/time -v $PY -c "import sys; sys.argv[0]='train.py'; $code; import train; train.main(sys.argv[1:])" --out /work/dr/$name/run --decode-matmul $PLAN > /work/dr/$name/out.txt 2>&1 && touch /work/dr/$name/done
}
for i in 1 2; do
  one bf16-kept-$i "$KEPT" X=1
  one bf16-default-$i "pass" X=1
done
FP32="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 SEMIONLINE_DTYPE=float32"
# fp32: its own plan (the bf16 plan's forms are bf16 timings); measured once, kept in the cache
[ -f /work/dr/fp32-default/done ] || { rm -rf /work/dr/fp32-default; mkdir -p /work/dr/fp32-default; env $FP32 /usr/bin/time -v $PY train.py --out /work/dr/fp32-default/run > /work/dr/fp32-default/out.txt 2>&1 && touch /work/dr/fp32-default/done; }
[ -f /work/dr/fp32-kept/done ] || { rm -rf /work/dr/fp32-kept; mkdir -p /work/dr/fp32-kept; env $FP32 /usr/bin/time -v $PY -c "import sys; sys.argv[0]='train.py'; $KEPT; import train; train.main(sys.argv[1:])" --out /work/dr/fp32-kept/run > /work/dr/fp32-kept/out.txt 2>&1 && touch /work/dr/fp32-kept/done; }
[ -f /work/dr/bf16-2proc/done ] || { rm -rf /work/dr/bf16-2proc; mkdir -p /work/dr/bf16-2proc; /usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 train.py --out /work/dr/bf16-2proc/run --decode-matmul $PLAN > /work/dr/bf16-2proc/out.txt 2>&1 && touch /work/dr/bf16-2proc/done; }
echo ALL DONE
