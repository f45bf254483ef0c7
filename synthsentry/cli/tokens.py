"""``synthsentry tokens``: credentials of the HTTP API (``workers.tokens``)."""

from __future__ import annotations

import argparse
import getpass
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands
    from workers.tokens import IssuedToken


def register(commands: Commands) -> None:
    from db.models import TokenRole

    tokens = commands.add_parser(
        "tokens",
        help="API tokens: create (shown once), list, revoke",
        description="Tokens of the HTTP API. A token is shown once, when it is created; only "
        "its hash is stored. Every create and revoke is recorded in the audit log.",
    )
    sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = sub.add_parser("create", help="make a token and print it once")
    create.add_argument("--role", required=True, choices=[role.value for role in TokenRole])
    create.add_argument("--name", required=True, help="who or what uses it (a person, a platform)")
    create.add_argument(
        "--callback-host",
        action="append",
        default=[],
        metavar="HOST",
        help="platform tokens: a host its callbacks may go to (repeatable)",
    )
    create.add_argument("--json", action="store_true", help="print a JSON object")
    listing = sub.add_parser("list", help="every token, without its secret")
    listing.add_argument("--json", action="store_true", help="one JSON object per token")
    revoke = sub.add_parser("revoke", help="revoke a token by its id (see `tokens list`)")
    revoke.add_argument("public_id", metavar="ID")
    tokens.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db.models import TokenRole
    from db.session import transaction
    from workers import tokens

    runtime = load_runtime(settings)
    session_factory = prepare_database(runtime)
    actor = f"cli:{getpass.getuser()}"
    try:
        with transaction(session_factory) as session:
            if args.tokens_command == "create":
                role = TokenRole(args.role)
                issued = tokens.issue_token(
                    session,
                    role=role,
                    name=args.name,
                    actor=actor,
                    secret_box=(
                        runtime.callback_policy().box if role == TokenRole.PLATFORM else None
                    ),
                    callback_hosts=args.callback_host,
                )
            elif args.tokens_command == "revoke":
                revoked = tokens.revoke(session, args.public_id, actor=actor)
            else:
                listed = tokens.list_tokens(session)
    except tokens.TokenError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    if args.tokens_command == "create":
        _print_issued(issued, as_json=args.json)
    elif args.tokens_command == "revoke":
        print(f"token {args.public_id} {'revoked' if revoked else 'was revoked already'}")
    elif args.json:
        for info in listed:
            print(json.dumps({**asdict(info), "role": info.role.value}))
    else:
        print(f"{'ID':<14} {'ROLE':<10} {'CREATED':<26} {'REVOKED':<26} NAME")
        for info in listed:
            print(
                f"{info.public_id:<14} {info.role.value:<10} {info.created_at:<26} "
                f"{info.revoked_at or '-':<26} {info.name}"
            )
    return EXIT_OK


def _print_issued(issued: IssuedToken, *, as_json: bool) -> None:
    """The new token, and a platform token's callback signing secret: shown this once."""
    if as_json:
        print(json.dumps({**asdict(issued), "role": issued.role.value}))
        return
    print(issued.token)
    if issued.callback_secret is not None:
        print(f"callback signing secret: {issued.callback_secret}")
    they = ("they are", "them") if issued.callback_secret is not None else ("it is", "it")
    print(
        f"token {issued.public_id} ({issued.role.value}) for {issued.name}: {they[0]} "
        f"shown this once; keep {they[1]} in a secret store.",
    )
    if issued.callback_hosts:
        print(f"callbacks may go to: {', '.join(issued.callback_hosts)}")
