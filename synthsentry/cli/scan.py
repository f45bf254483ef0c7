"""``synthsentry scan``: local files through the scan pipeline (``workers.scan``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, deciding_ensemble, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.cli.detectors import load_detectors
from synthsentry.cli.output import POLICY, print_json_line, print_table, with_progress
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime
    from workers.detectors.base import DetectorSpec
    from workers.ensemble import EnsembleConfig


def register(commands: Commands) -> None:
    scan = commands.add_parser(
        "scan",
        help="scan local files or folders and store one verdict per file",
        description="Scan image files (folders are walked recursively) with the detector "
        "ensemble, store every result in the configured database and print one result per "
        "file. Rejected files (not images, truncated, too large, ...) are results too. " + POLICY,
    )
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    scan.add_argument(
        "--detector",
        action="append",
        default=[],
        metavar="SPEC",
        help="NAME or NAME=WEIGHTS_URI (local path, s3://bucket/key, hf://org/repo[@rev][/file]);"
        " repeatable. Default: every built-in detector that can run on this machine.",
    )
    scan.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    scan.add_argument(
        "--threshold", type=float, default=None, help="review threshold for ai_score (0..1)"
    )
    scan.add_argument(
        "--batch-size", type=int, default=None, help="images per model batch (default: setting)"
    )
    scan.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    scan.set_defaults(handler=run, streams_images=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.scan import Scanner, iter_image_paths

    runtime = load_runtime(settings)
    # The runtime checks the values as the settings do; the messages name the options.
    if args.threshold is not None:
        try:
            runtime = runtime.replace(threshold=args.threshold)
        except ValueError as exc:
            raise CliError("--threshold must be between 0 and 1", EXIT_USAGE) from exc
    if args.batch_size is not None:
        try:
            runtime = runtime.replace(batch_size=args.batch_size)
        except ValueError as exc:
            raise CliError("--batch-size must be at least 1", EXIT_USAGE) from exc
    paths = list(iter_image_paths(args.paths))
    session_factory = prepare_database(runtime)
    detectors = load_detectors(args.detector, runtime)
    ensemble, active = _ensemble(args, runtime, session_factory, [d.spec for d in detectors])
    scanner = Scanner(
        detectors,
        session_factory,
        runtime.limits,
        ensemble,
        batch_size=runtime.batch_size,
        decode_threads=runtime.intake_threads,
        memory_budget=runtime.intake_memory_bytes,
        active=active,
    )
    outcomes = []
    for outcome in with_progress(
        scanner.scan(paths), total=len(paths), what="scanning", enabled=not args.no_progress
    ):
        if args.json:
            print_json_line(outcome)
        else:
            outcomes.append(outcome)
    if not args.json:
        print_table(outcomes, sys.stdout)
    return EXIT_OK


def _ensemble(
    args: argparse.Namespace,
    runtime: Runtime,
    session_factory: sessionmaker[Session],
    specs: list[DetectorSpec],
) -> tuple[EnsembleConfig, bool]:
    """The configuration this scan decides with, and whether it is the active one. With
    its own threshold or detectors a scan is ad hoc: its verdicts are stored and may open
    review cases, but only the active configuration's verdicts withdraw one. A configuration
    an operator activated decides when it combines exactly this scan's detectors; with
    other detectors the scan is ad hoc too, and says so."""
    if args.threshold is not None or args.detector:
        return runtime.ensemble(specs), False
    config, unused = deciding_ensemble(runtime, session_factory, specs)
    if unused is not None:
        print(f"synthsentry: {unused}, and this scan's verdicts are ad hoc", file=sys.stderr)
    return config, unused is None
