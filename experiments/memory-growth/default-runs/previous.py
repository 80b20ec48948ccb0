"""train.py as the code was before heap bounded ideep's cache of primitives and set malloc under
torchrun: LRU_CACHE_CAPACITY at ideep's own 1024, a torchrun process on glibc's own malloc.
    python previous.py <train.py's flags>   (or under torchrun)"""
import os
import sys

sys.path.insert(0, os.getcwd())   # run from the repository root
os.environ["LRU_CACHE_CAPACITY"] = "1024"
import heap  # noqa: E402
import start  # noqa: E402

now = heap.set_malloc
start.set_malloc = lambda device, world: world == 1 and now(device, world)
sys.argv[0] = "train.py"
import train  # noqa: E402

train.main(sys.argv[1:])
