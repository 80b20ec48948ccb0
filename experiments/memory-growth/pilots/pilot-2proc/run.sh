# The two-process pilot as it ran (at commit 5ea1b32, in a worktree /work/wt; the script as
# /work/run2p.py): 12 steps per arm, ideep's cache at 64 in all
cd /work/wt
for v in "base:X=1" "keep:KEEP_ALL=1" "mmap4m:MALLOC_MMAP_THRESHOLD_=4194304" "mmap64k:MALLOC_MMAP_THRESHOLD_=65536"; do
  name=${v%%:*}; envv=${v#*:}
  [ -f /work/p2/$name/done ] && continue
  rm -rf /work/p2/$name; mkdir -p /work/p2/$name
  env LRU_CACHE_CAPACITY=64 $envv /work/venv/bin/torchrun --standalone --nproc_per_node 2 /work/run2p.py --steps 12 --eval-problems 0 --save-every 0 --out /work/p2/$name/run --decode-matmul 1:onednn,2:weight-first,17:onednn,33:weight-first > /work/p2/$name/out.txt 2>&1 && touch /work/p2/$name/done
done
echo ALL DONE
