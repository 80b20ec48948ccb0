"""host.py: each OS's way of saying what the machine is, read right, and "unknown" where it says
nothing. The texts are what those machines print (x86 and ARM Linux's /proc/cpuinfo, macOS's
sysctl); test_platforms.py runs train.py under the differences."""
import io
import signal
import subprocess
import sys
import types

import pytest

import host
import models

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
EPYC_AVX2 = X86.replace("Intel(R) Xeon(R) Platinum 8488C", "AMD EPYC 7R32").replace(
    " avx512f avx512_bf16 amx_bf16 amx_tile", "")
# Graviton 3 (Neoverse V1): bf16 among its Features; Graviton 2 (Neoverse N1): none
NEOVERSE_V1 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt
 fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg
 dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
""".replace("\n fcma", " fcma").replace("\n dcpodp", " dcpodp")
NEOVERSE_N1 = NEOVERSE_V1.replace(" svebf16", "").replace(" bf16", "").replace("0xd40", "0xd0c")
SYSCTL_M2 = """machdep.cpu.brand_string: Apple M2
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.floatingpoint: 1
"""


@pytest.mark.parametrize("text,name,bf16", [
    (X86, "Intel(R) Xeon(R) Platinum 8488C", True),
    (EPYC_AVX2, "AMD EPYC 7R32", False),
    (NEOVERSE_V1, "ARM implementer 0x41 part 0xd40", True),
    (NEOVERSE_N1, "ARM implementer 0x41 part 0xd0c", False)])
def test_linux_cpuinfo_of_x86_and_arm(text, name, bf16):
    got_name, features = host.cpuinfo_fields(text)
    assert got_name == name and host.has_bf16(features) == bf16


def test_arm_cores_get_their_own_plan_key():
    """decode.stored keys a plan by cpu(): two ARM cores differ (they shared one key before)."""
    assert host.cpuinfo_fields(NEOVERSE_V1) != host.cpuinfo_fields(NEOVERSE_N1)


def fake_macos(monkeypatch, sysctl_text):
    monkeypatch.setattr(sys, "platform", "darwin")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (_ for _ in ()).throw(
        FileNotFoundError(f)) if str(f).startswith("/proc") else real_open(f, *a, **k))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: types.SimpleNamespace(
        stdout=sysctl_text if cmd[0] == "sysctl" else ""))


def test_macos_cpu_and_bf16_from_sysctl(monkeypatch):
    fake_macos(monkeypatch, SYSCTL_M2)
    name, features = host.cpu()
    assert name == "Apple M2" and "FEAT_BF16" in features.split()
    assert "FEAT_I8MM" not in features.split() and models.cpu_has_bf16()
    fake_macos(monkeypatch, SYSCTL_M2.replace("FEAT_BF16: 1", "FEAT_BF16: 0"))   # an M1
    monkeypatch.delenv("SEMIONLINE_DTYPE", raising=False)
    assert not models.cpu_has_bf16() and models.resolve_dtype("auto", "cpu") == "float32"


def test_an_os_that_says_nothing_is_unknown_not_a_number(monkeypatch):
    """No /proc, no resource module, not Windows: the peak and the current RSS are None."""
    fake_macos(monkeypatch, "")
    monkeypatch.setitem(sys.modules, "resource", None)
    assert host.rss_bytes() is None and host.rss_bytes(peak=True) is None
    assert host.cpu()[1] == "" and not models.cpu_has_bf16()


@pytest.mark.parametrize("platform,scale", [("darwin", 1), ("linux", 1024)])
def test_getrusage_peak_in_bytes_on_each_os(monkeypatch, platform, scale):
    """ru_maxrss is bytes on macOS and KiB on Linux: the peak comes out in bytes on both."""
    resource = pytest.importorskip("resource")
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=5000))
    assert host.rss_bytes(peak=True) == 5000 * scale and host.rss_bytes() is None


def test_linux_rss_is_read():
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux's /proc")
    now, peak = host.rss_bytes(), host.rss_bytes(peak=True)
    assert 0 < now <= peak


def test_stop_signals_where_each_os_delivers_them(monkeypatch):
    assert signal.SIGINT in host.stop_signals()
    monkeypatch.setattr(sys, "platform", "linux")
    assert host.stop_signals() == [signal.SIGINT, signal.SIGTERM]
    monkeypatch.setattr(sys, "platform", "win32")   # SIGTERM there ends the process: no handler
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert host.stop_signals() == [signal.SIGINT, 21]


def test_a_cp1252_console_prints_greek_letters(monkeypatch):
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    host.console()
    print("πθ (fp32, 1/W) → β")
    out.flush()
    assert out.buffer.getvalue().decode("cp1252") == "\\u03c0\\u03b8 (fp32, 1/W) \\u2192 \\u03b2\n"
