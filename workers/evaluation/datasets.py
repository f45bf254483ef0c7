"""Labelled images to measure and calibrate detectors on: what ``synthsentry eval`` and
``synthsentry calibrate`` read.

Four sources, each read by its own loader, and :func:`load_labelled` to pick one from
what a path is:

GenImage (:func:`load_genimage`)
    ``<root>/<generator>/{train,val}/{ai,nature}/...``: the generator is the folder's
    name, the split ``train`` or ``val``, the label 1 under ``ai`` and 0 under
    ``nature``. The dataset's archives unpack into one more folder
    (``GLIDE/imagenet_glide/train/...``); a generator folder whose only subfolder holds
    ``train``/``val`` is read through it, still named after the outer folder. The root
    may also be a single generator folder (one that holds ``train``/``val`` itself).
An ``{ai,real}`` tree (:func:`load_flat`)
    ``<root>/ai/**`` is labelled 1 and ``<root>/real/**`` 0, at any depth. ``fake`` is
    accepted for ``ai`` and ``nature`` for ``real``, the same words the CSV takes, so a
    single GenImage split folder (``val/`` with ``ai/`` and ``nature/``) loads as it is.
A CSV (:func:`load_csv`)
    A header naming ``path`` and ``label`` is required; ``generator``, ``group`` and
    ``split`` are optional. Labels, case-insensitive: ``ai``, ``fake`` or ``1`` for
    AI-generated; ``real``, ``nature`` or ``0`` for not. A relative path is resolved
    against the CSV's folder. Cells are stripped of surrounding spaces; an empty optional
    cell means "not given".
The review's labelled examples (:func:`load_review_export`)
    What ``synthsentry review export --format csv|jsonl`` writes
    (:mod:`workers.review_export`). ``ai_generated`` is 1, ``not_ai_generated`` 0;
    ``unsure`` is no label, so those rows are left out and each is reported (kind
    ``unsure``). The image is named by its sha256 (no path) with the places its bytes were
    seen, and the scores the deciding moderator was shown are kept, so an evaluation can
    use them without scoring again.

Folders are walked with the scan's own walker (:func:`workers.scan.iter_image_paths`):
file names in sorted order, a folder's files before its subfolders, hidden entries (a
leading dot) skipped, symbolic links to folders not followed. The same input gives the
same list in the same order.

Nothing is dropped without a word: every entry that does not become a labelled image (a
file outside the labelled folders, a name that is not an image's, a bad CSV row, a second
row for the same image, an ``unsure`` decision) is returned as a :class:`Problem` naming
the file, the line where there is one, and why. A source whose shape cannot be read at
all (no header, no labelled folders) raises :class:`DatasetError` instead.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from db.models import ReviewDecision
from workers.review_export import COLUMNS as REVIEW_EXPORT_COLUMNS
from workers.scan import iter_image_paths

AI = 1
REAL = 0

IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".avifs",
    }
)
"""File name endings (any case) of the formats intake decodes; in a folder, other files are
reported rather than loaded."""

LABEL_WORDS: Mapping[str, int] = {
    "ai": AI,
    "fake": AI,
    "1": AI,
    "real": REAL,
    "nature": REAL,
    "0": REAL,
}
"""CSV label cells (lower-cased) and what they mean."""

FOLDER_LABELS: Mapping[str, int] = {"ai": AI, "fake": AI, "real": REAL, "nature": REAL}
"""Folder names (any case) that carry a label in a tree."""

GENIMAGE_SPLITS = ("train", "val")
CSV_COLUMNS = ("path", "label", "generator", "group", "split")
REVIEW_LABELS: Mapping[str, int] = {
    ReviewDecision.AI_GENERATED.value: AI,
    ReviewDecision.NOT_AI_GENERATED.value: REAL,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_READ = "not part of the layout; not read"


class DatasetError(ValueError):
    """The source as a whole cannot be read as labelled images."""


class ProblemKind(enum.StrEnum):
    INVALID = "invalid"  # a row or entry that is malformed or names nothing usable
    UNLABELLED = "unlabelled"  # outside the labelled folders, or not an image by its name
    DUPLICATE = "duplicate"  # the same image a second time
    UNSURE = "unsure"  # a review decision of "unsure": no label, by design


@dataclass(frozen=True)
class Problem:
    """One entry that did not become a labelled image, and why."""

    where: str
    line: int | None
    kind: ProblemKind
    reason: str

    def __str__(self) -> str:
        place = self.where if self.line is None else f"{self.where}:{self.line}"
        return f"{place}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "line": self.line,
            "kind": self.kind.value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class LabelledImage:
    """One image and its ground truth: ``label`` 1 for AI-generated, 0 for real.

    A file on disk has ``path``; an image out of the review has ``sha256`` and the
    ``sources`` where its bytes were seen (``s3://bucket/key`` or a local path). The
    ``recorded_*`` fields are what the review showed at decision time: each detector's
    score (None where it abstained) and version, the ensemble's score and version.
    """

    path: Path | None
    sha256: str | None
    label: int
    generator: str | None = None
    group: str | None = None
    split: str | None = None
    sources: tuple[str, ...] = ()
    recorded_scores: dict[str, float | None] = field(default_factory=dict, hash=False)
    recorded_versions: dict[str, str | None] = field(default_factory=dict, hash=False)
    recorded_ai_score: float | None = None
    ensemble_version: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.label, bool) or self.label not in (AI, REAL):
            raise ValueError(f"label must be 1 (AI-generated) or 0 (real), got {self.label!r}")
        if self.path is None and self.sha256 is None:
            raise ValueError("a labelled image needs a path or a sha256")

    @property
    def name(self) -> str:
        """The path, or ``sha256:<hex>`` for an image known by its content."""
        return str(self.path) if self.path is not None else f"sha256:{self.sha256}"


class Loaded(NamedTuple):
    """What a loader returns: the labelled images in a stable order, and every entry that
    did not become one."""

    items: list[LabelledImage]
    problems: list[Problem]

    def count(self, kind: ProblemKind) -> int:
        return sum(1 for p in self.problems if p.kind is kind)


class _Collector:
    """Items and problems as a loader finds them; a second entry for the same image (same
    path, or same sha256) is reported and the first is kept."""

    def __init__(self) -> None:
        self.items: list[LabelledImage] = []
        self.problems: list[Problem] = []
        self._seen: dict[str, tuple[str, int | None, int]] = {}

    def add(self, item: LabelledImage, where: Path | str, line: int | None = None) -> None:
        key = os.path.normpath(item.path) if item.path is not None else f"sha256:{item.sha256}"
        first = self._seen.get(key)
        if first is not None:
            first_where, first_line, first_label = first
            at = first_where if first_line is None else f"{first_where}:{first_line}"
            clash = ", with a different label" if first_label != item.label else ""
            self.problem(
                where,
                line,
                ProblemKind.DUPLICATE,
                f"{item.name} was already listed at {at}{clash}; the first is kept",
            )
            return
        self._seen[key] = (str(where), line, item.label)
        self.items.append(item)

    def problem(self, where: Path | str, line: int | None, kind: ProblemKind, reason: str) -> None:
        self.problems.append(Problem(str(where), line, kind, reason))

    def result(self) -> Loaded:
        return Loaded(self.items, self.problems)


# --- folders -----------------------------------------------------------------------------


def load_genimage(root: Path | str) -> Loaded:
    """A GenImage tree, or a single generator folder of one (see the module's docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    out = _Collector()
    generators: list[tuple[str, Path]] = []
    if _splits_in(root):
        generators.append((root.name, root))
    else:
        for child in _children(root, out):
            if not child.is_dir():
                out.problem(
                    child,
                    None,
                    ProblemKind.UNLABELLED,
                    "a file beside the generator folders; GenImage keeps images in "
                    "<generator>/{train,val}/{ai,nature}/",
                )
                continue
            data = _genimage_data(child, out)
            if data is None:
                out.problem(
                    child,
                    None,
                    ProblemKind.UNLABELLED,
                    "has no train/ or val/ folder (nor a single folder holding them); "
                    "its contents were not read",
                )
                continue
            if data != child:
                for extra in _children(child, out):
                    if extra != data:
                        out.problem(extra, None, ProblemKind.UNLABELLED, _NOT_READ)
            generators.append((child.name, data))
        if not generators:
            raise DatasetError(
                f"{root}: no GenImage generator folders (<generator>/train/ai/..., "
                "<generator>/val/nature/...) found"
            )
    for generator, folder in generators:
        _load_generator(generator, folder, out)
    return out.result()


def load_flat(root: Path | str) -> Loaded:
    """An ``{ai,real}`` tree: everything below ``ai/`` (or ``fake/``) is labelled 1,
    everything below ``real/`` (or ``nature/``) 0; other entries of the root are
    reported."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    out = _Collector()
    labelled: list[tuple[Path, int]] = []
    for child in _children(root, out):
        label = FOLDER_LABELS.get(child.name.lower())
        if label is not None and child.is_dir():
            labelled.append((child, label))
        else:
            out.problem(child, None, ProblemKind.UNLABELLED, _outside(child, "ai/ or real/"))
    if not labelled:
        raise DatasetError(f"{root}: no ai/ or real/ folder (nor fake/ or nature/)")
    for folder, label in labelled:
        for path in _walk(folder, out):
            out.add(LabelledImage(path=path, sha256=None, label=label), path)
    return out.result()


def _outside(entry: Path, expected: str) -> str:
    what = "folder" if entry.is_dir() else "file"
    return f"a {what} outside {expected}; not read"


def _children(folder: Path, out: _Collector) -> list[Path]:
    """The folder's entries sorted by name, hidden ones left out (as the walker does)."""
    try:
        with os.scandir(folder) as listing:
            names = sorted(e.name for e in listing if not e.name.startswith("."))
    except OSError as exc:
        out.problem(folder, None, ProblemKind.INVALID, f"the folder cannot be listed: {exc}")
        return []
    return [folder / name for name in names]


def _splits_in(folder: Path) -> bool:
    """Whether the folder holds a ``train`` or ``val`` folder."""
    try:
        with os.scandir(folder) as listing:
            return any(
                e.name.lower() in GENIMAGE_SPLITS and e.is_dir()
                for e in listing
                if not e.name.startswith(".")
            )
    except OSError:
        return False


def _genimage_data(generator: Path, out: _Collector) -> Path | None:
    """The folder holding ``train``/``val`` for a generator: itself, or its only
    subfolder (the folder the dataset's archive unpacks into)."""
    if _splits_in(generator):
        return generator
    subfolders = [c for c in _children(generator, out) if c.is_dir()]
    if len(subfolders) == 1 and _splits_in(subfolders[0]):
        return subfolders[0]
    return None


def _load_generator(generator: str, folder: Path, out: _Collector) -> None:
    for split in _children(folder, out):
        if split.name.lower() not in GENIMAGE_SPLITS or not split.is_dir():
            out.problem(split, None, ProblemKind.UNLABELLED, _outside(split, "train/ and val/"))
            continue
        for cls in _children(split, out):
            label = FOLDER_LABELS.get(cls.name.lower())
            if label is None or not cls.is_dir():
                out.problem(cls, None, ProblemKind.UNLABELLED, _outside(cls, "ai/ and nature/"))
                continue
            for path in _walk(cls, out):
                item = LabelledImage(
                    path=path,
                    sha256=None,
                    label=label,
                    generator=generator,
                    split=split.name.lower(),
                )
                out.add(item, path)


def _walk(folder: Path, out: _Collector) -> Iterator[Path]:
    """Image files below ``folder`` in the walker's order; anything else is reported."""
    for path in iter_image_paths([folder]):
        if path.is_dir():
            reason = (
                "a symbolic link to a folder; not followed"
                if path.is_symlink()
                else "the folder cannot be listed"
            )
            out.problem(path, None, ProblemKind.INVALID, reason)
        elif not path.exists() and not path.is_symlink():
            out.problem(path, None, ProblemKind.INVALID, "does not exist")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            shown = repr(path.suffix) if path.suffix else "none"
            out.problem(
                path,
                None,
                ProblemKind.UNLABELLED,
                f"not an image file by its name (ending {shown}); not read",
            )
        else:
            yield path


# --- CSV ---------------------------------------------------------------------------------


def load_csv(csv_path: Path | str) -> Loaded:
    """A CSV of ``path,label[,generator][,group][,split]`` with a header (see the module's
    docstring). Rows that cannot be used are reported with their line number."""
    csv_path = Path(csv_path)
    out = _Collector()
    header, rows = _read_csv(csv_path)
    if "path" not in header or "label" not in header:
        raise DatasetError(
            f"{csv_path}: the first line must be a header naming the path and label columns "
            f"(path,label[,generator][,group][,split]); found {','.join(header) or 'nothing'}"
        )
    _report_unused_columns(csv_path, header, CSV_COLUMNS, out)
    words = ", ".join(LABEL_WORDS)
    for line, cells in rows:
        if len(cells) != len(header):
            out.problem(
                csv_path,
                line,
                ProblemKind.INVALID,
                f"{len(cells)} fields where the header has {len(header)}",
            )
            continue
        row = {name: cell.strip() for name, cell in zip(header, cells, strict=True)}
        if not row["path"]:
            out.problem(csv_path, line, ProblemKind.INVALID, "the path is empty")
            continue
        label = LABEL_WORDS.get(row["label"].lower())
        if label is None:
            out.problem(
                csv_path,
                line,
                ProblemKind.INVALID,
                f"label {row['label']!r} is none of {words} (any case)",
            )
            continue
        path = csv_path.parent / row["path"]
        if not path.is_file():
            why = "is a folder, not a file" if path.is_dir() else "does not exist"
            out.problem(csv_path, line, ProblemKind.INVALID, f"{path} {why}")
            continue
        item = LabelledImage(
            path=path,
            sha256=None,
            label=label,
            generator=row.get("generator") or None,
            group=row.get("group") or None,
            split=row.get("split") or None,
        )
        out.add(item, csv_path, line)
    return out.result()


def _read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (lower-cased, stripped) and each non-blank record with the line it
    starts on."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{csv_path}: the file is empty; a header line is required")
            columns = [name.strip().lower() for name in header]
            repeated = sorted({c for c in columns if columns.count(c) > 1})
            if repeated:
                raise DatasetError(f"{csv_path}: columns named twice: {', '.join(repeated)}")
            rows: list[tuple[int, list[str]]] = []
            ended = reader.line_num
            for record in reader:
                start, ended = ended + 1, reader.line_num
                if any(cell.strip() for cell in record):
                    rows.append((start, record))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}: not readable as CSV ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot be read ({exc})") from exc
    return columns, rows


