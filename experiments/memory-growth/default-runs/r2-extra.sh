cd /work/wt
PLAN=1:onednn,2:weight-first,17:onednn,33:weight-first
PY=/work/venv/bin/python
mkdir -p /work/dr3
if [ ! -f /work/dr3/eval-mapped/done ]; then rm -rf /work/dr3/eval-mapped; mkdir -p /work/dr3/eval-mapped
/usr/bin/time -v $PY -c "import sys; sys.argv[0]='train.py'; import heap, eval as E; H = E.heldout_eval; E.heldout_eval = lambda *x: (lambda cm: (cm.__enter__(), H(*x), cm.__exit__(None, None, None))[1])(heap.mapped()); import train; train.main(sys.argv[1:])" --out /work/dr3/eval-mapped/run --decode-matmul $PLAN > /work/dr3/eval-mapped/out.txt 2>&1 && touch /work/dr3/eval-mapped/done; fi
if [ ! -f /work/dr3/2proc-4mb/done ]; then rm -rf /work/dr3/2proc-4mb; mkdir -p /work/dr3/2proc-4mb
cat > /tmp/run4mb.py <<'PYEOF'
import os, sys
sys.path.insert(0, os.getcwd())
import heap
heap.MAP_FROM_TORCHRUN = 4 << 20
sys.argv[0] = "train.py"
import train
train.main(sys.argv[1:])
PYEOF
/usr/bin/time -v /work/venv/bin/torchrun --standalone --nproc_per_node 2 /tmp/run4mb.py --out /work/dr3/2proc-4mb/run --decode-matmul $PLAN > /work/dr3/2proc-4mb/out.txt 2>&1 && touch /work/dr3/2proc-4mb/done; fi
echo ALL DONE
