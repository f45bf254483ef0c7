"""The scoring core's intake step: refusals are outcomes, a short process is trouble that
passes, and bytes that were read keep their identity."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from workers import scoring
from workers.intake import IntakeLimits, Rejected, RejectReason

from badfiles import sample_picture

LIMITS = IntakeLimits(max_bytes=1 << 30, max_pixels=1 << 30, decode_timeout_s=60)
REPO = Path(__file__).resolve().parents[1]


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    sample_picture(size).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_accepted_upload_has_its_identity_and_pixels() -> None:
    data = _png((40, 30))
    intake = scoring.take_in(lambda: data, LIMITS)
    assert intake.rejection is None and intake.decoded is not None
    assert intake.sha256 == scoring.sha256_of(data)
    facts = intake.facts()
    assert facts is not None and (facts.width, facts.height, facts.format) == (40, 30, "PNG")
    released = intake.released()
    assert released.decoded is None and released.data == b"" and released.sha256 == intake.sha256
    kept = released.facts()
    assert kept is not None and (kept.sha256, kept.size_bytes) == (intake.sha256, len(data))


def test_refused_bytes_keep_their_identity_and_unread_ones_have_none() -> None:
    junk = scoring.take_in(lambda: b"just text", LIMITS)
    assert junk.rejection is not None and junk.rejection.reason == RejectReason.NOT_AN_IMAGE
    assert junk.sha256 == scoring.sha256_of(b"just text")

    def vanished() -> bytes:
        raise Rejected(RejectReason.MISSING, "gone")

    missing = scoring.take_in(vanished, LIMITS)
    assert missing.rejection is not None and missing.sha256 is None and missing.facts() is None


def test_storage_trouble_propagates_for_a_retry() -> None:
    def unreachable() -> bytes:
        raise scoring.TransientError("S3 unreachable")

    with pytest.raises(scoring.TransientError):
        scoring.take_in(unreachable, LIMITS)


def test_a_process_out_of_memory_is_trouble_that_passes_not_a_bad_upload(tmp_path: Path) -> None:
    """Run in a process whose address space is capped just above what it uses: decoding a
    large (valid) PNG then fails to allocate, which must not become a permanent rejection."""
    image = tmp_path / "large.png"
    image.write_bytes(_png((6000, 6000)))  # ~108 MB of pixels once decoded
    probe = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
from workers import scoring
from workers.intake import IntakeLimits
data = open({str(image)!r}, "rb").read()
with open("/proc/self/status") as status:
    used = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 48 * 1024 * 1024, resource.RLIM_INFINITY))
try:
    scoring.take_in(lambda: data, IntakeLimits(1 << 30, 1 << 30, 60))
except scoring.TransientError as exc:
    print("transient:", exc)
else:
    print("decoded")
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("transient: out of memory"), result.stdout
