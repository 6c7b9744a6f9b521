"""torch's CPU threads from the cores this process may use, one helper for every command.

torch starts one thread per core of the machine, whatever this process is allowed: under a CPU
affinity mask or a container's CPU quota the extra threads only wait on each other (issue #34:
on a loaded 2-core machine the demo's training ran at 0.30 it/s with torch's own choice, 5.4 it/s
with one thread per process). Every command calls :func:`set_threads` before its work and
prints :func:`summary` with its run summary; ``--threads N`` or ``MFV_THREADS=N`` overrides.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "MFV_THREADS"  # an explicit count; set by ``--threads N`` so that spawned ranks inherit it
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _quota_cores() -> float | None:
    """The cgroup CPU quota in cores (``None`` where there is none or it cannot be read)."""
    try:
        if _CGROUP_V2.is_file():
            quota, period = _CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = _CGROUP_V1
        if quota_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def requested() -> int | None:
    """The count asked for with ``MFV_THREADS`` (``None``: unset).

    Raises:
        mfv.errors.ConfigError: it is not a whole number >= 1.
    """
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        from mfv.errors import ConfigError

        raise ConfigError(f"{ENV}={value!r} (or --threads): must be a whole number >= 1")
    return int(value)


def set_threads(count: int | None = None) -> int:
    """Sets torch's intra-op threads to ``count``, else ``MFV_THREADS``, else :func:`usable_cores`,
    and returns it (imports torch: call it once the command is past its help)."""
    if count is not None:
        os.environ[ENV] = str(count)  # processes this one starts (DDP ranks) use the same
    chosen = requested() or usable_cores()  # one check for --threads and MFV_THREADS (0, -1: one line)
    import torch

    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    return chosen


def summary() -> str:
    """One line for a run summary: the threads torch uses and where the number came from."""
    import torch

    asked = requested()
    source = f"{ENV}={asked}" if asked else "the cores this process may use"
    return (f"threads: {torch.get_num_threads()} ({source}; cores usable: {usable_cores()}; "
            f"change with --threads N or {ENV}=N)")


def take_threads_option(argv: list[str]) -> list[str]:
    """``argv`` without ``--threads N`` / ``--threads=N``, whose value goes into ``MFV_THREADS``
    (read by :func:`set_threads`, here and in the processes this one starts)."""
    out, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--threads" and index + 1 < len(argv):
            os.environ[ENV] = argv[index + 1]
            index += 2
            continue
        if token.startswith("--threads="):
            os.environ[ENV] = token.split("=", 1)[1]
        else:
            out.append(token)
        index += 1
    return out
