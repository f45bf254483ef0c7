"""``synthsentry calibrate``: fit a new ensemble configuration on a labelled set and choose
its threshold with a false-positive guarantee (``workers.evaluation.calibrate``); store it
for an operator to activate (``synthsentry ensemble activate``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, deciding_ensemble, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.cli.detectors import load_detectors
from synthsentry.cli.evaluate import evaluation_database, scoring_engine
from synthsentry.cli.output import with_progress
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands

T = TypeVar("T")


def register(commands: Commands) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="fit a configuration and a threshold with a false-positive guarantee",
        description="Fit each detector's calibration and the ensemble's combination on a "
        "labelled set (the datasets of `synthsentry eval`, a review export included, so "
        "moderators' decisions tune the fleet), and choose the flag threshold on held-out "
        "real images so that, with probability 1 - delta, at most alpha of real images are "
        "flagged by the score (Neyman-Pearson order statistic); or for a review share. The "
        "result is stored, not activated: `synthsentry ensemble activate VERSION`.",
    )
    parser.add_argument("dataset", type=Path, metavar="DATASET", help="folder, .csv or .jsonl")
    parser.add_argument("--detector", action="append", default=[], metavar="SPEC")
    parser.add_argument("--method", choices=("platt", "temperature", "isotonic"), default="platt")
    parser.add_argument("--combine", choices=("logistic", "weighted-mean"), default="logistic")
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--alpha", type=float, default=None, help="target false-positive rate (default 0.01)"
    )
    target.add_argument(
        "--review-share",
        type=float,
        default=None,
        metavar="SHARE",
        help="flag about this share of the set instead of bounding the false-positive rate",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=0.05,
        help="the guarantee fails with at most this probability",
    )
    parser.add_argument("--held-out", type=float, default=0.3, metavar="SHARE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", metavar="URL", default=None, help="as for eval")
    parser.add_argument("--json", action="store_true", help="print the stored configuration")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers import ensembles
    from workers.evaluation.calibrate import CalibrationRefused, Request, calibrate
    from workers.evaluation.datasets import DatasetError
    from workers.evaluation.run import EvaluationError, open_dataset, scored

    runtime = load_runtime(settings)
    alpha = args.alpha if args.alpha is not None or args.review_share is not None else 0.01
    if alpha is not None and not 0 < alpha < 1:
        raise CliError("--alpha must be between 0 and 1", EXIT_USAGE)
    if not 0 < args.delta < 1 or not 0 < args.held_out < 1:
        raise CliError("--delta and --held-out must be between 0 and 1", EXIT_USAGE)
    if args.review_share is not None and not 0 < args.review_share < 1:
        raise CliError("--review-share must be between 0 and 1", EXIT_USAGE)
    try:
        dataset = open_dataset(args.dataset)
    except DatasetError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    service = prepare_database(runtime)

    def progress(items: Iterable[T], *, total: int, what: str) -> Iterable[T]:
        return with_progress(items, total=total, what=what, enabled=not args.no_progress)

    scoring = None
    if dataset.layout != "review_export":
        detectors = load_detectors(args.detector, runtime)
        scoring = scoring_engine(
            runtime,
            detectors,
            evaluation_database(runtime, args.database),
            runtime.ensemble(d.spec for d in detectors),
        )
    try:
        scores = scored(dataset, scoring=scoring, progress=progress)
    except EvaluationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    unknown = sorted(set(scores.scores) - set(runtime.catalog.specs))
    if unknown:
        raise CliError(f"the set names unknown detectors: {', '.join(unknown)}", EXIT_USAGE)
    # The configuration in force is what the fitted one is compared with, and gives its
    # decisive rules and rejection reasons.
    base, unused = deciding_ensemble(
        runtime, service, [runtime.catalog.specs[name] for name in scores.scores]
    )
    if unused is not None:
        print(f"note: {unused}", file=sys.stderr)
    request = Request(
        method=args.method,
        combine=args.combine,
        alpha=alpha,
        delta=args.delta,
        review_share=args.review_share,
        held_out=args.held_out,
        seed=args.seed,
    )
    try:
        fitted = calibrate(scores, base=base, request=request)
    except CalibrationRefused as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    stored = ensembles.save(
        service,
        fitted.config,
        detectors=fitted.detectors,
        provenance={
            **fitted.provenance,
            "dataset": {
                "source": dataset.source,
                "layout": dataset.layout,
                "ai": dataset.ai,
                "real": dataset.real,
            },
        },
    )
    if args.json:
        print(json.dumps(stored.as_dict(), indent=2))
    else:
        _summary(stored.version, stored.provenance, sys.stdout)
    if set(fitted.detectors) != set(runtime.fleet_detectors):
        print(
            f"note: it combines {', '.join(fitted.detectors)}; the fleet runs "
            f"{', '.join(runtime.fleet_detectors)} (SYNTHSENTRY_FLEET_DETECTORS): it can be "
            "activated only for a fleet that runs exactly its detectors",
            file=sys.stderr,
        )
    return EXIT_OK


def _summary(version: str, provenance: dict[str, Any], out: Any) -> None:
    guarantee = provenance["guarantee"]
    held = provenance["held_out"]["ensemble"]
    split = provenance["split"]
    print(f"stored   {version} (not active)", file=out)
    print(
        f"fitted   on {split['fit']['ai']} AI and {split['fit']['real']} real images; "
        f"measured on {split['held_out']['ai']} AI and {split['held_out']['real']} real",
        file=out,
    )
    if guarantee["kind"] == "neyman_pearson":
        print(
            f"threshold {guarantee['threshold']:.6g}: with probability at least "
            f"{1 - guarantee['delta']:g}, at most {guarantee['alpha']:g} of real images are "
            f"flagged by the score (held-out real images: {guarantee['n_real']}, "
            f"order statistic {guarantee['k']}, bound {guarantee['violation_probability']:.3g})",
            file=out,
        )
        print(f"          about: {provenance['scope']}", file=out)
    else:
        print(
            f"threshold {guarantee['threshold']:.6g}: flags {guarantee['flagged_share']:.3g} of "
            "the held-out set (a review volume, no false-positive guarantee)",
            file=out,
        )
    print(f"\nheld-out ({provenance['held_out']['note']})", file=out)
    print("               log loss   Brier     ECE      AUC      FPR@thr  TPR@thr", file=out)
    for side in ("before", "after"):
        m = held[side]
        print(
            f"{side:<14} {_f(m.get('log_loss'))}  {_f(m.get('brier'))}  {_f(m.get('ece'))}  "
            f"{_f(m.get('roc_auc'))}  {_f(m.get('fpr_at_threshold'))}  "
            f"{_f(m.get('tpr_at_threshold'))}",
            file=out,
        )
    flag_fpr = provenance["held_out"]["flag_fpr_on_real"]
    print(
        f"\nheld-out real images flagged by the score or a decisive detector: {_f(flag_fpr)}",
        file=out,
    )
    for name, why in provenance["calibrations_skipped"].items():
        print(f"not calibrated: {name}: {why}", file=out)
    print(f"\nto use it: synthsentry ensemble activate {version}", file=out)


def _f(value: float | None) -> str:
    return "   -   " if value is None else f"{value:7.4f}"
