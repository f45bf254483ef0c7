"""The requirements one image installs, read from pyproject.toml at build time.

The API image must not carry the model stack: ``synthsentry serve`` (and the other
processes that image runs: migrations, the reconciler, the callback sender, the SQS
ingest) never import torch, yet pyproject.toml lists it among the project's dependencies
because the scanner and the detector workers need it. pip cannot install a project
while leaving out one of its dependencies, so the image installs this list, then the
project itself with ``--no-deps``. Reading the list from pyproject.toml keeps one source
of truth: a dependency added there reaches every image without editing the Dockerfile.

    python docker/requirements.py api --extra heif      > requirements-api.txt
    python docker/requirements.py worker --extra heif   > requirements-worker.txt

Only the standard library: it runs in the build stage before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

# Distributions each image leaves out (PEP 503 normalised names). The API image drops the
# model stack and what exists only for it: invisible-watermark requires torch (and brings
# OpenCV, which needs libGL); timm and torchvision are torch libraries. The workers keep
# everything: their torch build is installed first, from the index the image chose.
WITHOUT: dict[str, frozenset[str]] = {
    "api": frozenset({"torch", "torchvision", "timm", "invisible-watermark"}),
    "worker": frozenset(),
}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Pillow_HEIF`` == ``pillow-heif``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution a requirement string names (``celery[redis]>=5.4`` -> ``celery``)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalise(match.group(1))


def requirements(pyproject: Path, image: str, extras: Sequence[str] = ()) -> list[str]:
    """The project's dependencies plus those of ``extras``, less what ``image`` leaves out,
    as written in pyproject.toml."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; known: {sorted(optional)}")
    listed = [*project["dependencies"], *(r for extra in extras for r in optional[extra])]
    left_out = WITHOUT[image]
    return [r for r in listed if requirement_name(r) not in left_out]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", choices=sorted(WITHOUT))
    parser.add_argument("--extra", action="append", default=[], help="an optional extra")
    parser.add_argument(
        "--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml"
    )
    args = parser.parse_args(argv)
    for requirement in requirements(args.pyproject, args.image, args.extra):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
