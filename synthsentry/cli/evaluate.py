"""``synthsentry eval``: measure the detectors and the ensemble on a labelled set
(``workers.evaluation.run``), write the result document and its report, print a summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from synthsentry.cli.common import EXIT_OK, EXIT_USAGE, CliError, deciding_ensemble, load_runtime
from synthsentry.cli.database import prepare_database, safe_url
from synthsentry.cli.detectors import load_detectors
from synthsentry.cli.output import POLICY, with_progress
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime
    from workers.detectors.base import Detector
    from workers.ensemble import EnsembleConfig
    from workers.evaluation.run import Scoring

T = TypeVar("T")


def register(commands: Commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="measure every detector and the ensemble on a labelled set",
        description="Score a labelled set (a GenImage tree, an ai/ and real/ tree, a CSV of "
        "path,label[,generator][,group][,split], or a review export) with the detector "
        "ensemble, as `scan` does, and measure each detector and the ensemble: ROC AUC, "
        "average precision, TPR at 1% and 5% FPR, the rates at the flag threshold with "
        "exact intervals, calibration, abstentions; overall, by generator, by group and, "
        "with --degrade, under GenImage's degradations. Scores are stored in an evaluation "
        "database, so a rerun scores only what is missing. A review export's recorded "
        "scores are measured as they are. Writes results.json and report.html.",
    )
    evaluate.add_argument("dataset", type=Path, metavar="DATASET", help="folder, .csv or .jsonl")
    evaluate.add_argument(
        "--detector",
        action="append",
        default=[],
        metavar="SPEC",
        help="NAME or NAME=WEIGHTS_URI, as for scan; repeatable. Default: every built-in "
        "detector that can run on this machine.",
    )
    evaluate.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag threshold for ai_score (0..1; default: the configured one)",
    )
    evaluate.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap replicates for the AUC, AP and ECE intervals (default 1000; 0: none)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    evaluate.add_argument(
        "--degrade",
        action="store_true",
        help="also measure under GenImage's degradations (downscale, JPEG, blur)",
    )
    evaluate.add_argument(
        "--database",
        metavar="URL",
        default=None,
        help="evaluation database (default: sqlite:///<data_dir>/eval.db); migrated on first "
        "use; never the service's own database",
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where results.json and report.html go (default: <data_dir>/eval/<time>)",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    evaluate.set_defaults(handler=run, streams_images=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from workers.evaluation.datasets import DatasetError
    from workers.evaluation.run import (
        REVIEW_EXPORT,
        EvaluationError,
        evaluate,
        new_run_folder,
        open_dataset,
        write_results,
    )

    runtime = load_runtime(settings)
    if args.threshold is not None:
        try:
            runtime = runtime.replace(threshold=args.threshold)
        except ValueError as exc:
            raise CliError("--threshold must be between 0 and 1", EXIT_USAGE) from exc
    if args.bootstrap < 0:
        raise CliError("--bootstrap must not be negative", EXIT_USAGE)
    try:
        dataset = open_dataset(args.dataset)
    except DatasetError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc

    scoring = None
    if dataset.layout == REVIEW_EXPORT:
        if args.degrade:
            raise CliError(
                f"--degrade needs image files; {args.dataset} is a review export (images "
                "named by sha256, with the scores recorded when they were decided)",
                EXIT_USAGE,
            )
        if args.detector:
            print(
                "note: --detector is not used: a review export is measured on its recorded scores",
                file=sys.stderr,
            )
    else:
        session_factory = evaluation_database(runtime, args.database)
        detectors = load_detectors(args.detector, runtime)
        ensemble = runtime.ensemble(d.spec for d in detectors)
        if args.threshold is None:  # the configuration in force, as the fleet decides
            ensemble, unused = deciding_ensemble(
                runtime, prepare_database(runtime), [d.spec for d in detectors]
            )
            if unused is not None:
                print(f"note: {unused}", file=sys.stderr)
        scoring = scoring_engine(runtime, detectors, session_factory, ensemble)

    def progress(items: Iterable[T], *, total: int, what: str) -> Iterable[T]:
        return with_progress(items, total=total, what=what, enabled=not args.no_progress)

    eval_dir = runtime.data_dir / "eval"
    try:
        document = evaluate(
            dataset,
            scoring=scoring,
            threshold=runtime.threshold,
            degrade=args.degrade,
            work_dir=eval_dir / "degraded",
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            progress=progress,
        )
        written = write_results(document, args.out or new_run_folder(eval_dir))
    except EvaluationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    except OSError as exc:
        raise CliError(f"cannot write the evaluation's files: {exc}") from exc
    print_summary(document, sys.stdout)
    print(f"\nresults  {written.results}")
    print(f"report   {written.report}")
    return EXIT_OK


def scoring_engine(
    runtime: Runtime,
    detectors: list[Detector],
    session_factory: sessionmaker[Session],
    ensemble: EnsembleConfig,
) -> Scoring:
    """The scan engine as this runtime sizes it (batch, decode threads, memory budget),
    scoring into the evaluation's database."""
    from workers.evaluation.run import Scoring

    return Scoring(
        detectors,
        session_factory,
        runtime.limits,
        ensemble,
        batch_size=runtime.batch_size,
        decode_threads=runtime.intake_threads,
        memory_budget=runtime.intake_memory_bytes,
    )


