"""An evaluation from end to end (``synthsentry eval``): a labelled set scored by the scan
engine, every detector and the ensemble measured, and the result as one JSON-ready
document (``results.json``; the HTML report is drawn from it).

Images are scored as ``synthsentry scan`` scores them: a :class:`workers.scan.Scanner`
over the files, storing into a database of the evaluation's own. Detections are stored by
content and detector version, so scoring a set again runs only what is missing: a second
evaluation of the same set with the same detectors calls no detector, and one that was
interrupted resumes where it stopped. The verdicts stored there are ad hoc (the ensemble
under evaluation need not be the active one), and kept apart from the service's database,
whose review queue must never see them.

The review's labelled examples (:func:`workers.evaluation.datasets.load_review_export`)
name their images by sha256 and keep the scores the deciding moderator was shown; those
are measured as recorded, without scoring again (the document's ``dataset.layout`` is
``review_export``). Without the image files they cannot be degraded.

With ``degrade``, every image is also measured under each of GenImage's degradations
(:data:`workers.evaluation.degrade.CONDITIONS`). A degraded copy is written once, named by
the original's sha256 and the condition, into a work folder, and scored like any file;
an image that cannot be read or decoded has no copy, and counts as an abstention of every
detector in that condition, as a file the intake refuses does.

The ensemble is measured on the verdicts' ``ai_score`` (the weighted mean of the
calibrated scores of the detectors that answered). An abstention (no score) is never a
"real" answer: metrics are computed over the answered images and the abstentions are
counted beside them. The provenance detector answers only when a file declares or carries
a mark of generative AI, so its findings are also reported apart, as counts and a
precision per signal.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from sqlalchemy.orm import Session, sessionmaker

from db.models import SourceStatus
from workers.budget import DEFAULT_MEMORY_BUDGET
from workers.detectors.base import Detector
from workers.ensemble import EnsembleConfig
from workers.evaluation.datasets import (
    AI,
    FOLDER_LABELS,
    REAL,
    LabelledImage,
    Problem,
    load_labelled,
)
from workers.evaluation.degrade import CONDITIONS, Condition, Kind, degraded_bytes
from workers.evaluation.metrics import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    FloatArray,
    IntArray,
    clopper_pearson,
    compute_metrics,
    reliability_bins,
    roc_points,
)
from workers.intake import IntakeLimits, Rejected, read_local
from workers.provenance.findings import Kind as ProvenanceKind
from workers.results import ScanOutcome
from workers.scan import Scanner
from workers.scoring import sha256_of

log = logging.getLogger(__name__)

SCHEMA = 1
ENSEMBLE = "ensemble"
"""The subject name of the ensemble's ``ai_score`` beside the detectors' names."""
IDENTITY = "identity"
PROVENANCE_FAMILY = "provenance"
ACTOR = "eval"

Layout = Literal["genimage", "flat", "csv", "review_export"]
REVIEW_EXPORT: Layout = "review_export"

BoolArray = npt.NDArray[np.bool_]
T = TypeVar("T")


class EvaluationError(ValueError):
    """An evaluation that cannot be made as asked (degrading images known only by their
    sha256, scoring without detectors): a usage error, not a failure of the data."""


class Progress(Protocol):
    """Reports progress over ``items`` (``total`` of them, doing ``what``) while passing
    them through unchanged."""

    def __call__(self, items: Iterable[T], *, total: int, what: str) -> Iterable[T]: ...


# --- the labelled set --------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A labelled set as loaded, with the layout it was read as."""

    source: str
    layout: Layout
    items: list[LabelledImage]
    problems: list[Problem]

    @property
    def ai(self) -> int:
        return sum(1 for item in self.items if item.label == AI)

    @property
    def real(self) -> int:
        return len(self.items) - self.ai


def open_dataset(path: Path | str) -> Dataset:
    """Load ``path`` as :func:`workers.evaluation.datasets.load_labelled` does, and say
    which layout it is; :class:`workers.evaluation.datasets.DatasetError` when it cannot
    be read as labelled images."""
    path = Path(path)
    items, problems = load_labelled(path)
    return Dataset(source=str(path), layout=_layout(path), items=items, problems=problems)


