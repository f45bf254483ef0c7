"""``synthsentry ensemble``: the stored ensemble configurations (``workers.ensembles``).

list [--json]                   every stored configuration, newest first
show VERSION [--json]           its definition, detectors and provenance
activate VERSION                make it the one the fleet and the scan decide with
activate --from-settings        store the settings' configuration and activate it
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands
    from workers.ensembles import StoredEnsemble


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "ensemble",
        help="stored ensemble configurations: list, show, activate",
        description="A configuration decides verdicts from the detectors' scores (rule, "
        "weights, calibrations, threshold). `synthsentry calibrate` stores fitted ones; "
        "nothing changes until an operator activates one here (audited). Processes read "
        "the active configuration when they start.",
    )
    sub = group.add_subparsers(dest="ensemble_command", required=True)
    listing = sub.add_parser("list", help="every stored configuration, newest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="a configuration's definition and provenance")
    show.add_argument("version", metavar="VERSION")
    show.add_argument("--json", action="store_true")
    activate = sub.add_parser("activate", help="make a stored configuration the active one")
    which = activate.add_mutually_exclusive_group(required=True)
    which.add_argument("version", metavar="VERSION", nargs="?")
    which.add_argument(
        "--from-settings",
        action="store_true",
        help="store the configuration the settings describe for the fleet's detectors, and "
        "activate it (back to the settings after a fitted one)",
    )
    group.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers import ensembles

    runtime = load_runtime(settings, fleet=args.ensemble_command == "activate")
    session_factory = prepare_database(runtime)
    try:
        if args.ensemble_command == "list":
            for stored in ensembles.configurations(session_factory):
                print(json.dumps(stored.as_dict()) if args.json else _line(stored))
            return EXIT_OK
        if args.ensemble_command == "show":
            stored = ensembles.show(session_factory, args.version)
            print(json.dumps(stored.as_dict(), indent=None if args.json else 2))
            return EXIT_OK
        version = args.version
        if args.from_settings:
            version = ensembles.save(
                session_factory,
                runtime.fleet_ensemble,
                detectors=runtime.fleet_detectors,
                provenance={"source": "settings"},
            ).version
        stored = ensembles.activate(
            session_factory,
            version,
            actor=f"cli:{getpass.getuser()}",
            running_detectors=runtime.fleet_detectors,
        )
    except ensembles.EnsembleRefused as exc:
        raise CliError(exc.detail, EXIT_USAGE if exc.status < 500 else 1) from exc
    if not stored.active:
        raise CliError(f"{stored.version} was activated, but another activation is newer")
    print(
        f"{stored.version} is active; processes that start from now on decide with it "
        "(restart the fleet's workers, the reconciler and the API to switch them)"
    )
    return EXIT_OK


def _line(stored: StoredEnsemble) -> str:
    mark = "*" if stored.active else " "
    source = stored.provenance.get("source", "stored under a verdict")
    if stored.config is None:
        return f"{mark} {stored.version}  (a legacy record: verdicts {stored.verdicts})"
    return (
        f"{mark} {stored.version}  {stored.config.rule}  threshold "
        f"{stored.config.threshold:.4g}  detectors {','.join(stored.detectors) or '-'}  "
        f"verdicts {stored.verdicts}  created {stored.created_at}  ({source})"
    )
