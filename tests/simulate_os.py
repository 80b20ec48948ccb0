"""Run a script or module as it would run on another OS, one difference at a time:

    python tests/simulate_os.py SWITCH train.py --steps 2 ...
    python tests/simulate_os.py SWITCH -m pytest --collect-only -q

Each switch makes this Linux process look like another platform in one way to the project's code
(test_platforms.py runs train.py under each, so a failure names its cause). The libraries it uses
are imported first, as on Linux: they look at sys.platform themselves, and a switch that broke them
would simulate no real OS.
  no-proc         no /proc (macOS, Windows): opening anything under it fails
  no-libc         no libc.so.6 (macOS, Windows, musl): ctypes cannot load it
  select-sockets  select.select takes sockets only (Windows: OSError 10038 on a pipe)
  no-resource     no `resource` module (Windows)
  no-sigterm      the signal module without SIGTERM nor the POSIX-only signals
  packed-fail     oneDNN's and MKL's packed matmuls lay the weights out but fail to run (a build
                  whose kernels reject this CPU, as an ARM build may)
  no-packed       neither oneDNN's nor MKL's packed matmul operators exist (a build without them)
A cp1252 console needs no switch: the environment's PYTHONIOENCODING=cp1252 does it.
"""
import builtins
import ctypes
import io
import os
import runpy
import select
import signal
import socket
import sys


def no_proc():
    real = builtins.open

    def open_(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", os.fsdecode(file))
        return real(file, *a, **k)
    builtins.open = io.open = open_


def no_libc():
    real = ctypes.CDLL.__init__

    def init(self, name, *a, **k):   # the project's loads: torch's own look at sys.platform first
        caller = sys._getframe(1).f_code.co_filename
        if name and "libc." in os.path.basename(str(name)) and "site-packages" not in caller:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        real(self, name, *a, **k)
    ctypes.CDLL.__init__ = init


def select_sockets():
    real = select.select

    def select_(r, w, x, *timeout):
        if not all(isinstance(f, socket.socket) for f in (*r, *w, *x)):
            raise OSError(10038, "An operation was attempted on something that is not a socket")
        return real(r, w, x, *timeout)
    select.select = select_


def no_resource():
    sys.modules["resource"] = None   # `import resource` raises ImportError


def no_sigterm():
    keep = {"SIGINT", "SIGABRT", "SIGFPE", "SIGILL", "SIGSEGV"}   # Windows' set, less SIGTERM
    for name in [n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")]:
        if name not in keep:
            delattr(signal, name)


def packed(fail):
    import torch

    def refuse(*a, **k):
        raise RuntimeError("simulated: this kernel does not support the CPU")
    missing = AttributeError("simulated: no such operator in this build")
    for space, prep, run in ((torch.ops.mkldnn, "_reorder_linear_weight", "_linear_pointwise"),
                             (torch.ops.mkl, "_mkl_reorder_linear_weight", "_mkl_linear")):
        if fail:
            setattr(space, run, refuse)
        else:
            for op in (prep, run):
                setattr(space, op, _Missing(missing))


class _Missing:
    """An operator that is not there: calling it raises as torch.ops does for a missing one."""

    def __init__(self, error):
        self.error = error

    def __call__(self, *a, **k):
        raise self.error


SWITCHES = {"no-proc": no_proc, "no-libc": no_libc, "select-sockets": select_sockets,
            "no-resource": no_resource, "no-sigterm": no_sigterm,
            "packed-fail": lambda: packed(True), "no-packed": lambda: packed(False)}


def libraries():
    """torch, transformers, Math-Verify and the rest, imported as they are on Linux."""
    import multiprocessing.resource_tracker  # noqa: F401
    import math_verify  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoModelForCausalLM, GenerationMixin, LlamaForCausalLM  # noqa: F401


if __name__ == "__main__":
    switch, *rest = sys.argv[1:]
    libraries()
    SWITCHES[switch]()
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")