def _layout(path: Path) -> Layout:
    """The layout :func:`load_labelled` chose for a path it read (the same tests)."""
    if path.is_dir():
        names = {
            child.name.lower()
            for child in path.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        }
        return "flat" if names & FOLDER_LABELS.keys() else "genimage"
    if path.suffix.lower() == ".jsonl":
        return REVIEW_EXPORT
    if path.suffix.lower() == ".tsv":
        return "csv"  # a corpus manifest, read as the CSV it describes
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return "csv" if "path" in {name.strip().lower() for name in header} else REVIEW_EXPORT


# --- the scan engine ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """The scan engine an evaluation scores with: the detectors, the evaluation's own
    database, the intake limits, the ensemble under evaluation, and the scan's batching.
    ``ensemble`` is built from the detectors' specs and the settings (threshold, weights,
    calibrations), as ``synthsentry scan`` builds it."""

    detectors: Sequence[Detector]
    session_factory: sessionmaker[Session]
    limits: IntakeLimits
    ensemble: EnsembleConfig
    batch_size: int = 16
    decode_threads: int = 2
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def scanner(self) -> Scanner:
        return Scanner(
            self.detectors,
            self.session_factory,
            self.limits,
            self.ensemble,
            batch_size=self.batch_size,
            decode_threads=self.decode_threads,
            memory_budget=self.memory_budget,
            actor=ACTOR,
            active=False,
        )


@dataclass
class _Answers:
    """One condition's answers: each subject's score per image (NaN where it abstained),
    how many images no detector saw, and each image's kinds of AI provenance finding."""

    scores: dict[str, FloatArray]
    not_scored: int
    provenance: list[frozenset[str]]


def _no_answers(subjects: Sequence[str], n: int) -> _Answers:
    return _Answers(
        scores={name: np.full(n, np.nan) for name in subjects},
        not_scored=0,
        provenance=[frozenset()] * n,
    )


def _passthrough(items: Iterable[T], *, total: int, what: str) -> Iterable[T]:
    del total, what
    return items


def _scan(
    scanner: Scanner,
    paths: Sequence[Path | None],
    provenance: str | None,
    progress: Progress,
    what: str,
) -> _Answers:
    """Score the files (``None``: an image with no file in this condition, an abstention
    of every detector) and collect the answers in input order."""
    subjects = [*scanner.versions, ENSEMBLE]
    answers = _no_answers(subjects, len(paths))
    todo: list[tuple[int, Path]] = [(i, p) for i, p in enumerate(paths) if p is not None]
    answers.not_scored = len(paths) - len(todo)
    outcomes: Iterable[ScanOutcome] = scanner.scan(path for _, path in todo)
    outcomes = progress(outcomes, total=len(todo), what=what)
    for (i, _), outcome in zip(todo, outcomes, strict=True):
        if outcome.status == SourceStatus.REJECTED:
            answers.not_scored += 1
            continue
        if outcome.ai_score is not None:
            answers.scores[ENSEMBLE][i] = outcome.ai_score
        for report in outcome.detectors:
            if report.score is not None and report.name in answers.scores:
                answers.scores[report.name][i] = report.score
            if report.name == provenance:
                answers.provenance[i] = _ai_kinds(report.evidence)
    return answers


def _ai_kinds(evidence: Mapping[str, Any]) -> frozenset[str]:
    """The signals (``kind``) of the AI findings in a provenance detection's evidence."""
    items = evidence.get("items") if isinstance(evidence, Mapping) else None
    if not isinstance(items, list):
        return frozenset()
    return frozenset(
        str(item["kind"])
        for item in items
        if isinstance(item, Mapping) and item.get("ai") is True and "kind" in item
    )


# --- degraded copies ---------------------------------------------------------------------


def _degraded_copies(
    path: Path, conditions: Sequence[Condition], work_dir: Path, limits: IntakeLimits
) -> list[Path | None]:
    """The degraded copy of one image for each condition (``None`` where none can be
    made: the file cannot be read or decoded). Copies already in ``work_dir`` are kept."""
    try:
        data = read_local(path, limits)
    except Rejected:
        return [None] * len(conditions)
    sha256 = sha256_of(data)
    copies: list[Path | None] = []
    for condition in conditions:
        suffix = ".jpg" if condition.kind is Kind.JPEG else ".png"
        target = work_dir / f"{sha256}.{condition.name}{suffix}"
        if not target.is_file():
            try:
                degraded = degraded_bytes(condition, data, limits=limits)
            except Rejected:
                copies.append(None)
                continue
            except Exception:  # a bug in a decoder must not end the evaluation
                log.exception(
                    "degrading failed unexpectedly",
                    extra={"sha256": sha256, "condition": condition.name},
                )
                copies.append(None)
                continue
            _write_atomically(target, degraded)
        copies.append(target)
    return copies


