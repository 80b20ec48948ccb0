"""The two-process pilot's train.py (run at commit 5ea1b32, whose heap.keep_freed_memory left a
torchrun process alone): KEEP_ALL=1 gives each process the one-process setting; run.sh sets the
other arms by MALLOC_ variables. Run from the repository root under torchrun."""
import os
import sys

sys.argv[0] = "train.py"
sys.path.insert(0, os.getcwd())
import heap  # noqa: E402

if os.environ.get("KEEP_ALL"):
    f = heap.keep_freed_memory
    heap.keep_freed_memory = lambda device, world: f(device, 1)
import start  # noqa: E402

start.keep_freed_memory = heap.keep_freed_memory
import train  # noqa: E402

train.main(sys.argv[1:])
