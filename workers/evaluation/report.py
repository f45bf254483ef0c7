"""An evaluation's result document as one HTML file that a person opens from disk, mails, or
attaches to a decision about a threshold: the tables print every number the document holds
(rounded for reading), the figures draw its curves, and nothing is fetched from anywhere.
Figures are PNGs in ``data:`` URIs and the styles sit in the page, so the file is the whole
report and still reads the same years later.

The document is what ``synthsentry eval`` writes (schema 1): the dataset, the threshold,
the detectors, one entry per condition (``identity`` first, then each degradation) with
every subject's metrics (each detector and ``ensemble``), and the provenance signals apart.

Nothing here rounds a number before the page does, and nothing is invented: a metric the
data could not define is printed as "n/a" with the reason in its ``title``, and every
sentence that says how a detector fared (no better than chance under a condition, its
largest drop) is computed from the document, so it changes when the data does.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through pyplot: no global figure, no backend switch, and nothing held after a report is
rendered, so a report can be made inside a worker or a server thread.
"""

from __future__ import annotations

import base64
import io
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

SCHEMA = 1
ENSEMBLE = "ensemble"
IDENTITY = "identity"
CHANCE_AUC = 0.5
PROBLEMS_LISTED = 5
DIGITS = 3
DPI = 110
HISTOGRAM_BINS = 20

# matplotlib's tab10, fixed here so a subject keeps its colour in every figure; the
# ensemble is drawn in black.
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_ENSEMBLE_COLOUR = "#111111"
_AI_COLOUR = "#d62728"
_REAL_COLOUR = "#1f77b4"
_GUIDE_COLOUR = "#999999"


@dataclass(frozen=True)
class Column:
    """One metric column of a table: the key in ``Metrics.as_dict()``, the key of its
    interval (if it has one), and what the header says and explains."""

    key: str
    header: str
    explanation: str
    interval: str | None = None


@dataclass(frozen=True)
class Cell:
    """A table cell as printed: the value, and its interval (printed beneath it) where it
    has one. An undefined value has ``undefined`` set and its reason in ``title``;
    ``metric`` names the value for a reader of the markup."""

    text: str
    title: str | None = None
    undefined: bool = False
    metric: str | None = None
    interval: str | None = None


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    title: str | None
    cells: tuple[Cell, ...]
    total: bool = False


@dataclass(frozen=True)
class Table:
    """A table of rows by columns; ``groups`` are optional header cells spanning
    ``span`` columns each, above the column headers."""

    kind: str
    condition: str | None
    first_header: str
    headers: tuple[Column, ...]
    rows: tuple[Row, ...]
    groups: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class EmbeddedImage:
    src: str
    alt: str


@dataclass(frozen=True)
class ConditionView:
    name: str
    anchor: str
    description: str
    summary: Table
    findings: tuple[str, ...]
    roc: EmbeddedImage
    reliability: EmbeddedImage
    histograms: EmbeddedImage
    generators: Table | None
    generator_chart: EmbeddedImage | None
    groups: Table | None


SUMMARY_COLUMNS = (
    Column("answered", "Answered", "Images the subject gave a score for"),
    Column(
        "abstained",
        "Abstained",
        "Images the subject gave no score for: counted here, never scored as real",
    ),
    Column(
        "accuracy",
        "Accuracy at threshold",
        "Share of answered images on the right side of the threshold",
        "accuracy_ci",
    ),
    Column(
        "roc_auc",
        "ROC AUC",
        "Chance that a random AI image scores above a random real one; 0.5 is a coin toss",
        "roc_auc_ci",
    ),
    Column(
        "average_precision",
        "AP",
        "Average precision: precision averaged over the recall steps, highest scores first",
        "average_precision_ci",
    ),
    Column(
        "tpr_at_1pct_fpr",
        "TPR at 1% FPR",
        "Highest share of AI images an actual threshold catches while flagging at most 1% "
        "of real ones",
    ),
    Column(
        "tpr_at_5pct_fpr",
        "TPR at 5% FPR",
        "Highest share of AI images an actual threshold catches while flagging at most 5% "
        "of real ones",
    ),
    Column(
        "fpr_at_threshold",
        "FPR at threshold",
        "Share of answered real images flagged at the threshold",
        "fpr_at_threshold_ci",
    ),
    Column(
        "tpr_at_threshold",
        "TPR at threshold",
        "Share of answered AI images flagged at the threshold",
        "tpr_at_threshold_ci",
    ),
    Column("brier", "Brier", "Mean squared gap between score and label; lower is better"),
    Column(
        "ece",
        "ECE",
        "Expected calibration error: how far scores sit from observed AI frequencies",
        "ece_ci",
    ),
)

_BREAKDOWN_COLUMNS = (
    Column(
        "roc_auc",
        "ROC AUC",
        "Chance that a random AI image scores above a random real one; 0.5 is a coin toss",
        "roc_auc_ci",
    ),
    Column(
        "tpr_at_threshold",
        "TPR at threshold",
        "Share of answered AI images flagged at the threshold",
        "tpr_at_threshold_ci",
    ),
)

_COUNT_COLUMNS = (
    Column("n_ai", "AI images", "AI-generated images in this part of the set"),
    Column("n_real", "Real images", "Real images this part is measured against"),
)

