"""``synthsentry``: the command line. It sits on top of everything else and holds no logic of
its own beyond parsing, wiring and printing; each command group is a module here.

    scan        local files through the scan pipeline
    detectors   the detector catalog: list, verify
    fleet       worker, ingest, submit, reconcile, status
    database    db upgrade | current
    tokens      API tokens: create, list, revoke
    serve       the HTTP API (embedded or fleet mode)
    scans       platform scans: submit, show (what /v1/scans does)
    callbacks   signed callbacks: deliver, failed, redeliver
    rescan      batch re-scans: create, status, cancel, list
    review      human review: export labelled examples, expire lapsed claims
    ensemble    stored ensemble configurations: list, show, activate
    eval        measure the detectors and the ensemble on a labelled set
    calibrate   fit a configuration and a threshold with a false-positive guarantee
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from synthsentry.cli import (
    calibrate,
    callbacks,
    database,
    detectors,
    ensemble,
    evaluate,
    fleet,
    rescan,
    review,
    scan,
    scans,
    serve,
    tokens,
)
from synthsentry.cli.common import EXIT_USAGE, CliError
from synthsentry.cli.output import POLICY
from synthsentry.settings import get_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthsentry",
        description="Score images for signs of AI generation and queue likely ones for "
        "human review. " + POLICY,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (
        scan,
        detectors,
        fleet,
        database,
        tokens,
        serve,
        scans,
        callbacks,
        rescan,
        review,
        evaluate,
        calibrate,
        ensemble,
    ):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError: a bad SYNTHSENTRY_* variable
        print(f"synthsentry: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from synthsentry import logs
    from workers import allocator

    logs.configure(settings.log_level, json_lines=settings.log_json)
    if getattr(args, "streams_images", False):
        allocator.tune_for_images()  # before any thread starts
    try:
        status: int = args.handler(args, settings)
    except CliError as exc:
        print(f"synthsentry: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("synthsentry: interrupted; results stored so far are kept", file=sys.stderr)
        return 130
    return status


__all__ = ["build_parser", "main"]