def _report_unused_columns(
    where: Path, header: list[str], known: tuple[str, ...], out: _Collector
) -> None:
    unused = [c for c in header if c not in known]
    if unused:
        out.problem(
            where,
            1,
            ProblemKind.UNLABELLED,
            f"columns not used: {', '.join(unused)} (known: {', '.join(known)})",
        )


# --- the review's labelled examples ------------------------------------------------------


class _BadRow(Exception):
    pass


class _Unsure(Exception):
    pass


def load_review_export(path: Path | str) -> Loaded:
    """The review's labelled examples, as ``synthsentry review export`` writes them:
    ``.jsonl`` (one JSON object a line) or ``.csv`` (the lists as JSON text in their
    cells). ``unsure`` decisions are left out and each is reported."""
    path = Path(path)
    out = _Collector()
    if path.suffix.lower() == ".jsonl":
        records = _jsonl_records(path, out)
        text_cells = False
    else:
        header, rows = _read_csv(path)
        if "sha256" not in header or "label" not in header:
            raise DatasetError(
                f"{path}: the header must name the sha256 and label columns of the review "
                f"export; found {','.join(header) or 'nothing'}"
            )
        _report_unused_columns(path, header, REVIEW_EXPORT_COLUMNS, out)
        records = []
        for line, cells in rows:
            if len(cells) != len(header):
                out.problem(
                    path,
                    line,
                    ProblemKind.INVALID,
                    f"{len(cells)} fields where the header has {len(header)}",
                )
                continue
            records.append((line, dict(zip(header, cells, strict=True))))
        text_cells = True
    for line, record in records:
        try:
            item = _review_item(record, text_cells=text_cells)
        except _Unsure:
            out.problem(path, line, ProblemKind.UNSURE, "decided 'unsure': no label, left out")
            continue
        except _BadRow as exc:
            out.problem(path, line, ProblemKind.INVALID, str(exc))
            continue
        out.add(item, path, line)
    return out.result()


