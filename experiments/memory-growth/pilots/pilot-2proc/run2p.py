import sys, os
sys.argv[0] = "train.py"
sys.path.insert(0, os.getcwd())
import heap
if os.environ.get("KEEP_ALL"):
    f = heap.keep_freed_memory
    heap.keep_freed_memory = lambda device, world: f(device, 1)
import start
start.keep_freed_memory = heap.keep_freed_memory
import train
train.main(sys.argv[1:])
