"""``synthsentry callbacks``: the callback sender, and what an operator does with
deliveries (``workers.callbacks``, the same service as ``/v1/callbacks``).

    deliver              send due callbacks until stopped (SIGTERM/SIGINT); --once: one round
    failed [--token ID]  deliveries that gave up
    redeliver ID         send one again (re-enables its endpoint if it answered 410)
    rotate-key           re-encrypt every stored signing secret under the current secret key
                         (after SYNTHSENTRY_SECRET_KEY changed; docs/operations.md)
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.cli.probes import add_metrics_port, prepare_metrics_folder, serve_probes
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from workers.callbacks import CallbackPolicy, CallbackSender, DeliveryInfo


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "callbacks",
        help="signed callbacks to platforms: send them, list failed ones, send one again, "
        "re-encrypt their secrets under a new secret key",
        description="Callbacks are queued with the event that causes them (a scan's verdict, "
        "a moderator's decision) and sent by `callbacks deliver` (or, in the embedded mode, "
        "by `serve`). Any number of senders may run side by side.",
    )
    sub = group.add_subparsers(dest="callbacks_command", required=True)
    deliver = sub.add_parser("deliver", help="send due callbacks until stopped")
    deliver.add_argument("--once", action="store_true", help="one round, then exit")
    deliver.add_argument(
        "--concurrency", type=int, default=8, help="callbacks in flight at once (default 8)"
    )
    add_metrics_port(deliver)
    failed = sub.add_parser("failed", help="deliveries that gave up, newest first")
    failed.add_argument("--token", metavar="PUBLIC_ID", help="one token's deliveries only")
    failed.add_argument("--limit", type=int, default=100)
    failed.add_argument("--json", action="store_true", help="one JSON object per delivery")
    again = sub.add_parser("redeliver", help="send a delivery again")
    again.add_argument("delivery_id", metavar="DELIVERY_ID")
    sub.add_parser(
        "rotate-key",
        help="re-encrypt every stored signing secret under the current secret key",
        description="Run after SYNTHSENTRY_SECRET_KEY was changed, with the old key in "
        "SYNTHSENTRY_SECRET_KEY_PREVIOUS and every process rolled out with both: every "
        "stored callback signing secret is re-encrypted under the new key, in one "
        "transaction, after which the old key can be removed. Running it again rewrites "
        "nothing.",
    )
    group.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db.models import DeliveryState
    from db.session import transaction
    from workers import callbacks

    runtime = load_runtime(settings)
    session_factory = prepare_database(runtime)
    if args.callbacks_command == "deliver":
        if args.concurrency < 1:
            raise CliError("--concurrency must be at least 1", EXIT_USAGE)
        sender = callbacks.CallbackSender(runtime.callback_policy())
        if args.once:
            sent = callbacks.deliver_due(session_factory, sender, concurrency=args.concurrency)
            print(f"{sent} callback(s) attempted")
            return EXIT_OK
        return _deliver_until_stopped(args, settings, session_factory, sender)
    actor = f"cli:{getpass.getuser()}"
    if args.callbacks_command == "rotate-key":
        return _rotate_key(session_factory, runtime.callback_policy(), actor=actor)
    try:
        with transaction(session_factory) as session:
            if args.callbacks_command == "redeliver":
                info = callbacks.redeliver(session, args.delivery_id, token_id=None, actor=actor)
                print(f"delivery {info.id} to {info.url} queued again ({info.state.value})")
                return EXIT_OK
            token_id = callbacks.find_token(session, args.token).id if args.token else None
            listed = callbacks.list_deliveries(
                session,
                token_id=token_id,
                state=DeliveryState.FAILED,
                limit=args.limit,
            )
    except callbacks.CallbackNotFound as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    _print(listed, as_json=args.json)
    return EXIT_OK


def _rotate_key(
    session_factory: sessionmaker[Session], policy: CallbackPolicy, *, actor: str
) -> int:
    from db.session import transaction
    from workers import callbacks

    assert policy.box is not None  # the runtime always builds a box
    try:
        with transaction(session_factory) as session:
            done = callbacks.reencrypt_secrets(session, policy.box, actor=actor)
    except callbacks.SecretUnreadable as exc:
        raise CliError(str(exc)) from exc
    print(
        f"{done.reencrypted} callback signing secret(s) re-encrypted under the current secret "
        f"key, {done.already_current} already were"
    )
    if done.left_unreadable:
        print(
            f"{done.left_unreadable} no longer in use (expired, or of a revoked token), which "
            "no key decrypts, left as they are"
        )
    print("the previous secret keys are no longer needed: remove SYNTHSENTRY_SECRET_KEY_PREVIOUS")
    return EXIT_OK


def _deliver_until_stopped(
    args: argparse.Namespace,
    settings: Settings,
    session_factory: sessionmaker[Session],
    sender: CallbackSender,
) -> int:
    """The sender's loop, with its metrics and probes: alive while rounds keep turning,
    ready while the last round reached the database."""
    from workers import callbacks
    from workers.probes import Flag, LoopProbe, Readiness

    prepare_metrics_folder(forks=False)
    loop = LoopProbe(stale_after_s=300)
    reached = Flag()
    server = serve_probes(
        settings, args.metrics_port, live=loop.alive, readiness=Readiness({"database": reached})
    )

    def turned(ok: bool) -> None:
        loop.beat()
        reached.set(ok)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        callbacks.run_sender(
            stop, session_factory, sender, concurrency=args.concurrency, on_round=turned
        )
    finally:
        if server is not None:
            server.close()
    return EXIT_OK


def _print(listed: list[DeliveryInfo], *, as_json: bool) -> None:
    if as_json:
        for info in listed:
            print(json.dumps({**asdict(info), "state": info.state.value}))
        return
    print(f"{'ID':<28} {'TOKEN':<14} {'EVENT':<16} {'TRIES':>5} {'FINISHED':<32} LAST ERROR")
    for info in listed:
        print(
            f"{info.id:<28} {info.token:<14} {info.event_type:<16} {info.attempts:>5} "
            f"{info.finished_at or '-':<32} {info.last_error or '-'}"
        )