def _jsonl_records(path: Path, out: _Collector) -> list[tuple[int, dict[str, Any]]]:
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    out.problem(path, line, ProblemKind.INVALID, f"not JSON: {exc.msg}")
                    continue
                if not isinstance(value, dict):
                    out.problem(path, line, ProblemKind.INVALID, "not a JSON object")
                    continue
                records.append((line, value))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from exc
    return records


def _review_item(record: Mapping[str, Any], *, text_cells: bool) -> LabelledImage:
    sha256 = record.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.strip().lower()):
        raise _BadRow(f"sha256 {sha256!r} is not 64 hexadecimal digits")
    decision = record.get("label")
    if decision == ReviewDecision.UNSURE.value:
        raise _Unsure
    if not isinstance(decision, str) or decision not in REVIEW_LABELS:
        known = ", ".join([*REVIEW_LABELS, ReviewDecision.UNSURE.value])
        raise _BadRow(f"label {decision!r} is none of {known}")
    detectors = _json_cell(record.get("detectors"), "detectors", text_cells)
    sources = _json_cell(record.get("sources"), "sources", text_cells)
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise _BadRow("sources is not a list of strings")
    scores, versions = _recorded_detectors(detectors)
    return LabelledImage(
        path=None,
        sha256=sha256.strip().lower(),
        label=REVIEW_LABELS[decision],
        sources=tuple(sources),
        recorded_scores=scores,
        recorded_versions=versions,
        recorded_ai_score=_score(record.get("ai_score"), "ai_score", text_cells),
        ensemble_version=_text(record.get("ensemble_version"), "ensemble_version"),
    )


