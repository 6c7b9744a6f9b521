"""The host's matmul rates, whether its CPU multiplies bf16 natively, and the compute dtype that fits it.

A bf16 model on a CPU without a bf16 matmul unit (AMD EPYC with AVX2 only, for one) runs
about 100x slower than the same model in fp32: torch emulates each bf16 product. Nothing in
the weights says so; only the host can. :func:`bf16_support` measures it once per process
(two small square matmuls, about 0.2 s) and reads the CPU flags; :func:`resolve_dtype` turns a
requested dtype (``auto`` included) into the one to load in, and prints one line where bf16 is
slow here.

``auto``: bf16 on CUDA and on a CPU with native bf16; otherwise fp32 when the weights fit in
the memory available (:func:`fp32_bytes_needed`), else bf16 with the one-line warning.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mfv.errors import ConfigError

# CPU flags (/proc/cpuinfo) that mark a bf16 dot-product unit: x86 (AVX512-BF16, AMX) and Arm (BF16).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# bf16 counts as native when its measured rate is at least this fraction of fp32's: emulated
# bf16 runs 10-100x below fp32, native bf16 at or above it.
NATIVE_RATIO = 0.5
# fp32 is chosen only when its weights take at most this share of the memory available now.
MEMORY_SHARE = 0.8
DTYPES = ("auto", "float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``), or the platform's processor string."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("model name", "cpu model", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) of its first processor."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("flags", "features")):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no flags, so bf16 is never taken as native
        return ""


def matmul_rate(dtype: torch.dtype, size: int, min_seconds: float = 0.05, device: str = "cpu") -> float:
    """FLOP/s (wall time) of a ``size x size`` matmul in ``dtype`` on the current torch threads
    (:func:`matmul_rates`)."""
    return matmul_rates(dtype, size, min_seconds, device)[0]


def matmul_rates(dtype: torch.dtype, size: int, min_seconds: float = 0.05, device: str = "cpu"
                 ) -> tuple[float, float]:
    """FLOP per second of wall time and per CPU-second of this process (all its threads) of a
    ``size x size`` matmul in ``dtype`` on the current torch threads.

    One untimed warm-up (kernel selection, first-touch pages), then products timed one by one
    for ``min_seconds`` of wall time (at least two); the fastest counts, as the machine may be
    shared and a product slowed by another process says nothing about the kernel. The CPU
    rate is what the load of other processes does not lower.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)
    _sync(device)
    wall, cpu, start, count = float("inf"), float("inf"), time.perf_counter(), 0
    while count < 2 or time.perf_counter() - start < min_seconds:
        tick, tock = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        _sync(device)
        wall, cpu, count = min(wall, time.perf_counter() - tick), min(cpu, time.process_time() - tock), count + 1
    flops = 2 * size**3
    return flops / max(wall, 1e-9), flops / max(cpu, 1e-9)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Bf16Support:
    """What this CPU does with bf16 matmuls.

    Attributes:
        cpu: The CPU model.
        flags: The bf16 flags the CPU reports (subset of :data:`BF16_FLAGS`).
        fp32_flop_per_s: Measured fp32 matmul rate.
        bf16_flop_per_s: Measured bf16 matmul rate.
        size: Side of the square matmuls measured.
        threads: torch threads during the measurement.
    """

    cpu: str
    flags: tuple[str, ...]
    fp32_flop_per_s: float
    bf16_flop_per_s: float
    size: int
    threads: int

    @property
    def ratio(self) -> float:
        """bf16 rate over fp32 rate."""
        return self.bf16_flop_per_s / self.fp32_flop_per_s

    @property
    def native(self) -> bool:
        """A bf16 unit the kernels use: a bf16 flag and a bf16 rate not far below fp32's."""
        return bool(self.flags) and self.ratio >= NATIVE_RATIO

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), flags=list(self.flags), ratio=round(self.ratio, 3), native=self.native)


