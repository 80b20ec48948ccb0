"""
What this machine is, read the way its OS tells it: the CPU (name, instruction-set features, bf16),
this process's resident memory, the signals that stop a run, a console that can print any text.
Each read is one small function with a fallback that says "unknown" (None, an empty string)
rather than a wrong number, and nothing here imports at module level what only one OS has.
Linux (x86 and ARM) is run natively and under emulation; macOS and Windows are simulated in
tests/test_platforms.py, one difference at a time.
"""
import platform
import signal
import subprocess
import sys


def cpuinfo_fields(text):
    """(name, features) from the text of Linux's /proc/cpuinfo: x86 says `model name` and `flags`;
    ARM says `Features` and names the core by `CPU implementer` and `CPU part` (hex ids)."""
    lines = text.splitlines()
    field = lambda name: next(   # noqa: E731
        (l.split(":", 1)[1].strip() for l in lines if l.split(":", 1)[0].strip() == name), "")
    name = field("model name") or field("Hardware") or (
        f"ARM implementer {field('CPU implementer')} part {field('CPU part')}"
        if field("CPU implementer") else "")
    return name, field("flags") or field("Features")


def sysctl(*names):
    """{name: value} from macOS's sysctl for the names it knows ({} elsewhere)."""
    if sys.platform != "darwin":
        return {}
    try:
        out = subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(l.split(": ", 1) for l in out.splitlines() if ": " in l)


def cpu():
    """(this CPU's name, its instruction-set features as one space-separated string): Linux's
    /proc/cpuinfo; macOS's sysctl (its hw.optional.arm.FEAT_* that are 1); elsewhere the name
    platform gives and no features (unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            name, features = cpuinfo_fields(f.read())
    except OSError:
        name, features = "", ""
    if sys.platform == "darwin" and not features:
        known = sysctl("machdep.cpu.brand_string", "hw.optional")
        name = known.get("machdep.cpu.brand_string", "")
        features = " ".join(k.rsplit(".", 1)[-1] for k, v in known.items()
                            if k.startswith("hw.optional.") and v.strip() == "1")
    return name or platform.processor() or platform.machine(), features


def has_bf16(features):
    """Whether a CPU with these features (cpu()'s second) has bf16 matrix instructions: x86's
    avx512_bf16 or amx_bf16, ARM's bf16 (Linux's Features; macOS's FEAT_BF16). Unknown: False."""
    words = set(features.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16", "FEAT_BF16"})


def rss_bytes(peak=False):
    """This process's resident memory now, or its peak (peak=True); None where the OS does not
    say. Linux: /proc/self/status (VmRSS, VmHWM); Windows: GetProcessMemoryInfo; elsewhere the
    peak from getrusage (KiB on Linux, bytes on macOS) and the current value unknown."""
    try:
        with open("/proc/self/status") as f:
            field = "VmHWM:" if peak else "VmRSS:"
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
    except (OSError, StopIteration, ValueError):
        pass
    if sys.platform == "win32":
        return _windows_rss(peak)
    try:
        import resource
    except ImportError:
        return None
    if not peak:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _windows_rss(peak):
    """Windows' working set (peak=True: its peak) from psapi's GetProcessMemoryInfo; None if it
    cannot be read."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (n, ctypes.c_size_t) for n in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage",
                "PagefileUsage", "PeakPagefileUsage")]
    try:
        c = Counters(cb=ctypes.sizeof(Counters))
        get = ctypes.WinDLL("psapi").GetProcessMemoryInfo
        if not get(ctypes.windll.kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb):
            return None
    except (AttributeError, OSError):
        return None
    return c.PeakWorkingSetSize if peak else c.WorkingSetSize


def stop_signals():
    """The signals that ask a run to finish its step, checkpoint and exit: Ctrl-C (SIGINT)
    everywhere; SIGTERM where the OS hands it to the process (not Windows: there it ends the
    process at once, so no handler would run); Ctrl-Break (SIGBREAK) on Windows."""
    names = ("SIGINT", "SIGBREAK") if sys.platform == "win32" else ("SIGINT", "SIGTERM")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def console():
    """stdout and stderr made unable to fail on a character their encoding lacks: a Windows
    console or pipe in a legacy code page (cp1252) shows π as \\u03c0 instead of raising
    UnicodeEncodeError in the middle of a run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            "πθβα→≥·—…".encode(stream.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        except AttributeError:   # replaced by something without an encoding: leave it
            pass
