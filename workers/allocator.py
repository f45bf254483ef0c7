"""How the C allocator reuses memory in a process that streams images.

Every image a scan or a detector worker takes in costs a few blocks of megabytes (the file,
the decoded pixels, the resized copies, the model's input tensor) that live for a fraction
of a second while other images' blocks are still held. Left to its defaults, glibc's
malloc serves blocks that large with fresh ``mmap`` pages and gives them back on ``free``,
and keeps one arena per thread for up to eight threads per core: each new image then pays
the kernel to map and zero its pages again. On two cores with a GPU-like model, that was a
sixth of the intake threads' time (``clear_page`` in the kernel), the engine at 0.75 of its
intake ceiling; with the settings below the page faults of a steady scan fall to nearly
none and the engine reaches 0.82-0.84 (``docs/performance.md``).

The settings: blocks up to 32 MiB (glibc's largest threshold; a 10-megapixel RGB image)
come from the heap, up to 256 MiB of freed heap stays with the process for the next
images, and the threads share one arena per core. Memory stays bounded by what the
process holds at its peak (the scan's window and memory budget), not by how many images it
has seen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024**2  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 * 1024**2

# Set by the operator: their choice stands.
_OPERATOR_SETTINGS = (
    "GLIBC_TUNABLES",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_ARENA_MAX",
)


def tune_for_images(cpus: int | None = None) -> bool:
    """Apply the settings above to this process (its entry point calls this once, before
    it starts threads). Returns whether they were applied: not where the C library is not
    glibc, nor where the environment already sets the allocator's options."""
    chosen = [name for name in _OPERATOR_SETTINGS if os.environ.get(name)]
    if chosen:
        log.info("allocator left as configured", extra={"variables": ",".join(chosen)})
        return False
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system
        glibc = False
    if not glibc:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    arenas = max(1, cpus or len(os.sched_getaffinity(0)))
    applied = all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, arenas),
        )
    )
    if not applied:
        log.warning("the allocator refused its settings; images may cost fresh pages")
    return applied