_PROVENANCE_COLUMNS = (
    Column("flagged", "Flagged", "Images on which the signal says AI-generated"),
    Column("flagged_ai", "of which AI", "Flagged images labelled AI-generated"),
    Column("flagged_real", "of which real", "Flagged images labelled real"),
    Column(
        "precision",
        "Precision",
        "Share of the flagged images that are AI-generated",
        "precision_ci",
    ),
)

_RANKING = frozenset({"roc_auc", "average_precision", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr"})
_AT_THRESHOLD = frozenset({"accuracy", "fpr_at_threshold", "tpr_at_threshold"})


def render_report(document: Mapping[str, Any]) -> str:
    """The report of one evaluation result document as a standalone HTML page.

    Raises ``ValueError`` for a document of another schema: its fields would be misread.
    """
    schema = document.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"evaluation document schema {schema!r}, expected {SCHEMA}")
    dataset: Mapping[str, Any] = document["dataset"]
    conditions: Sequence[Mapping[str, Any]] = document["conditions"]
    detectors: Sequence[Mapping[str, Any]] = document["detectors"]
    threshold: float | None = document.get("threshold")
    subjects = _subjects(detectors, conditions)
    versions = {str(d["name"]): str(d.get("version") or "") for d in detectors}
    versions[ENSEMBLE] = str(document.get("ensemble_version") or "")
    setting = _Setting(
        subjects=tuple(subjects),
        versions=versions,
        colours=_colour_map(subjects),
        threshold=threshold,
        baseline=_baseline(conditions),
    )
    views = [
        _condition_view(condition, setting, f"condition-{index}")
        for index, condition in enumerate(conditions, start=1)
    ]
    degradation = _degradation_view(conditions, setting) if len(conditions) > 1 else None
    problems: Sequence[Mapping[str, Any]] = dataset.get("problems") or []
    problem_kinds = Counter(str(p.get("kind")) for p in problems)
    return _TEMPLATE.render(
        source=str(dataset.get("source", "")),
        created_at=str(document.get("created_at", "")),
        dataset=dataset,
        generators=[str(g) for g in dataset.get("generators") or []],
        groups=[str(g) for g in dataset.get("groups") or []],
        problems_total=len(problems),
        problem_kinds=", ".join(f"{n} {kind}" for kind, n in sorted(problem_kinds.items())),
        problems_listed=[_problem_text(p) for p in problems[:PROBLEMS_LISTED]],
        threshold=_number(threshold) if threshold is not None else "none",
        ensemble_version=str(document.get("ensemble_version") or "unknown"),
        detectors=[
            {
                "name": str(d["name"]),
                "version": str(d.get("version") or ""),
                "weights_sha256": d.get("weights_sha256"),
            }
            for d in detectors
        ],
        confidence=_confidence_text(conditions),
        conditions=views,
        degradation=degradation,
        provenance=_provenance_view(document.get("provenance")),
    )


def write_report(document: Mapping[str, Any], html_path: Path) -> None:
    """Render the report and write it to ``html_path`` in UTF-8. The page is written beside
    its destination and moved into place, so a reader never opens half a report."""
    html = render_report(document)
    partial = html_path.with_name(html_path.name + ".partial")
    partial.write_text(html, encoding="utf-8")
    partial.replace(html_path)


# --- the model the template prints -------------------------------------------------------


def _subjects(
    detectors: Sequence[Mapping[str, Any]], conditions: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Detectors in the document's order, then any other subject, then the ensemble last:
    the same order in every table and legend."""
    named = [str(d["name"]) for d in detectors]
    present: set[str] = set()
    for condition in conditions:
        present.update(condition["subjects"])
    ordered = [name for name in named if name in present and name != ENSEMBLE]
    others = sorted(present - set(ordered) - {ENSEMBLE})
    return ordered + others + ([ENSEMBLE] if ENSEMBLE in present else [])


def _colour_map(subjects: Sequence[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    others = [s for s in subjects if s != ENSEMBLE]
    for index, subject in enumerate(others):
        colours[subject] = _COLOURS[index % len(_COLOURS)]
    colours[ENSEMBLE] = _ENSEMBLE_COLOUR
    return colours


def _baseline(conditions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The condition the others are compared with: ``identity``, else the first."""
    for condition in conditions:
        if condition["name"] == IDENTITY:
            return condition
    return conditions[0] if conditions else {"name": IDENTITY, "subjects": {}}


@dataclass(frozen=True)
class _Setting:
    """What every section of one report shares: the subjects in print order, their
    versions and colours, the threshold, and the condition the others are compared with."""

    subjects: tuple[str, ...]
    versions: Mapping[str, str]
    colours: Mapping[str, str]
    threshold: float | None
    baseline: Mapping[str, Any]


def _condition_view(condition: Mapping[str, Any], setting: _Setting, anchor: str) -> ConditionView:
    name = str(condition["name"])
    entries: Mapping[str, Mapping[str, Any]] = condition["subjects"]
    present = [s for s in setting.subjects if s in entries]
    versions, colours, baseline = setting.versions, setting.colours, setting.baseline
    summary = Table(
        kind="summary",
        condition=name,
        first_header="Subject",
        headers=SUMMARY_COLUMNS,
        rows=tuple(
            Row(
                key=s,
                label=s,
                title=_version_title(s, versions),
                cells=tuple(_summary_cell(entries[s]["overall"], c) for c in SUMMARY_COLUMNS),
            )
            for s in present
        ),
    )
    findings = tuple(
        sentence
        for s in present
        if (sentence := _chance_sentence(s, name, entries[s]["overall"], baseline)) is not None
    )
    generators = _breakdown(name, "by_generator", "Generator", entries, present)
    groups = _breakdown(name, "by_group", "Group", entries, present)
    return ConditionView(
        name=name,
        anchor=anchor,
        description=str(condition.get("description") or ""),
        summary=summary,
        findings=findings,
        roc=EmbeddedImage(_roc_figure(entries, present, colours), f"ROC curves under {name}"),
        reliability=EmbeddedImage(
            _reliability_figure(entries, present, colours), f"Reliability diagrams under {name}"
        ),
        histograms=EmbeddedImage(
            _histogram_figure(entries, present, setting.threshold),
            f"Score histograms of AI and real images under {name}",
        ),
        generators=generators,
        generator_chart=(
            EmbeddedImage(
                _generator_figure(entries, present, colours),
                f"ROC AUC per generator under {name}",
            )
            if generators is not None
            else None
        ),
        groups=groups,
    )


def _breakdown(
    condition: str,
    key: str,
    first_header: str,
    entries: Mapping[str, Mapping[str, Any]],
    subjects: Sequence[str],
) -> Table | None:
    """One row per generator (or group), the image counts, then each subject's ROC AUC and
    TPR at the threshold."""
    names = sorted({str(part) for s in subjects for part in entries[s].get(key) or {}})
    if not names:
        return None
    rows = []
    for part in names:
        counts = next(
            (entries[s][key][part] for s in subjects if part in (entries[s].get(key) or {})),
            None,
        )
        cells = [Cell(str(counts[c.key]) if counts else "", metric=c.key) for c in _COUNT_COLUMNS]
        for s in subjects:
            metrics = (entries[s].get(key) or {}).get(part)
            for column in _BREAKDOWN_COLUMNS:
                if metrics is None:
                    cells.append(Cell("n/a", "not measured for this subject", True, column.key))
                else:
                    cells.append(_summary_cell(metrics, column))
        rows.append(Row(key=part, label=part, title=None, cells=tuple(cells)))
    headers = _COUNT_COLUMNS + tuple(c for _ in subjects for c in _BREAKDOWN_COLUMNS)
    groups = (("", len(_COUNT_COLUMNS)), *((s, len(_BREAKDOWN_COLUMNS)) for s in subjects))
    return Table(
        kind=key.removeprefix("by_"),
        condition=condition,
        first_header=first_header,
        headers=headers,
        rows=tuple(rows),
        groups=groups,
    )


@dataclass(frozen=True)
class DegradationView:
    conditions: tuple[str, ...]
    auc: Table
    tpr: Table
    findings: tuple[str, ...]
    chart: EmbeddedImage


def _degradation_view(
    conditions: Sequence[Mapping[str, Any]], setting: _Setting
) -> DegradationView:
    subjects, versions = setting.subjects, setting.versions
    colours, baseline = setting.colours, setting.baseline
    names = tuple(str(c["name"]) for c in conditions)

    def table(kind: str, column: Column) -> Table:
        rows = []
        for s in subjects:
            cells = []
            for condition in conditions:
                entry = condition["subjects"].get(s)
                if entry is None:
                    cells.append(Cell("n/a", "not measured under this condition", True, column.key))
                else:
                    cells.append(_summary_cell(entry["overall"], column))
            rows.append(Row(s, s, _version_title(s, versions), tuple(cells)))
        headers = tuple(Column(column.key, n, column.explanation) for n in names)
        return Table(kind, None, "Subject", headers, tuple(rows))

    by_key = {c.key: c for c in SUMMARY_COLUMNS}
    findings: list[str] = []
    for condition in conditions:
        if condition is baseline:
            continue
        for s in subjects:
            entry = condition["subjects"].get(s)
            if entry is not None:
                sentence = _chance_sentence(s, str(condition["name"]), entry["overall"], baseline)
                if sentence is not None:
                    findings.append(sentence)
    if not findings:
        findings.append(
            "No subject falls to chance under any degradation: every ROC AUC that could be "
            "measured lies above 0.5 with its interval."
        )
    findings.extend(_largest_drops(conditions, subjects, baseline))
    return DegradationView(
        conditions=names,
        auc=table("degradation_auc", by_key["roc_auc"]),
        tpr=table("degradation_tpr", by_key["tpr_at_5pct_fpr"]),
        findings=tuple(findings),
        chart=EmbeddedImage(
            _degradation_figure(conditions, subjects, colours),
            "ROC AUC and TPR at 5% FPR per condition",
        ),
    )


@dataclass(frozen=True)
class ProvenanceView:
    detector: str | None
    table: Table | None


def _provenance_view(provenance: Mapping[str, Any] | None) -> ProvenanceView:
    """The signals' table; none when no provenance detector ran, since its zero counts
    would read as "no image carried a mark" when nothing was looked for."""
    if not provenance or (not provenance.get("detector") and not provenance.get("signals")):
        return ProvenanceView(None, None)
    signals: Mapping[str, Mapping[str, Any]] = provenance.get("signals") or {}
    rows = [
        Row(
            kind, kind, None, tuple(_provenance_cell(signals[kind], c) for c in _PROVENANCE_COLUMNS)
        )
        for kind in sorted(signals)
    ]
    overall = provenance.get("any")
    if overall is not None:
        rows.append(
            Row(
                "any",
                "any signal",
                "Images with at least one AI provenance finding",
                tuple(_provenance_cell(overall, c) for c in _PROVENANCE_COLUMNS),
                total=True,
            )
        )
    detector = provenance.get("detector")
    table = Table("provenance", None, "Signal", _PROVENANCE_COLUMNS, tuple(rows)) if rows else None
    return ProvenanceView(str(detector) if detector else None, table)


# --- cells and sentences -----------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.{DIGITS}f}"


def _with_interval(value: float, interval: Sequence[float] | None) -> str:
    if interval is None:
        return _number(value)
    return f"{_number(value)} [{_number(interval[0])}, {_number(interval[1])}]"


def _value_cell(
    value: float, interval: Sequence[float] | None, title: str | None, metric: str
) -> Cell:
    bounds = None if interval is None else f"[{_number(interval[0])}, {_number(interval[1])}]"
    return Cell(_number(value), title, metric=metric, interval=bounds)


def _summary_cell(metrics: Mapping[str, Any], column: Column) -> Cell:
    """One metric of ``Metrics.as_dict()`` as printed, "n/a" with the reason when it is
    undefined."""
    key = column.key
    if key == "answered":
        answered_ai = metrics["n_ai"] - metrics["abstained_ai"]
        answered_real = metrics["n_real"] - metrics["abstained_real"]
        answered = (
            f"{answered_ai} of {metrics['n_ai']} AI, {answered_real} of {metrics['n_real']} real"
        )
        return Cell(str(metrics["answered"]), answered, metric=key)
    if key == "abstained":
        abstained = f"{metrics['abstained_ai']} AI, {metrics['abstained_real']} real"
        return Cell(str(metrics["abstained"]), abstained, metric=key)
    if key in ("n_ai", "n_real"):
        return Cell(str(metrics[key]), metric=key)
    value = metrics.get(key)
    if value is None:
        return Cell("n/a", _why_undefined(key, metrics), True, key)
    interval = metrics.get(column.interval) if column.interval else None
    title = _counts_title(key, value, metrics)
    if column.interval and interval is None:
        missing = "no interval" if metrics.get("n_bootstrap") else "no interval: no bootstrap"
        title = f"{title}; {missing}" if title else missing
    return _value_cell(float(value), interval, title, key)


def _counts_title(key: str, value: float, metrics: Mapping[str, Any]) -> str | None:
    """The counts behind a rate at the threshold, which the rounded rate hides."""
    answered_ai = metrics["n_ai"] - metrics["abstained_ai"]
    answered_real = metrics["n_real"] - metrics["abstained_real"]
    if key == "accuracy":
        total = answered_ai + answered_real
        return f"{round(value * total)} of {total} answered images right"
    if key == "fpr_at_threshold":
        return f"{round(value * answered_real)} of {answered_real} answered real images flagged"
    if key == "tpr_at_threshold":
        return f"{round(value * answered_ai)} of {answered_ai} answered AI images flagged"
    return None


def _why_undefined(key: str, metrics: Mapping[str, Any]) -> str:
    answered_ai = metrics["n_ai"] - metrics["abstained_ai"]
    answered_real = metrics["n_real"] - metrics["abstained_real"]
    if answered_ai + answered_real == 0:
        return "no image answered: every one abstained" if metrics["n"] else "no image"
    if key in _AT_THRESHOLD and metrics.get("threshold") is None:
        return "no threshold given"
    one_class = (
        "one class only: no answered real image"
        if answered_real == 0
        else "one class only: no answered AI image"
    )
    if key == "fpr_at_threshold" and answered_real == 0:
        return one_class
    if key == "tpr_at_threshold" and answered_ai == 0:
        return one_class
    if key in _RANKING and (answered_ai == 0 or answered_real == 0):
        return one_class
    return "not computed for this set"


def _provenance_cell(signal: Mapping[str, Any], column: Column) -> Cell:
    value = signal.get(column.key)
    if column.key == "precision":
        if value is None:
            return Cell("n/a", "no image flagged, so no precision", True, column.key)
        return _value_cell(float(value), signal.get("precision_ci"), None, column.key)
    return Cell(str(value), metric=column.key)


def _auc_at_chance(metrics: Mapping[str, Any]) -> bool | None:
    """Whether ROC AUC cannot be told apart from chance: its interval reaches 0.5 (or,
    without an interval, the point itself is at or below 0.5). None when undefined."""
    auc = metrics.get("roc_auc")
    if auc is None:
        return None
    interval = metrics.get("roc_auc_ci")
    if interval is None:
        return bool(auc <= CHANCE_AUC)
    return bool(interval[0] <= CHANCE_AUC)


def _chance_sentence(
    subject: str, condition: str, metrics: Mapping[str, Any], baseline: Mapping[str, Any]
) -> str | None:
    if not _auc_at_chance(metrics):
        return None
    interval = metrics.get("roc_auc_ci")
    auc = _with_interval(float(metrics["roc_auc"]), interval)
    if interval is not None and interval[1] < CHANCE_AUC:
        verdict = f"ranks AI images below real ones under {condition}: ROC AUC {auc}"
    else:
        verdict = (
            f"is no better than chance under {condition}: ROC AUC {auc}, and 0.5 is a coin toss"
        )
    sentence = f"{subject} {verdict}"
    base_entry = baseline["subjects"].get(subject)
    if condition != baseline["name"] and base_entry is not None:
        base = base_entry["overall"]
        if base.get("roc_auc") is not None:
            sentence += (
                f" (against {_with_interval(base['roc_auc'], base.get('roc_auc_ci'))} "
                f"under {baseline['name']})"
            )
    return sentence + "."


def _largest_drops(
    conditions: Sequence[Mapping[str, Any]], subjects: Sequence[str], baseline: Mapping[str, Any]
) -> list[str]:
    """Per subject, the condition that costs it the most TPR at 5% FPR against the
    baseline, when it costs anything."""
    sentences = []
    for s in subjects:
        base = baseline["subjects"].get(s)
        if base is None or base["overall"].get("tpr_at_5pct_fpr") is None:
            continue
        base_tpr = float(base["overall"]["tpr_at_5pct_fpr"])
        worst: tuple[float, str, float] | None = None
        for condition in conditions:
            entry = condition["subjects"].get(s)
            if condition is baseline or entry is None:
                continue
            tpr = entry["overall"].get("tpr_at_5pct_fpr")
            if tpr is None:
                continue
            drop = base_tpr - float(tpr)
            if drop > 0 and (worst is None or drop > worst[0]):
                worst = (drop, str(condition["name"]), float(tpr))
        if worst is not None:
            sentences.append(
                f"{s}'s TPR at 5% FPR falls furthest under {worst[1]}: from "
                f"{_number(base_tpr)} under {baseline['name']} to {_number(worst[2])}."
            )
    return sentences


def _version_title(subject: str, versions: Mapping[str, str]) -> str | None:
    version = versions.get(subject)
    return f"version {version}" if version else None


def _problem_text(problem: Mapping[str, Any]) -> str:
    where = str(problem.get("where", ""))
    line = problem.get("line")
    place = where if line is None else f"{where}:{line}"
    return f"{place}: {problem.get('reason', '')} ({problem.get('kind', '')})"


def _confidence_text(conditions: Sequence[Mapping[str, Any]]) -> str:
    """The intervals' confidence as the document states it, e.g. "95%"."""
    levels = {
        float(entry["overall"]["confidence"])
        for condition in conditions
        for entry in condition["subjects"].values()
        if entry["overall"].get("confidence") is not None
    }
    if not levels:
        return "95%"
    return " / ".join(f"{level * 100:g}%" for level in sorted(levels))


# --- figures ---------------------------------------------------------------------------


def _plain(text: str) -> str:
    """A name as literal figure text: matplotlib would read ``$...$`` as mathtext."""
    return text.replace("$", r"\$")


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(count: int, columns: int, cell: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure of small multiples; the unused cells are hidden."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    figure = Figure(figsize=(cell[0] * cols, cell[1] * rows), layout="constrained")
    axes = list(figure.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _roc_figure(
    entries: Mapping[str, Mapping[str, Any]], subjects: Sequence[str], colours: Mapping[str, str]
) -> str:
    """Every subject's ROC curve, on a linear axis and on a log FPR axis where the low
    false-positive end that a moderation threshold lives in can be read."""
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    linear, logarithmic = figure.subplots(1, 2)
    smallest = 1e-3
    for s in subjects:
        roc = entries[s].get("roc") or {}
        fpr = np.asarray(roc.get("fpr") or [], dtype=np.float64)
        tpr = np.asarray(roc.get("tpr") or [], dtype=np.float64)
        auc = entries[s]["overall"].get("roc_auc")
        label = _plain(f"{s} (AUC {_number(auc) if auc is not None else 'n/a'})")
        width = 2.2 if s == ENSEMBLE else 1.5
        if fpr.size == 0:
            linear.plot([], [], color=colours[s], label=label)
            continue
        linear.plot(fpr, tpr, color=colours[s], linewidth=width, label=label)
        positive = fpr > 0
        if np.any(positive):
            smallest = min(smallest, float(fpr[positive].min()))
            logarithmic.plot(fpr[positive], tpr[positive], color=colours[s], linewidth=width)
    linear.plot([0, 1], [0, 1], linestyle="--", color=_GUIDE_COLOUR, label="chance")
    linear.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="False-positive rate", ylabel="True-positive rate"
    )
    linear.set_title("ROC")
    linear.legend(loc="lower right", fontsize=8)
    guide = np.logspace(math.log10(smallest), 0, 50)
    logarithmic.plot(guide, guide, linestyle="--", color=_GUIDE_COLOUR)
    for target in (0.01, 0.05):
        logarithmic.axvline(target, color=_GUIDE_COLOUR, linewidth=0.8, linestyle=":")
    logarithmic.set_xscale("log")
    logarithmic.set(xlim=(smallest, 1), ylim=(0, 1.01), xlabel="False-positive rate (log)")
    logarithmic.set_title("ROC, low false-positive rates (1% and 5% marked)")
    _style(linear)
    _style(logarithmic)
    return _png(figure)


def _reliability_figure(
    entries: Mapping[str, Mapping[str, Any]], subjects: Sequence[str], colours: Mapping[str, str]
) -> str:
    """One reliability diagram per subject: observed AI frequency against the mean score in
    each bin; a calibrated subject follows the diagonal."""
    figure, axes = _grid(len(subjects), 3, (3.6, 3.3))
    for ax, s in zip(axes, subjects, strict=True):
        bins = [b for b in entries[s].get("reliability") or [] if b.get("count")]
        ax.plot([0, 1], [0, 1], linestyle="--", color=_GUIDE_COLOUR)
        if bins:
            lower = np.array([b["lower"] for b in bins])
            upper = np.array([b["upper"] for b in bins])
            observed = np.array([b["observed_frequency"] for b in bins])
            predicted = np.array([b["mean_predicted"] for b in bins])
            ax.bar(lower, observed, width=upper - lower, align="edge", color=colours[s], alpha=0.15)
            ax.plot(predicted, observed, marker="o", markersize=3.5, color=colours[s])
        else:
            ax.text(0.5, 0.5, "no answered image", ha="center", va="center", color="#555555")
        ece = entries[s]["overall"].get("ece")
        ax.set_title(_plain(f"{s}: ECE {_number(ece) if ece is not None else 'n/a'}"), fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Mean score", ylabel="Observed AI frequency")
        _style(ax)
    return _png(figure)


def _histogram_figure(
    entries: Mapping[str, Mapping[str, Any]], subjects: Sequence[str], threshold: float | None
) -> str:
    """Each subject's answered scores, AI against real, with the threshold marked."""
    figure, axes = _grid(len(subjects), 3, (3.6, 2.8))
    edges = [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]
    for index, (ax, s) in enumerate(zip(axes, subjects, strict=True)):
        scores = entries[s].get("scores") or {}
        real = np.asarray(scores.get("real") or [], dtype=np.float64)
        ai = np.asarray(scores.get("ai") or [], dtype=np.float64)
        ax.hist(
            real,
            bins=edges,
            histtype="stepfilled",
            color=_REAL_COLOUR,
            alpha=0.55,
            label=f"real ({real.size})",
        )
        ax.hist(
            ai,
            bins=edges,
            histtype="stepfilled",
            color=_AI_COLOUR,
            alpha=0.55,
            label=f"AI ({ai.size})",
        )
        if threshold is not None:
            ax.axvline(threshold, color="#222222", linewidth=1, linestyle="--")
        ax.set_title(_plain(s), fontsize=10)
        ax.set(xlim=(0, 1), xlabel="Score", ylabel="Images" if index % 3 == 0 else None)
        ax.legend(fontsize=7, loc="best")
        _style(ax)
    return _png(figure)


_BarValue = Callable[[str, str], tuple[float | None, Sequence[float] | None]]


def _grouped_bars(
    ax: Axes,
    categories: Sequence[str],
    subjects: Sequence[str],
    colours: Mapping[str, str],
    value: _BarValue,
    *,
    chance: float,
) -> None:
    """Bars per category, one per subject, and a dashed line at chance.
    ``value(subject, category)`` gives the height and its interval (or None); an undefined
    value is marked "n/a" at the foot."""
    width = 0.8 / max(1, len(subjects))
    positions = np.arange(len(categories), dtype=np.float64)
    for index, s in enumerate(subjects):
        offset = positions - 0.4 + width * (index + 0.5)
        for x, category in zip(offset, categories, strict=True):
            height, interval = value(s, category)
            if height is None:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            error = None
            if interval is not None:
                error = [[max(0.0, height - interval[0])], [max(0.0, interval[1] - height)]]
            ax.bar(x, height, width=width * 0.95, color=colours[s], yerr=error, capsize=2)
    ax.axhline(chance, color=_GUIDE_COLOUR, linestyle="--", linewidth=1)
    ax.set_xticks(positions, [_plain(c) for c in categories])
    if max((len(c) for c in categories), default=0) > 12:
        ax.tick_params(axis="x", labelrotation=25)
    ax.set_ylim(0, 1.05)
    handles = [Patch(color=colours[s], label=_plain(s)) for s in subjects]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _style(ax)


def _generator_figure(
    entries: Mapping[str, Mapping[str, Any]], subjects: Sequence[str], colours: Mapping[str, str]
) -> str:
    generators = sorted({str(g) for s in subjects for g in entries[s].get("by_generator") or {}})
    width = max(6.0, 0.45 * len(generators) * max(1, len(subjects)) + 2.5)
    figure = Figure(figsize=(width, 4), layout="constrained")
    ax = figure.subplots()

    def auc(subject: str, generator: str) -> tuple[float | None, Sequence[float] | None]:
        metrics = (entries[subject].get("by_generator") or {}).get(generator)
        if metrics is None:
            return None, None
        return metrics.get("roc_auc"), metrics.get("roc_auc_ci")

    _grouped_bars(ax, generators, subjects, colours, auc, chance=CHANCE_AUC)
    ax.set(ylabel="ROC AUC")
    ax.set_title("ROC AUC per generator")
    return _png(figure)


def _degradation_figure(
    conditions: Sequence[Mapping[str, Any]], subjects: Sequence[str], colours: Mapping[str, str]
) -> str:
    names = [str(c["name"]) for c in conditions]
    by_name = {str(c["name"]): c for c in conditions}
    width = max(7.0, 0.45 * len(names) * max(1, len(subjects)) + 2.5)
    figure = Figure(figsize=(width, 7), layout="constrained")
    auc_ax, tpr_ax = figure.subplots(2, 1)

    def metric(key: str, interval: str | None) -> _BarValue:
        def value(subject: str, condition: str) -> tuple[float | None, Sequence[float] | None]:
            entry = by_name[condition]["subjects"].get(subject)
            if entry is None:
                return None, None
            overall = entry["overall"]
            return overall.get(key), overall.get(interval) if interval else None

        return value

    _grouped_bars(
        auc_ax, names, subjects, colours, metric("roc_auc", "roc_auc_ci"), chance=CHANCE_AUC
    )
    auc_ax.set(ylabel="ROC AUC")
    auc_ax.set_title("ROC AUC per condition (dashed: chance)")
    # A flagger that ignores the image and flags 5% of everything catches 5% of AI images.
    _grouped_bars(tpr_ax, names, subjects, colours, metric("tpr_at_5pct_fpr", None), chance=0.05)
    tpr_ax.set(ylabel="TPR at 5% FPR")
    tpr_ax.set_title("TPR at 5% FPR per condition (dashed: chance)")
    return _png(figure)


# --- the page ----------------------------------------------------------------------------

_TEMPLATE_SOURCE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Evaluation report: {{ source }}</title>
<style>
:root { color-scheme: light; --ink: #1b1b1b; --muted: #5a5a5a; --rule: #d9d9d9;
        --note: #fff6e0; --note-edge: #d99a00; --na: #8a8a8a; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 1.5rem 2rem 4rem; color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.7rem; margin: 0 0 .25rem; }
h2 { font-size: 1.35rem; margin-top: 2.5rem; border-bottom: 2px solid var(--rule);
     padding-bottom: .25rem; }
h3 { font-size: 1.1rem; margin-top: 1.75rem; }
.when { color: var(--muted); margin: 0 0 1rem; }
.note { background: var(--note); border-left: 5px solid var(--note-edge); padding: .75rem 1rem;
        margin: 1rem 0 1.5rem; font-size: 1.02rem; }
.note strong { display: block; font-size: 1.1rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1.25rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
nav.contents ul { columns: 2; padding-left: 1.2rem; }
.scroll { overflow-x: auto; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .88rem; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--rule); padding: .3rem .55rem; text-align: right;
         vertical-align: top; white-space: nowrap; }
th { background: #f4f4f4; font-weight: 600; }
thead th { white-space: normal; vertical-align: bottom; }
table[data-table=detectors] th { text-align: left; }
th[scope=row], td.label, thead tr > th:first-child { text-align: left; }
.ci { display: block; color: var(--muted); font-size: .85em; }
thead th { position: sticky; top: 0; }
th.group { text-align: center; border-left: 1px solid var(--rule); }
td.na { color: var(--na); font-style: italic; cursor: help; }
tr.total th, tr.total td { border-top: 2px solid var(--ink); font-weight: 600; }
abbr, th[title] { text-decoration: underline dotted; cursor: help; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: .88rem; }
ul.findings li { margin: .2rem 0; }
code { font-size: .9em; }
@media print { h2 { break-before: page; } .scroll { overflow: visible; } }
</style>
</head>
<body>
<header>
<h1>Evaluation report</h1>
<p class="when">Evaluated <time datetime="{{ created_at }}">{{ created_at }}</time>
on <code>{{ source }}</code></p>
<div class="note" role="note">
<strong>Scores are an indication, not proof.</strong>
A detector's score says how much an image resembles the AI-generated images it was trained
on; it cannot prove how an image was made. Abstentions (images a detector gave no score
for) are counted and shown, never scored as real. Intervals are {{ confidence }}:
Clopper-Pearson exact intervals for the rates at the threshold, percentile bootstrap
intervals (resampled within each class) for ROC AUC, AP and ECE.
</div>
</header>
<nav class="contents" aria-label="Contents">
<ul>
<li><a href="#dataset">Dataset and setup</a></li>
{% for condition in conditions %}
<li><a href="#{{ condition.anchor }}">Condition: {{ condition.name }}</a></li>
{% endfor %}
{% if degradation %}<li><a href="#degradation">Degradation</a></li>{% endif %}
<li><a href="#provenance">Provenance</a></li>
</ul>
</nav>

<section id="dataset">
<h2>Dataset and setup</h2>
<dl class="facts">
<dt>Source</dt><dd><code>{{ source }}</code></dd>
<dt>Layout</dt><dd>{{ dataset.layout }}</dd>
<dt>Images</dt><dd data-field="images">{{ dataset.images }} ({{ dataset.ai }} AI-generated,
{{ dataset.real }} real)</dd>
<dt>Generators</dt>
<dd data-field="generators">{{ generators | join(", ") if generators else "none named" }}</dd>
<dt>Groups</dt>
<dd data-field="groups">{{ groups | join(", ") if groups else "none named" }}</dd>
<dt>Flag threshold</dt>
<dd data-field="threshold">{{ threshold }} (a score at or above it is flagged)</dd>
<dt>Ensemble</dt><dd data-field="ensemble">{{ ensemble_version }}</dd>
<dt>Problems</dt>
<dd data-field="problems">
{% if problems_total %}
{{ problems_total }} entries did not become labelled images
({{ problem_kinds }}),
{% if problems_total > problems_listed | length %}
the first {{ problems_listed | length }}:
{% else %}
all listed:
{% endif %}
<ul>
{% for problem in problems_listed %}<li>{{ problem }}</li>
{% endfor %}
</ul>
{% else %}none: every entry became a labelled image{% endif %}
</dd>
</dl>
<h3>Detectors</h3>
<div class="scroll"><table data-table="detectors">
<thead><tr><th scope="col">Detector</th><th scope="col">Version</th>
<th scope="col">Weights (sha256)</th></tr></thead>
<tbody>
{% for detector in detectors %}
<tr><th scope="row">{{ detector.name }}</th><td class="label">{{ detector.version }}</td>
<td class="label">
{% if detector.weights_sha256 %}
<code title="{{ detector.weights_sha256 }}">{{ detector.weights_sha256[:16] }}&hellip;</code>
{% else %}
not recorded
{% endif %}
</td></tr>
{% endfor %}
</tbody>
</table></div>
</section>

{% macro render_table(table) %}
<div class="scroll"><table data-table="{{ table.kind }}"
{% if table.condition is not none %}
 data-condition="{{ table.condition }}"
{% endif %}
>
<thead>
{% if table.groups %}
<tr><th></th>
{% for label, span in table.groups %}
<th class="group" colspan="{{ span }}" scope="colgroup">{{ label }}</th>
{% endfor %}
</tr>
{% endif %}
<tr><th scope="col">{{ table.first_header }}</th>
{% for column in table.headers %}
<th scope="col" title="{{ column.explanation }}">{{ column.header }}</th>
{% endfor %}
</tr>
</thead>
<tbody>
{% for row in table.rows %}
<tr data-row="{{ row.key }}"{% if row.total %} class="total"{% endif %}>
<th scope="row"{% if row.title %} title="{{ row.title }}"{% endif %}>{{ row.label }}</th>
{% for cell in row.cells %}
<td{% if cell.metric %} data-metric="{{ cell.metric }}"{% endif %}
{% if cell.undefined %} class="na"{% endif %}
{% if cell.title %} title="{{ cell.title }}"{% endif %}
>{{ cell.text }}{% if cell.interval %} <span class="ci">{{ cell.interval }}</span>{% endif %}</td>
{% endfor %}
</tr>
{% endfor %}
</tbody>
</table></div>
{% endmacro %}

{% for condition in conditions %}
<section id="{{ condition.anchor }}" data-condition="{{ condition.name }}">
<h2>Condition: {{ condition.name }}</h2>
{% if condition.description %}<p>{{ condition.description }}</p>{% endif %}
<h3>Summary</h3>
{{ render_table(condition.summary) }}
{% if condition.findings %}
<ul class="findings">
{% for finding in condition.findings %}<li>{{ finding }}</li>
{% endfor %}
</ul>
{% endif %}
<h3>ROC curves</h3>
<figure><img src="{{ condition.roc.src }}" alt="{{ condition.roc.alt }}">
<figcaption>All subjects on one plot; the dashed diagonal is chance. The right panel spreads
out the low false-positive rates that a moderation threshold is chosen among.</figcaption></figure>
<h3>Reliability</h3>
<figure><img src="{{ condition.reliability.src }}" alt="{{ condition.reliability.alt }}">
<figcaption>Observed share of AI images against the mean score, per score bin: a calibrated
subject follows the diagonal; above it, scores understate; below, they overstate.
</figcaption></figure>
<h3>Score histograms</h3>
<figure><img src="{{ condition.histograms.src }}" alt="{{ condition.histograms.alt }}">
<figcaption>Answered scores of AI and real images; the dashed line is the flag threshold.
</figcaption></figure>
{% if condition.generators %}
<h3>By generator</h3>
{{ render_table(condition.generators) }}
<figure><img src="{{ condition.generator_chart.src }}" alt="{{ condition.generator_chart.alt }}">
<figcaption>ROC AUC per generator with its interval; the dashed line is chance.
</figcaption></figure>
{% endif %}
{% if condition.groups %}
<h3>By group</h3>
{{ render_table(condition.groups) }}
{% endif %}
</section>
{% endfor %}

{% if degradation %}
<section id="degradation">
<h2>Degradation</h2>
<p>How each subject holds up when the same images are shrunk, re-compressed or blurred, as
in GenImage's evaluation on degraded images: ROC AUC and TPR at 5% FPR under each
condition ({{ degradation.conditions | join(", ") }}).</p>
<ul class="findings">
{% for finding in degradation.findings %}<li>{{ finding }}</li>
{% endfor %}
</ul>
<h3>ROC AUC by condition</h3>
{{ render_table(degradation.auc) }}
<h3>TPR at 5% FPR by condition</h3>
{{ render_table(degradation.tpr) }}
<figure><img src="{{ degradation.chart.src }}" alt="{{ degradation.chart.alt }}">
<figcaption>Dashed lines: chance (ROC AUC 0.5; a random flagger that flags 5% of real images
also catches 5% of AI ones).</figcaption></figure>
</section>
{% endif %}

<section id="provenance">
<h2>Provenance</h2>
<p>Provenance signals (content credentials, embedded watermarks, generator metadata) are
model-free evidence and are reported apart from the detectors' scores. For each kind of
signal: the images it flagged as AI-generated, how many of those are labelled AI and real,
and its precision.</p>
{% if provenance.table %}
{% if provenance.detector %}
<p>Read by the <code>{{ provenance.detector }}</code> detector.</p>
{% endif %}
{{ render_table(provenance.table) }}
{% else %}
<p>No provenance detector ran in this evaluation: nothing was looked for, so nothing is
reported here.</p>
{% endif %}
<p><strong>Missing provenance says nothing about an image:</strong> most real photographs and
most AI-generated images carry none, and re-encoding, screenshots and many upload pipelines
strip it. Only a signal that is present is evidence.</p>
</section>
</body>
</html>
"""

_ENVIRONMENT = jinja2.Environment(
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATE = _ENVIRONMENT.from_string(_TEMPLATE_SOURCE)