def evaluation_database(runtime: Runtime, url: str | None) -> sessionmaker[Session]:
    """Sessions on the evaluation's database, migrated to this release. It is a database
    of the evaluation's own: its verdicts are measurements, and the service's review
    queue must never see them."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from db import migrate
    from db.session import make_engine, make_sessionmaker

    url = url or f"sqlite:///{runtime.data_dir / 'eval.db'}"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CliError(f"--database: not a database URL: {exc}", EXIT_USAGE) from exc
    if parsed == make_url(runtime.database_url):
        raise CliError(
            "--database names the service's own database; an evaluation keeps its scores "
            "and verdicts apart (default: <data_dir>/eval.db)",
            EXIT_USAGE,
        )
    try:
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(url)
    except SQLAlchemyError as exc:
        raise CliError(
            f"cannot use the database {safe_url(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except OSError as exc:
        raise CliError(f"cannot create the folder of {safe_url(url)}: {exc}") from exc
    return make_sessionmaker(make_engine(url, echo=runtime.database_echo))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def print_summary(document: Mapping[str, Any], out: TextIO) -> None:
    """The dataset, one line per measured subject and condition, and the provenance
    evidence: a summary of the document (the report has the rest)."""
    from workers.evaluation.run import iter_subjects

    data = document["dataset"]
    problems = len(data["problems"])
    source = (
        "recorded at decision time (review export)"
        if data["layout"] == "review_export"
        else "scored by " + (", ".join(d["name"] for d in document["detectors"]) or "no detector")
    )
    print(
        f"dataset  {data['source']} ({data['layout']}): {data['images']} images, "
        f"{data['ai']} AI, {data['real']} real"
        + (f"; {problems} entries not used (see dataset.problems)" if problems else ""),
        file=out,
    )
    print(f"scores   {source}; ensemble {document['ensemble_version'] or '-'}", file=out)
    threshold = document["threshold"]
    fpr_title = f"FPR@{threshold:.2f} [95% CI]"
    print(
        f"\n{'CONDITION':<14} {'SUBJECT':<18} {'AUC [95% CI]':<22} {'TPR@1%FPR':>9}  "
        f"{fpr_title:<22} ABSTAINED",
        file=out,
    )
    for condition, subject, m in iter_subjects(document):
        print(
            f"{condition:<14} {subject:<18} {_with_interval(m['roc_auc'], m['roc_auc_ci']):<22} "
            f"{_number(m['tpr_at_1pct_fpr']):>9}  "
            f"{_with_interval(m['fpr_at_threshold'], m['fpr_at_threshold_ci']):<22} "
            f"{m['abstained']}/{m['n']}",
            file=out,
        )
    provenance = document["provenance"]
    if provenance["detector"] is not None:
        found = provenance["any"]
        print(
            f"\nprovenance  {found['flagged']} images with an AI finding "
            f"({found['flagged_ai']} AI, {found['flagged_real']} real); precision "
            f"{_with_interval(found['precision'], found['precision_ci'])}",
            file=out,
        )
    print(
        "\n'-': undefined, where a subject answered on one class only or not at all (an "
        "abstention is not a 'real' answer). " + POLICY,
        file=out,
    )
