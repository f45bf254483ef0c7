"""``synthsentry scans``: platform scans from the command line, through the services the
``/v1/scans`` endpoints call (``workers.submissions``). Scans made here belong to no token:
an admin token reads them over HTTP.

    scans submit s3://BUCKET/KEY ... [--external-id X] [--priority low] [--json]
    scans show SCAN_ID [--wait SECONDS] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from synthsentry.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    load_runtime,
    parse_s3_uri,
    with_active_ensemble,
)
from synthsentry.cli.database import prepare_database
from synthsentry.cli.output import POLICY
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands

_POLL_S = 0.5


def register(commands: Commands) -> None:
    scans = commands.add_parser(
        "scans",
        help="platform scans: submit objects, show a scan (what /v1/scans does)",
        description="Submit S3 objects as platform scans, or show one scan as the API "
        "answers it. In the fleet mode the work is queued; in the embedded mode a running "
        "`synthsentry serve` picks it up. " + POLICY,
    )
    sub = scans.add_subparsers(dest="scans_command", required=True)
    submit = sub.add_parser("submit", help="scan objects (each its own scan)")
    submit.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    submit.add_argument("--external-id", help="your own id, echoed in every answer")
    submit.add_argument("--priority", choices=["normal", "low"], default="normal")
    submit.add_argument("--json", action="store_true", help="print a JSON object")
    submit.set_defaults(handler=submit_scans)
    show = sub.add_parser("show", help="one scan's result, review state and decision")
    show.add_argument("scan_id", metavar="SCAN_ID")
    show.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the result")
    show.add_argument("--json", action="store_true", help="print the whole document")
    show.set_defaults(handler=show_scan)


def submit_scans(args: argparse.Namespace, settings: Settings) -> int:
    from db.models import ScanPriority
    from workers import submissions
    from workers.dispatch import Dispatcher, LeftForSweep
    from workers.events import BucketPolicy

    objects = [submissions.ObjectRef(*parse_s3_uri(uri)) for uri in args.uris]
    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime)
    runtime = with_active_ensemble(runtime, session_factory)
    dispatcher: Dispatcher = LeftForSweep()
    if not runtime.embedded_api:
        from tasks.app import configure
        from tasks.submit import CeleryDispatcher

        configure(settings)
        dispatcher = CeleryDispatcher()
    try:
        buckets = BucketPolicy.parse(runtime.allowed_buckets) if runtime.allowed_buckets else None
    except ValueError as exc:
        raise CliError(f"SYNTHSENTRY_ALLOWED_BUCKETS: {exc}", EXIT_USAGE) from exc
    try:
        submitted = submissions.submit_objects(
            session_factory,
            dispatcher,
            submissions.ScanRequest(
                objects=objects,
                external_id=args.external_id,
                priority=ScanPriority(args.priority),
            ),
            submissions.Caller(token_id=None, actor="cli"),
            submissions.SubmitPolicy(
                buckets=buckets,
                upload_bucket=runtime.upload_bucket,
                upload_prefix=runtime.upload_prefix,
                limits=runtime.limits,
            ),
        )
    except submissions.SubmissionRefused as exc:
        raise CliError(exc.detail, EXIT_USAGE) from exc
    if args.json:
        print(json.dumps({"scans": submitted.scan_ids}))
    else:
        for uri, scan_id in zip(args.uris, submitted.scan_ids, strict=True):
            print(f"{uri}: {scan_id}")
    return EXIT_OK


def show_scan(args: argparse.Namespace, settings: Settings) -> int:
    from workers import submissions

    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime)
    runtime = with_active_ensemble(runtime, session_factory)
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            document = submissions.read_scan(
                session_factory,
                args.scan_id,
                submissions.Reader(token_id=None),
                active_ensemble=runtime.fleet_ensemble.version,
            )
        except submissions.ScanNotFound as exc:
            raise CliError(str(exc)) from exc
        if document["finished"] or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)  # waiting for a result with a deadline, as ?wait does
    if args.json:
        print(json.dumps(document, ensure_ascii=False))
        return EXIT_OK
    decision = document["decision"]
    print(
        f"{document['id']} {document['object']['bucket']}/{document['object']['key']}: "
        f"{document['verdict']}"
        + (f" (ai_score {document['ai_score']:.2f})" if document["ai_score"] is not None else "")
        + (" FLAGGED for review" if document["flagged"] else "")
        + f"; review {document['review_state']}"
        + (f", decided {decision['label']}" if decision else "")
    )
    return EXIT_OK
