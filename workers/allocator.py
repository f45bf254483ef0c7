"""How the C allocator reuses memory in a process that streams images.

Every image a scan or a detector worker takes in costs a few blocks of megabytes (the file,
the decoded pixels, the resized copies, the model's input tensor) that live for a fraction
of a second while other images' blocks are still held. Left to its defaults, glibc's
malloc serves blocks that large with fresh ``mmap`` pages and gives them back on ``free``,
and keeps one arena per thread for up to eight threads per core: each new image then pays
the kernel to map and zero its pages again. On two cores with a GPU-like model, the kernel's
page clearing was 9% of a scan's profile and the engine ran at 0.64-0.80 of its intake
ceiling; with the settings below the page faults of a steady scan fall to nearly none and
the engine reaches 0.81-0.84 on the same files (``docs/performance.md``).

The settings: blocks up to 32 MiB (glibc's largest threshold; an 8-megapixel image as
Pillow stores RGB, 4 bytes a pixel) come from the heap, up to 256 MiB of freed heap stays
with each arena for the next images, and the threads share one arena per CPU the process
may use. Memory stays bounded by what the process holds at its peak (the scan's window and
memory budget), which the kept heap is reused for, not by how many images it has seen.
Only the commands that stream images (scan, eval, worker, serve) set them.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024**2  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 * 1024**2

# Set by the operator: their choice stands (and any glibc.malloc.* tunable).
_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def tune_for_images(cpus: int | None = None) -> bool:
    """Apply the settings above to this process (its entry point calls this once, before
    it starts threads). Returns whether they were applied: not where the C library is not
    glibc, nor where the environment already sets the allocator's options."""
    chosen = [name for name in _OPERATOR_SETTINGS if os.environ.get(name)]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        log.info("allocator left as configured", extra={"variables": ",".join(chosen)})
        return False
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system
        glibc = False
    if not glibc:
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt
    arenas = max(1, cpus or usable_cpus())
    answers = [
        libc.mallopt(parameter, value)
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, arenas),
        )
    ]
    applied = all(answer == 1 for answer in answers)
    if not applied:
        log.warning("the allocator refused its settings; images may cost fresh pages")
    return applied


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: those it may run on, fewer where a cgroup (v2) quota
    allows less (a container's CPU limit: ``cpu.max`` holds "quota period" or "max ...")."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    try:
        return max(1, min(cpus, math.ceil(int(quota) / int(period))))
    except (ValueError, ZeroDivisionError):
        return cpus
