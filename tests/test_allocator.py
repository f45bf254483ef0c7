"""The C allocator's settings for image-streaming processes (``workers.allocator``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers import allocator

GLIBC = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _run(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter (the settings are process-wide and for good)."""
    ours = {*allocator._OPERATOR_SETTINGS, "GLIBC_TUNABLES"}
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's (mallopt)")
def test_a_process_keeps_freed_image_blocks_for_the_next_images() -> None:
    # A scan holds a window of images at once and frees them as they are stored: blocks
    # freed together must stay mapped for the next window, not go back to the kernel to be
    # mapped and zeroed again (glibc's defaults trim them once they outgrow twice the
    # largest block, so every round costs a fresh page per 4 KiB).
    code = """
        import ctypes, resource
        from workers import allocator
        tuned = allocator.tune_for_images(cpus=2)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        BLOCK = 3 << 20  # a megapixel's RGB pixels
        def rounds(n):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):
                window = [libc.malloc(BLOCK) for _ in range(10)]
                for block in window:
                    ctypes.memset(block, 1, BLOCK)  # every page touched, as a decoder does
                for block in window:
                    libc.free(block)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        rounds(1)
        print(tuned, rounds(10))
    """
    tuned, faults = _run(code).split()
    assert tuned == "True"
    window_pages = 10 * (3 << 20) // 4096
    assert int(faults) < window_pages  # less than one window's pages in ten rounds
    if HUGE_PAGES.exists() and "[always]" in HUGE_PAGES.read_text():
        return  # the heap faults in 2 MiB pages: the defaults' cost is not counted alike
    untuned = _run(code.replace("allocator.tune_for_images(cpus=2)", "False")).split()[1]
    assert int(untuned) >= 5 * window_pages  # the defaults give most rounds fresh pages


def test_the_operators_own_settings_stand() -> None:
    code = "from workers import allocator; print(allocator.tune_for_images())"
    assert _run(code, MALLOC_ARENA_MAX="4") == "False"
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.trim_threshold=0") == "False"
    if GLIBC:  # a tunable of something else leaves the allocator to us
        assert _run(code, GLIBC_TUNABLES="glibc.pthread.rseq=0") == "True"


def test_arenas_follow_the_cpus_a_container_may_use(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # one CPU's worth
    assert allocator.usable_cpus(quota) == 1
    quota.write_text("150000 100000\n")  # one and a half: two arenas, if it may use two
    assert allocator.usable_cpus(quota) == min(cpus, 2)
    quota.write_text("max 100000\n")
    assert allocator.usable_cpus(quota) == cpus
    assert allocator.usable_cpus(tmp_path / "absent") == cpus
