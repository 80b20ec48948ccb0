"""Pilot 6's phase probe (run at commit 20585c6, from the repository root):
    python experiments/memory-growth/pilots/pilot6/phases.py <train.py's flags>
A thread samples every 5 ms the resident bytes and glibc's mallinfo2 (heap size, in use, free,
mapped) under the phase the loop is in (rollout: train.sync_and_generate; train:
loss_and_backward; opt: optimizer_step; eval: held-out scoring; start: the rest) and prints, per
phase, the highest resident, the highest live (in use + mapped) and what was live at the resident
peak, with /proc's anonymous and file-backed shares there."""
import ctypes
import os
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path.insert(0, ROOT)
sys.argv[0] = "train.py"
import heap  # noqa: E402
import host  # noqa: E402
import train  # noqa: E402

PHASE, STATS = ["start"], {}
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = heap._Mallinfo2


def sample():
    while True:
        m, rss = libc.mallinfo2(), host.rss_bytes()
        s = STATS.setdefault(PHASE[0], {"rss": 0, "live": 0})
        s["live"] = max(s["live"], m.uordblks + m.hblkhd)
        if rss > s["rss"]:
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            s.update(rss=rss, at=(m.uordblks + m.hblkhd, m.fordblks, m.arena, m.hblkhd,
                                  *(int(status[k].split()[0]) * 1024
                                    for k in ("RssAnon", "RssFile"))))
        time.sleep(0.005)


def phase(name, label):
    f = getattr(train, name)

    def inside(*args, **kw):
        before, PHASE[0] = PHASE[0], label
        try:
            return f(*args, **kw)
        finally:
            PHASE[0] = before
    setattr(train, name, inside)


for name, label in (("sync_and_generate", "rollout"), ("loss_and_backward", "train"),
                    ("optimizer_step", "opt"), ("score_heldout", "eval"), ("score_now", "eval")):
    phase(name, label)
threading.Thread(target=sample, daemon=True).start()
try:
    train.main(sys.argv[1:])
finally:
    for k, s in STATS.items():
        live, free, arena, mapped, anon, file = (x / 1e9 for x in s["at"])
        print(f"PHASE {k:8s} peak {s['rss'] / 1e9:.3f} GB (anon {anon:.3f}, file {file:.3f}); "
              f"live at most {s['live'] / 1e9:.3f}; at the peak: live {live:.3f}, heap free "
              f"{free:.3f}, heap {arena:.3f}, mapped {mapped:.3f}")
