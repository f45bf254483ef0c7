"""``synthsentry review``: the human review from the command line (``workers.review``, the
same service as the dashboard and ``/v1/reviews``).

    export --format csv|jsonl [--output FILE]   decided cases as labelled examples
    expire                                      return cases with lapsed claims to the queue
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "review",
        help="human review: export labelled examples, expire lapsed claims",
        description="Moderators review flagged images on the dashboard (`synthsentry serve`, "
        "then /review). Decided cases are labelled examples for calibration.",
    )
    sub = group.add_subparsers(dest="review_command", required=True)
    export = sub.add_parser(
        "export",
        help="decided cases as labelled examples (sha256, sources, scores and versions at "
        "decision time, label)",
    )
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    export.add_argument(
        "--output", type=Path, metavar="FILE", help="write here instead of standard output"
    )
    sub.add_parser("expire", help="return cases whose claim lapsed to the queue (audited)")
    group.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers import review
    from workers.review_export import write_examples

    runtime = load_runtime(settings)
    session_factory = prepare_database(runtime)
    if args.review_command == "expire":
        print(f"{review.expire_leases(session_factory)} claim(s) expired")
        return EXIT_OK
    examples = review.labelled_examples(session_factory)
    if args.output is None:
        count = write_examples(examples, args.format, sys.stdout)
    else:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            count = write_examples(examples, args.format, out)
    print(f"{count} labelled example(s)", file=sys.stderr)
    return EXIT_OK
