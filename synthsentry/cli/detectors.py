"""``synthsentry detectors list | verify``, and loading the detectors a scan asks for."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, load_runtime
from synthsentry.runtime import Runtime
from synthsentry.settings import Settings
from workers.detectors.base import Detector, DetectorSpec, DetectorUnavailable
from workers.detectors.registry import SpecError

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands


def register(commands: Commands) -> None:
    detectors = commands.add_parser("detectors", help="inspect the detector catalog")
    detector_commands = detectors.add_subparsers(dest="detectors_command", required=True)
    listing = detector_commands.add_parser(
        "list", help="list known detectors and whether their weights are on this machine"
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=list_detectors)
    verify = detector_commands.add_parser(
        "verify",
        help="load a detector (downloading its weights if needed), check the pinned hash, "
        "run one forward pass and print timings",
    )
    verify.add_argument("selector", metavar="NAME[=WEIGHTS_URI]")
    verify.set_defaults(handler=verify_detector)


def weights_status(spec: DetectorSpec, runtime: Runtime) -> str:
    """Where the weights stand, without downloading anything."""
    if spec.weights is None:
        return "none needed"
    if spec.weights.startswith("s3://"):
        return "remote (s3, fetched on first use)"
    try:
        runtime.weights_resolver(local_only=True)(spec.weights, spec.name)
    except DetectorUnavailable:
        return "not on this machine" if spec.weights.startswith("hf://") else "missing"
    return "cached" if spec.weights.startswith("hf://") else "local"


def list_detectors(args: argparse.Namespace, settings: Settings) -> int:
    runtime = load_runtime(settings)
    rows = [
        {
            "name": spec.name,
            "family": spec.family,
            "version": spec.version,
            "weights": spec.weights,
            "weights_status": weights_status(spec, runtime),
            "device": "cpu" if spec.family == "provenance" else runtime.device,
            "description": spec.description,
        }
        for spec in runtime.catalog.specs.values()
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    print(
        f"{'NAME':<16} {'FAMILY':<10} {'VERSION':<8} {'DEVICE':<7} {'WEIGHTS STATUS':<20} WEIGHTS"
    )
    for row in rows:
        print(
            f"{row['name']:<16} {row['family']:<10} {row['version']:<8} {row['device']:<7} "
            f"{row['weights_status']:<20} {row['weights'] or '-'}"
        )
    return EXIT_OK


def verify_detector(args: argparse.Namespace, settings: Settings) -> int:
    from PIL import Image

    runtime = load_runtime(settings)
    try:
        spec = runtime.catalog.resolve(args.selector)
    except SpecError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    started = time.perf_counter()
    try:
        detector = runtime.build_detector(spec)
    except DetectorUnavailable as exc:
        raise CliError(f"detector {spec.name} cannot run: {exc}") from exc
    loaded = time.perf_counter()
    # A smooth synthetic picture: enough to prove the forward pass runs end to end.
    probe = Image.linear_gradient("L").resize((512, 384)).convert("RGB")
    (output,) = detector.detect_batch([probe], [b""])
    first = time.perf_counter()
    detector.detect_batch([probe], [b""])
    second = time.perf_counter()
    print(f"detector        {spec.name} ({spec.family})")
    print(f"weights         {spec.weights or '-'}")
    print(f"weights sha256  {detector.weights_sha256 or '-'}")
    print(f"version         {detector.version}")
    print(f"device          {runtime.device}")
    print(f"load            {(loaded - started) * 1000:.0f} ms (fetch, hash check, build)")
    print(f"first forward   {(first - loaded) * 1000:.0f} ms")
    print(f"second forward  {(second - first) * 1000:.0f} ms")
    score = "abstained" if output.score is None else f"{output.score:.4f}"
    print(f"probe score     {score} (a synthetic gradient; says nothing about real images)")
    return EXIT_OK


def load_detectors(selectors: list[str], runtime: Runtime) -> list[Detector]:
    """The detectors named (``NAME`` or ``NAME=WEIGHTS_URI``), downloading their weights;
    without names, every built-in whose weights are already here (the others are listed
    on stderr with the reason)."""
    if selectors:
        detectors = []
        for selector in selectors:
            try:
                detectors.append(runtime.build_detector(runtime.catalog.resolve(selector)))
            except SpecError as exc:
                raise CliError(str(exc), EXIT_USAGE) from exc
            except DetectorUnavailable as exc:
                # Asked for by name: running without it would answer a different question.
                raise CliError(f"detector {selector.partition('=')[0]} cannot run: {exc}") from exc
        return detectors
    # The default ensemble uses what is already on this machine: a scan should not start
    # gigabytes of downloads as a side effect. Naming a detector downloads its weights.
    built, skipped = runtime.build_available()
    for item in skipped:
        print(f"skipped detector {item.name}: {item.why}", file=sys.stderr)
    if not built:
        print(
            "warning: no detector can run on this machine; every scored file will be "
            "'inconclusive'. Provide weights with --detector NAME=/path/to/weights.",
            file=sys.stderr,
        )
    return built