def _write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same folder, so an
    interrupted run never leaves a partial copy under the final name."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        Path(temporary).replace(target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _degrade_all(
    items: Sequence[LabelledImage],
    conditions: Sequence[Condition],
    work_dir: Path,
    scoring: Scoring,
    progress: Progress,
) -> list[list[Path | None]]:
    """Each condition's list of copies, in the items' order."""
    paths = [item.path for item in items if item.path is not None]
    if len(paths) != len(items):
        raise EvaluationError("images known only by their sha256 cannot be degraded")
    work_dir.mkdir(parents=True, exist_ok=True)
    make = partial(
        _degraded_copies, conditions=conditions, work_dir=work_dir, limits=scoring.limits
    )
    with ThreadPoolExecutor(scoring.decode_threads, thread_name_prefix="degrade") as pool:
        per_image = list(progress(pool.map(make, paths), total=len(paths), what="degrading"))
    return [[copies[c] for copies in per_image] for c in range(len(conditions))]


# --- recorded scores ---------------------------------------------------------------------


def _recorded(items: Sequence[LabelledImage]) -> tuple[list[dict[str, Any]], str, _Answers]:
    """The detectors, ensemble version and answers a review export recorded."""
    names = list(dict.fromkeys(name for item in items for name in item.recorded_scores))
    answers = _no_answers([*names, ENSEMBLE], len(items))
    for i, item in enumerate(items):
        for name, score in item.recorded_scores.items():
            if score is not None:
                answers.scores[name][i] = score
        if item.recorded_ai_score is not None:
            answers.scores[ENSEMBLE][i] = item.recorded_ai_score
        if not item.recorded_scores and item.recorded_ai_score is None:
            answers.not_scored += 1
    detectors = [
        {
            "name": name,
            "version": _joined(item.recorded_versions.get(name) for item in items),
            "weights_sha256": None,
        }
        for name in names
    ]
    return detectors, _joined(item.ensemble_version for item in items), answers


