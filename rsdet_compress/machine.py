"""Facts about this machine that every timing table records beside its numbers."""
from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` of ``/proc/cpuinfo`` (None where there is none, e.g. off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name; elsewhere what ``platform`` knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


#: the CPU flags that decide which int8 / fp32 kernels a runtime can use, widest first: two "AMD EPYC"
#: machines of this project differ exactly here (AVX-512 VNNI: int8 convs ~2x fp32; AVX2 only: much less)
_ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


def cpu_isa() -> str:
    """The vector extensions int8 inference depends on, e.g. ``avx512f+avx512_vnni+avx2`` or ``avx2``."""
    flags = _cpuinfo("flags")
    if flags is None:
        return platform.machine()
    return "+".join(f for f in _ISA_FLAGS if f in flags.split()) or "no avx2"


def cpu_label() -> str:
    """``AMD EPYC (avx2)``: what a timing table names its machine by."""
    return f"{cpu_name()} ({cpu_isa()})"