def _json_cell(value: Any, name: str, text_cells: bool) -> Any:
    """A list column: JSON text in a CSV cell (empty for none), a list in JSON lines."""
    if value is None:
        return []
    if not text_cells:
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise _BadRow(f"{name} is not JSON: {exc.msg}") from exc


def _recorded_detectors(
    detectors: Any,
) -> tuple[dict[str, float | None], dict[str, str | None]]:
    if not isinstance(detectors, list):
        raise _BadRow("detectors is not a list")
    scores: dict[str, float | None] = {}
    versions: dict[str, str | None] = {}
    for entry in detectors:
        if not isinstance(entry, dict):
            raise _BadRow("a detectors entry is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRow("a detectors entry has no name")
        if name in scores:
            raise _BadRow(f"detector {name!r} is listed twice")
        scores[name] = _score(entry.get("score"), f"the score of {name}", text_cells=False)
        versions[name] = _text(entry.get("version"), f"the version of {name}")
    return scores, versions


def _score(value: Any, name: str, text_cells: bool) -> float | None:
    """A probability in [0, 1], or None (no score: an abstention, or no verdict)."""
    if value is None or (text_cells and isinstance(value, str) and not value.strip()):
        return None
    if text_cells and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _BadRow(f"{name} {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRow(f"{name} {value!r} is not a number")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise _BadRow(f"{name} {value!r} is not a probability in [0, 1]")
    return float(value)


def _text(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _BadRow(f"{name} {value!r} is not text")
    return value


# --- choosing a loader -------------------------------------------------------------------


def load_labelled(path: Path | str) -> Loaded:
    """Load whatever ``path`` is: a folder with ``ai``/``real`` (or ``fake``/``nature``)
    children is an ``{ai,real}`` tree; a folder of GenImage generator folders (or one
    generator folder) is GenImage; a ``.csv`` whose header names ``path`` is a CSV of
    paths; a ``.csv`` naming ``sha256`` and ``label``, or a ``.jsonl``, is the review's
    export; a ``.tsv`` is a corpus manifest (:func:`load_manifest`). Anything else
    raises :class:`DatasetError` saying what was found."""
    path = Path(path)
    if path.is_dir():
        probe = _Collector()
        folders = [c for c in _children(path, probe) if c.is_dir()]
        names = {c.name.lower() for c in folders}
        if names & FOLDER_LABELS.keys():
            return load_flat(path)
        if names & set(GENIMAGE_SPLITS) or any(_genimage_data(c, probe) for c in folders):
            return load_genimage(path)
        found = ", ".join(sorted(c.name for c in folders)) or "no folders"
        raise DatasetError(
            f"{path}: cannot tell what this folder holds: expected ai/ and real/ folders "
            "(or fake/, nature/), or GenImage generator folders holding train/ and val/; "
            f"found {found}"
        )
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_review_export(path)
    if suffix == ".tsv":
        return load_manifest(path)
    if suffix == ".csv":
        header, _ = _read_csv(path)
        if "path" in header:
            return load_csv(path)
        if "sha256" in header and "label" in header:
            return load_review_export(path)
        raise DatasetError(
            f"{path}: cannot tell what this CSV holds: its header names neither a path "
            "column (path,label,...) nor the review export's sha256 and label; found "
            f"{','.join(header) or 'nothing'}"
        )
    raise DatasetError(
        f"{path}: not a folder, a .csv, a .jsonl or a .tsv manifest; cannot tell what it holds"
    )


# --- the shared corpus -------------------------------------------------------------------


def load_manifest(manifest: Path | str) -> Loaded:
    """A corpus manifest (``shared/corpus/MANIFEST.tsv``, see :func:`corpus_csv`) read as
    the CSV it describes: its ``ai`` and ``real`` rows, with the other rows reported."""
    with tempfile.TemporaryDirectory() as folder:
        converted = Path(folder) / "manifest.csv"
        _, problems = corpus_csv(manifest, converted)
        items, read_problems = load_csv(converted)
    return Loaded(items, [*problems, *read_problems])


def corpus_csv(manifest: Path | str, out_csv: Path | str) -> tuple[int, list[Problem]]:
    """Write a CSV of paths (the format :func:`load_csv` reads) from a corpus manifest: a
    tab-separated file with ``file`` (relative to the manifest's folder), ``label`` and
    optionally ``generator`` and ``signal`` columns, like ``shared/corpus/MANIFEST.tsv``.

    Only ``ai`` and ``real`` rows are written; other labels (``unknown``: no reliable
    ground truth) and rows whose file is missing are reported. Paths are written
    absolute, so the CSV can live anywhere. ``generator`` is written for ``ai`` rows only
    (a real row's names a camera, not a generator); ``group`` is the manifest's
    ``signal`` (what in the file tells its origin), so results can be broken down by
    whether metadata already gives the answer. Returns how many rows were written, and
    the problems.
    """
    manifest = Path(manifest)
    out_csv = Path(out_csv)
    folder = manifest.resolve().parent
    found = _Collector()
    try:
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            fields = [name.strip().lower() for name in reader.fieldnames or []]
            if "file" not in fields or "label" not in fields:
                raise DatasetError(f"{manifest}: the header must name file and label columns")
            rows = []
            for record in reader:
                cells = {
                    key.strip().lower(): value.strip()
                    for key, value in record.items()
                    if isinstance(key, str) and isinstance(value, str)
                }
                rows.append((reader.line_num, cells))
    except OSError as exc:
        raise DatasetError(f"{manifest}: cannot be read ({exc})") from exc
    written = 0
    with out_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "generator", "group"])
        for line, row in rows:
            label = row.get("label", "").lower()
            if label not in ("ai", "real"):
                found.problem(
                    manifest,
                    line,
                    ProblemKind.UNLABELLED,
                    f"label {label!r} is neither ai nor real; left out",
                )
                continue
            image = folder / row["file"]
            if not row["file"] or not image.is_file():
                found.problem(manifest, line, ProblemKind.INVALID, f"{image} does not exist")
                continue
            generator = row.get("generator", "") if label == "ai" else ""
            writer.writerow([str(image), label, generator, row.get("signal", "")])
            written += 1
    return written, found.problems