@functools.lru_cache(maxsize=1)
def bf16_support(size: int = 256) -> Bf16Support:
    """The CPU's bf16 flags and its fp32 and bf16 matmul rates, measured once per process on
    one thread: the ratio is then the kernels', not how many cores other processes left us
    (on a shared host a two-thread fp32 product measured 2 to 380 GFLOP/s, one thread 200)."""
    flags = tuple(flag for flag in BF16_FLAGS if flag in cpu_flags())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = matmul_rate(torch.float32, size)
        bf16 = matmul_rate(torch.bfloat16, size)
    finally:
        torch.set_num_threads(threads)
    return Bf16Support(cpu_model(), flags, fp32, bf16, size, 1)


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation now (``MemAvailable``), or ``None`` where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fp32_bytes_needed(options: Mapping[str, Any]) -> int | None:
    """Bytes of the fp32 weights of the files a builder's ``options`` name, or ``None`` where
    no option names a local file or folder (a hub id, a random model).

    Every string option (but ``cache_dir``) that is an existing file counts its size, every
    existing folder the weight files in it (``.safetensors``, ``.bin``, ``.pt``, ``.pth``); twice the sum, as
    released weights are stored in 16 bits (an upper bound for fp32 files).
    """
    total, found = 0, False
    for key, value in options.items():
        # A cache folder holds every model ever fetched: only the model's own paths count.
        if key == "cache_dir" or not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            continue
        path = Path(value).expanduser()
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            total, found = total + path.stat().st_size, True
        elif path.is_dir():
            sizes = [p.stat().st_size for p in path.rglob("*") if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file()]
            total, found = total + sum(sizes), found or bool(sizes)
    return 2 * total if found else None


def _default_device(device: Any) -> str:
    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str, device: Any = None, options: Mapping[str, Any] | None = None) -> str:
    """The dtype to load in for ``requested`` on ``device``.

    ``float32`` and ``float16`` are returned as they are. ``bfloat16`` too, with one line on
    stderr (once per process) where this CPU has no native bf16 matmul. ``auto``: bf16 on
    CUDA and on a CPU with native bf16; otherwise fp32 when the weights named by ``options``
    (:func:`fp32_bytes_needed`) fit in :data:`MEMORY_SHARE` of the memory available, else bf16
    with that line.

    Args:
        requested: One of :data:`DTYPES`.
        device: Where the model runs; ``None``: CUDA when available, else the CPU.
        options: The builder's options (their weight paths size the fp32 copy).

    Raises:
        ConfigError: ``requested`` is not one of :data:`DTYPES`.
    """
    if requested not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {requested!r} (model.backbone_dtype)")
    device = _default_device(device)
    on_cpu = device.startswith("cpu")
    if requested in ("float32", "float16") or not on_cpu:
        return "bfloat16" if requested == "auto" else requested
    support = bf16_support()
    if support.native:
        return "bfloat16"
    needed, available = fp32_bytes_needed(options or {}), available_memory_bytes()
    if requested == "auto" and (needed is None or (available is not None and needed <= MEMORY_SHARE * available)):
        return "float32"
    _warn_slow_bf16(support, needed, available)
    return "bfloat16"


def slow_bf16_message(support: Bf16Support, fp32_bytes: int | None, available: int | None) -> str:
    """The one line saying bf16 is slow on this CPU, and the alternative."""
    flags = ", ".join(support.flags) or f"none of {'/'.join(BF16_FLAGS[:2])}"
    if fp32_bytes is None or available is None:
        room = "if the fp32 weights fit in memory"
    elif fp32_bytes <= MEMORY_SHARE * available:
        room = f"its fp32 weights, about {fp32_bytes / 1e9:.1f} GB, fit in the {available / 1e9:.1f} GB available"
    else:
        room = (f"once about {fp32_bytes / 1e9:.1f} GB is free for its fp32 weights "
                f"({available / 1e9:.1f} GB available now)")
    return (f"warning: bf16 matmul is not native on this CPU ({support.cpu}; bf16 flags: {flags}; measured "
            f"{support.bf16_flop_per_s / 1e9:.1f} GFLOP/s bf16 vs {support.fp32_flop_per_s / 1e9:.1f} fp32): "
            f"loading in bf16 runs about {1 / max(support.ratio, 1e-9):.0f}x slower than fp32; use dtype float32 "
            f"(model.backbone_dtype: float32, or auto) {room}")


_warned: list[str] = []  # the slow-bf16 line, once per process (several loads, one line)


def _warn_slow_bf16(support: Bf16Support, fp32_bytes: int | None, available: int | None) -> None:
    if not _warned:
        _warned.append(slow_bf16_message(support, fp32_bytes, available))
        print(_warned[0], file=sys.stderr, flush=True)