def _joined(values: Iterable[str | None]) -> str:
    """One recorded version, or the distinct ones (most frequent first) when the examples
    were decided under several."""
    counts = Counter(v for v in values if v)
    return ", ".join(v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Breakdown:
    """The subsets every subject is also measured on, as masks over the items."""

    generators: dict[str, BoolArray]
    groups: dict[str, BoolArray]


def _breakdown(items: Sequence[LabelledImage], labels: IntArray) -> _Breakdown:
    """By generator: the AI images of a generator with the real images of the same
    generator, or with every real image when no real image names a generator (a CSV that
    names generators on its AI rows only). By group: the images of each group."""
    generator = np.array([item.generator or "" for item in items], dtype=object)
    group = np.array([item.group or "" for item in items], dtype=object)
    is_real = labels == REAL
    real_named = bool(np.any(is_real & (generator != "")))
    generators = {}
    for name in sorted({item.generator for item in items if item.generator}):
        mine = generator == name
        generators[name] = mine if real_named else (mine & (labels == AI)) | is_real
    groups = {name: group == name for name in sorted({i.group for i in items if i.group})}
    return _Breakdown(generators=generators, groups=groups)


@dataclass(frozen=True)
class _Measure:
    labels: IntArray
    breakdown: _Breakdown
    threshold: float
    n_bootstrap: int
    seed: int

    def metrics(self, scores: FloatArray, mask: BoolArray | None = None) -> dict[str, Any]:
        s, y = (scores, self.labels) if mask is None else (scores[mask], self.labels[mask])
        return compute_metrics(
            s, y, self.threshold, n_bootstrap=self.n_bootstrap, seed=self.seed
        ).as_dict()

    def subject(self, scores: FloatArray) -> dict[str, Any]:
        labels = self.labels
        roc = roc_points(scores, labels)
        answered = ~np.isnan(scores)
        return {
            "overall": self.metrics(scores),
            "by_generator": {
                name: self.metrics(scores, mask) for name, mask in self.breakdown.generators.items()
            },
            "by_group": {
                name: self.metrics(scores, mask) for name, mask in self.breakdown.groups.items()
            },
            # The first point, (0, 0) at an infinite threshold, is where every curve starts.
            "roc": {
                "fpr": roc.fpr[1:].tolist() if roc is not None else [],
                "tpr": roc.tpr[1:].tolist() if roc is not None else [],
            },
            "reliability": [b.as_dict() for b in reliability_bins(scores, labels)],
            "scores": {
                "ai": scores[answered & (labels == AI)].tolist(),
                "real": scores[answered & (labels == REAL)].tolist(),
            },
        }

    def condition(self, condition: Condition, answers: _Answers) -> dict[str, Any]:
        return {
            **condition.as_dict(),
            "not_scored": answers.not_scored,
            "subjects": {name: self.subject(s) for name, s in answers.scores.items()},
        }


def _evidence_counts(flagged: BoolArray, labels: IntArray) -> dict[str, Any]:
    n = int(np.count_nonzero(flagged))
    ai = int(np.count_nonzero(flagged & (labels == AI)))
    return {
        "flagged": n,
        "flagged_ai": ai,
        "flagged_real": n - ai,
        "precision": ai / n if n else None,
        "precision_ci": clopper_pearson(ai, n, DEFAULT_CONFIDENCE).as_list() if n else None,
    }


def _provenance(
    detector: str | None, kinds: Sequence[frozenset[str]], labels: IntArray
) -> dict[str, Any]:
    """How often each provenance signal found a mark of generative AI, and how often it
    was right (precision, with its Clopper-Pearson interval); ``any``: at least one."""
    if detector is None:
        return {
            "detector": None,
            "signals": {},
            "any": _evidence_counts(np.zeros(labels.size, dtype=bool), labels),
        }
    seen = {kind for found in kinds for kind in found}
    names = sorted({k.value for k in ProvenanceKind} | seen)
    signals = {
        name: _evidence_counts(np.array([name in found for found in kinds], dtype=bool), labels)
        for name in names
    }
    any_found = np.array([bool(found) for found in kinds], dtype=bool)
    return {"detector": detector, "signals": signals, "any": _evidence_counts(any_found, labels)}


# --- the evaluation ----------------------------------------------------------------------


def evaluate(
    dataset: Dataset,
    *,
    scoring: Scoring | None = None,
    threshold: float | None = None,
    degrade: bool = False,
    work_dir: Path | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The evaluation document of ``dataset`` (see the module's docstring).

    ``scoring``: the engine that scores image files (required unless the set is a review
    export, whose recorded scores are measured instead). ``threshold``: where a score
    flags; by default the scoring ensemble's (required for a review export). ``degrade``:
    measure GenImage's degradations too, keeping the degraded copies in ``work_dir``.
    ``n_bootstrap`` and ``seed``: the bootstrap of the ranking and calibration intervals.
    Raises :class:`EvaluationError` for a request that cannot be met.
    """
    if scoring is not None:
        if threshold is not None and threshold != scoring.ensemble.threshold:
            raise EvaluationError(
                f"threshold {threshold} differs from the scoring ensemble's "
                f"{scoring.ensemble.threshold}; build the ensemble with the threshold to use"
            )
        threshold = scoring.ensemble.threshold
    if threshold is None or not 0.0 <= threshold <= 1.0:
        raise EvaluationError("a threshold between 0 and 1 is needed to measure the scores")
    if n_bootstrap < 0:
        raise EvaluationError("the number of bootstrap replicates must not be negative")
    report = progress or _passthrough
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    items = dataset.items
    labels: IntArray = np.array([item.label for item in items], dtype=np.int64)
    conditions: list[tuple[Condition, _Answers]] = []

    if dataset.layout == REVIEW_EXPORT:
        if degrade:
            raise EvaluationError(
                f"{dataset.source} is a review export: its images are known by their sha256 "
                "and the scores recorded at decision time, with no file to degrade"
            )
        detectors, ensemble_version, answers = _recorded(items)
        provenance_detector = None
        conditions.append((CONDITIONS[IDENTITY], answers))
    else:
        if scoring is None:
            raise EvaluationError(
                f"{dataset.source} holds image files: scoring them needs detectors"
            )
        if degrade and work_dir is None:
            raise EvaluationError("degrading needs a work folder for the degraded copies")
        scanner = scoring.scanner()
        detectors = [
            {"name": d.spec.name, "version": d.version, "weights_sha256": d.weights_sha256}
            for d in scoring.detectors
        ]
        ensemble_version = scoring.ensemble.version
        provenance_detector = next(
            (d.spec.name for d in scoring.detectors if d.spec.family == PROVENANCE_FAMILY), None
        )
        paths = [item.path for item in items]
        identity = _scan(scanner, paths, provenance_detector, report, f"scoring {IDENTITY}")
        conditions.append((CONDITIONS[IDENTITY], identity))
        if degrade:
            assert work_dir is not None
            degradations = [c for name, c in CONDITIONS.items() if name != IDENTITY]
            copies = _degrade_all(items, degradations, work_dir, scoring, report)
            for condition, condition_paths in zip(degradations, copies, strict=True):
                answers = _scan(
                    scanner, condition_paths, provenance_detector, report, condition.name
                )
                conditions.append((condition, answers))

    measure = _Measure(
        labels=labels,
        breakdown=_breakdown(items, labels),
        threshold=threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    return {
        "schema": SCHEMA,
        "created_at": created_at,
        "dataset": {
            "source": dataset.source,
            "layout": dataset.layout,
            "images": len(items),
            "ai": dataset.ai,
            "real": dataset.real,
            "problems": [p.as_dict() for p in dataset.problems],
            "generators": sorted(measure.breakdown.generators),
            "groups": sorted(measure.breakdown.groups),
        },
        "threshold": threshold,
        "seed": seed,
        "ensemble_version": ensemble_version,
        "detectors": detectors,
        "conditions": [measure.condition(c, answers) for c, answers in conditions],
        "provenance": _provenance(provenance_detector, conditions[0][1].provenance, labels),
    }


# --- scores for fitting ------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Each detector's score per image of a labelled set (NaN: it abstained, or no detector
    saw the file), the labels, and the detectors' names and versions: what a calibration
    is fitted on. ``recorded``: the scores a review export recorded at decision time."""

    labels: IntArray
    scores: dict[str, FloatArray]
    versions: dict[str, str]
    recorded: bool


def scored(
    dataset: Dataset, *, scoring: Scoring | None = None, progress: Progress | None = None
) -> Scored:
    """Score ``dataset`` as :func:`evaluate` does (the same engine and cache), or read the
    scores a review export recorded."""
    labels: IntArray = np.array([item.label for item in dataset.items], dtype=np.int64)
    if dataset.layout == REVIEW_EXPORT:
        detectors, _, answers = _recorded(dataset.items)
        recorded = True
    else:
        if scoring is None:
            raise EvaluationError(
                f"{dataset.source} holds image files: scoring them needs detectors"
            )
        provenance_detector = next(
            (d.spec.name for d in scoring.detectors if d.spec.family == PROVENANCE_FAMILY), None
        )
        answers = _scan(
            scoring.scanner(),
            [item.path for item in dataset.items],
            provenance_detector,
            progress or _passthrough,
            f"scoring {IDENTITY}",
        )
        detectors = [{"name": d.spec.name, "version": d.version} for d in scoring.detectors]
        recorded = False
    names = [d["name"] for d in detectors]
    return Scored(
        labels=labels,
        scores={name: answers.scores[name] for name in names},
        versions={d["name"]: str(d["version"]) for d in detectors},
        recorded=recorded,
    )


# --- the files ---------------------------------------------------------------------------


class Written(NamedTuple):
    """What :func:`write_results` wrote."""

    results: Path
    report: Path


def new_run_folder(parent: Path, now: datetime | None = None) -> Path:
    """A folder for one run's files below ``parent``, named by the time (UTC) and not yet
    used: ``20261130T060000Z``, or ``20261130T060000Z-2`` for a second run that second."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = parent / stamp, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{stamp}-{n}"
    return candidate


def write_results(document: Mapping[str, Any], out_dir: Path) -> Written:
    """``results.json`` (the document, undefined values as null) and ``report.html`` (drawn
    from it) in ``out_dir``, which is created if need be."""
    # The report draws figures with libraries that scoring does not need: loaded here.
    from workers.evaluation.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    text = json.dumps(document, indent=1, allow_nan=False)
    results.write_text(text + "\n", encoding="utf-8")
    report = out_dir / "report.html"
    write_report(document, report)
    return Written(results=results, report=report)


def iter_subjects(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(condition, subject, overall metrics)`` for every measured subject, in the
    document's order: what a summary prints."""
    for condition in document["conditions"]:
        for subject, results in condition["subjects"].items():
            yield condition["name"], subject, results["overall"]
