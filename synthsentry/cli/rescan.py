"""``synthsentry rescan``: batch re-scans from the command line (``workers.rescans``, the
services ``/v1/rescans`` calls). The listing itself runs in ``synthsentry reconcile`` (the
fleet) or in ``synthsentry serve``'s worker (the embedded mode)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from workers.events import BucketPolicy
    from workers.rescans import RescanView, Selection

FOLLOW_EVERY_S = 1.0


def register(commands: Commands) -> None:
    rescan = commands.add_parser(
        "rescan",
        help="batch re-scans: create, status, cancel, list",
        description="Score again every object under a prefix, a list of keys, or stored "
        "images, on the low-priority queues (uploads are served first). The listing runs in "
        "`synthsentry reconcile` (fleet) or `synthsentry serve` (embedded), a page at a "
        "time; every create and cancel is recorded in the audit log.",
    )
    sub = rescan.add_subparsers(dest="rescan_command", required=True)

    create = sub.add_parser(
        "create",
        help="start a re-scan",
        description="Exactly one selection: --bucket with --prefix or --keys-from, or "
        "--images all|stale, or --detector NAME (the images that detector scored). Buckets "
        "must be in SYNTHSENTRY_ALLOWED_BUCKETS.",
    )
    create.add_argument("--bucket", help="the bucket of --prefix or --keys-from")
    create.add_argument("--prefix", help="every object under this key prefix ('' for all)")
    create.add_argument(
        "--keys-from",
        type=Path,
        metavar="FILE",
        help="a file of keys, one per line (at most 1000; '-' reads standard input)",
    )
    create.add_argument(
        "--images",
        choices=["all", "stale"],
        help="stored images: all, or those not scored under the active ensemble or missing "
        "an answer from a detector's current version",
    )
    create.add_argument("--detector", metavar="NAME", help="the stored images NAME scored")
    create.add_argument("--follow", action="store_true", help="show its progress until it ends")
    create.add_argument("--json", action="store_true", help="print a JSON object")

    status = sub.add_parser("status", help="counts, throughput and ETA of a re-scan")
    status.add_argument("id", metavar="ID")
    status.add_argument("--follow", action="store_true", help="show its progress until it ends")
    status.add_argument("--json", action="store_true", help="print a JSON object")

    cancel = sub.add_parser("cancel", help="stop a re-scan: items not yet taken in are skipped")
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--json", action="store_true", help="print a JSON object")

    listing = sub.add_parser("list", help="the newest re-scans")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="one JSON object per re-scan")
    rescan.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db.session import transaction
    from workers import rescans

    selection = _selection(args) if args.rescan_command == "create" else None
    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime)
    actor = f"cli:{getpass.getuser()}"
    try:
        with transaction(session_factory) as session:
            if selection is not None:
                views = [
                    rescans.create_rescan(
                        session, selection, policy=_policy(runtime.allowed_buckets), actor=actor
                    )
                ]
            elif args.rescan_command == "status":
                views = [rescans.rescan_status(session, args.id)]
            elif args.rescan_command == "cancel":
                views = [rescans.cancel_rescan(session, args.id, actor=actor)]
            else:
                views = rescans.list_rescans(session, limit=max(1, args.limit))
    except rescans.RescanError as exc:
        status = EXIT_USAGE if isinstance(exc, rescans.InvalidSelection) else EXIT_FAILURE
        raise CliError(str(exc), status) from exc
    if getattr(args, "follow", False):
        return _follow(session_factory, views[0].id)
    if args.rescan_command == "list" and not args.json:
        print(f"{'ID':<20} {'STATE':<10} {'LISTED':>8} {'DONE':>8} {'LEFT':>8}  SELECTION")
    for view in views:
        if args.json:
            print(json.dumps(view.as_dict()))
        elif args.rescan_command == "list":
            print(
                f"{view.id:<20} {view.state.value:<10} {view.listed:>8} {view.counts.done:>8} "
                f"{view.counts.pending:>8}  {json.dumps(view.selection)[:80]}"
            )
        else:
            print(_describe(view))
    return EXIT_OK


def _selection(args: argparse.Namespace) -> Selection:
    from workers import rescans

    keys = None
    if args.keys_from is not None:
        keys = _read_keys(args.keys_from)
    try:
        return rescans.parse_selection(
            bucket=args.bucket,
            prefix=args.prefix,
            keys=keys,
            images=args.images,
            detector=args.detector,
        )
    except rescans.InvalidSelection as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _read_keys(path: Path) -> list[str]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read keys from {path}: {exc}", EXIT_USAGE) from exc
    return [line for line in text.splitlines() if line.strip()]


def _policy(allowed: str) -> BucketPolicy | None:
    from workers.events import BucketPolicy

    if not allowed.strip():
        return None
    try:
        return BucketPolicy.parse(allowed)
    except ValueError as exc:
        raise CliError(f"SYNTHSENTRY_ALLOWED_BUCKETS: {exc}", EXIT_USAGE) from exc


def _describe(view: RescanView) -> str:
    counts = view.counts
    eta = "-" if view.eta_seconds is None else f"{view.eta_seconds:.0f} s"
    counted = "not counted yet"
    if view.counted_at is not None:
        counted = f"counted {view.counted_at.isoformat(timespec='seconds')}"
    return (
        f"re-scan {view.id} ({view.state.value}) {json.dumps(view.selection)[:200]}\n"
        f"  listed {view.listed}, queued {view.queued}, pending {counts.pending}, "
        f"done {counts.done} (reused {counts.reused}), rejected {counts.rejected}, "
        f"failed {counts.failed}, cancelled {counts.cancelled} ({counted})\n"
        f"  {view.throughput:.1f} items/s, ETA {eta}"
    )


def _follow(session_factory: sessionmaker[Session], public_id: str) -> int:
    """A progress bar until the re-scan is done or cancelled (Ctrl-C leaves it running)."""
    from tqdm import tqdm

    from db.models import RescanState
    from workers import rescans

    stop = threading.Event()
    with tqdm(desc=public_id, unit="item", dynamic_ncols=True) as bar:
        while True:
            with session_factory() as session:
                view = rescans.rescan_status(session, public_id)
            counts = view.counts
            finished = counts.done + counts.rejected + counts.failed + counts.cancelled
            bar.total = view.total if view.total is not None else max(view.listed, 1)
            bar.n = finished
            bar.set_postfix(
                state=view.state.value,
                listed=view.listed,
                reused=counts.reused,
                rejected=counts.rejected,
                failed=counts.failed,
                refresh=False,
            )
            bar.refresh()
            if view.state in (RescanState.DONE, RescanState.CANCELLED):
                break
            stop.wait(FOLLOW_EVERY_S)
    print(_describe(view))
    return EXIT_OK if view.state == RescanState.DONE else EXIT_FAILURE
