"""The evaluation report: a standalone HTML page printing a result document.

The document is built the way ``synthsentry eval`` builds one, from seeded synthetic scores
through the real metric functions: two detectors (``clip`` abstains on some images) and the
ensemble, two generators (one with a hostile name), groups of which two hold a single class,
the unchanged images and a JPEG 30 condition under which ``texture`` loses its signal, and
provenance signals. The page is read back with an HTML parser and checked against the
document's own numbers, then opened in a real Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page

from workers.evaluation.datasets import Problem, ProblemKind
from workers.evaluation.metrics import (
    clopper_pearson,
    compute_metrics,
    metrics_by_group,
    reliability_bins,
    roc_points,
)
from workers.evaluation.report import render_report, write_report

pytest_plugins = ["browser"]

THRESHOLD = 0.6
HOSTILE = "<script>alert(1)</script>"
GENERATORS = ("sdxl", HOSTILE)
DETECTORS = ("texture", "clip")
SUBJECTS = (*DETECTORS, "ensemble")
PER_GENERATOR = 120  # AI images, and as many real ones, per generator
BOOTSTRAP = 200

# (metric, its interval) in the order of the summary table's columns after the counts.
SUMMARY_METRICS = (
    ("accuracy", "accuracy_ci"),
    ("roc_auc", "roc_auc_ci"),
    ("average_precision", "average_precision_ci"),
    ("tpr_at_1pct_fpr", None),
    ("tpr_at_5pct_fpr", None),
    ("fpr_at_threshold", "fpr_at_threshold_ci"),
    ("tpr_at_threshold", "tpr_at_threshold_ci"),
    ("brier", None),
    ("ece", "ece_ci"),
)


# --- the document --------------------------------------------------------------------


def _subject_entry(
    scores: np.ndarray, labels: np.ndarray, generators: np.ndarray, groups: np.ndarray
) -> dict[str, Any]:
    def metrics(**kwargs: Any) -> Any:
        return dict(threshold=THRESHOLD, n_bootstrap=BOOTSTRAP, seed=7, **kwargs)

    roc = roc_points(scores, labels)
    answered = ~np.isnan(scores)
    return {
        "overall": compute_metrics(scores, labels, **metrics()).as_dict(),
        "by_generator": {
            name: m.as_dict()
            for name, m in metrics_by_group(scores, labels, generators, **metrics()).items()
        },
        "by_group": {
            name: m.as_dict()
            for name, m in metrics_by_group(scores, labels, groups, **metrics()).items()
        },
        "roc": {"fpr": [], "tpr": []}
        if roc is None
        else {"fpr": roc.fpr.tolist(), "tpr": roc.tpr.tolist()},
        "reliability": [b.as_dict() for b in reliability_bins(scores, labels)],
        "scores": {
            "ai": scores[answered & (labels == 1)].tolist(),
            "real": scores[answered & (labels == 0)].tolist(),
        },
    }


def build_document(conditions: tuple[str, ...] = ("identity", "jpeg_30")) -> dict[str, Any]:
    rng = np.random.default_rng(20261130)
    labels = np.tile(np.repeat([1, 0], PER_GENERATOR), len(GENERATORS))
    generators = np.repeat(np.array(GENERATORS, dtype=object), 2 * PER_GENERATOR).astype(str)
    # "studio" holds AI images only and "camera" real images only: a ranking over either is
    # undefined.
    groups = np.where(labels == 1, "web", "camera").astype(object)
    groups[(labels == 1) & (np.arange(labels.size) % 4 == 0)] = "studio"
    groups[(labels == 0) & (np.arange(labels.size) % 2 == 0)] = "web"
    groups = groups.astype(str)
    is_ai = labels == 1

    def beta(ai: tuple[float, float], real: tuple[float, float]) -> np.ndarray:
        return np.where(is_ai, rng.beta(*ai, labels.size), rng.beta(*real, labels.size))

    entries = []
    for name in conditions:
        if name == "identity":
            texture = beta((6, 2), (2, 6))
            clip = beta((7, 2), (2, 7))
        else:
            texture = rng.beta(2, 2, labels.size)  # no signal left
            clip = beta((4, 2.5), (2.5, 4))
        clip[rng.random(labels.size) < 0.1] = np.nan
        ensemble = np.nanmean(np.vstack([texture, clip]), axis=0)
        entries.append(
            {
                "name": name,
                "description": f"images under {name}",
                "subjects": {
                    subject: _subject_entry(scores, labels, generators, groups)
                    for subject, scores in zip(SUBJECTS, (texture, clip, ensemble), strict=True)
                },
            }
        )

    problems = [
        Problem(f"images/bad-{i}.txt", None, ProblemKind.UNLABELLED, "not an image by its name")
        for i in range(6)
    ] + [Problem("labels.csv", 14, ProblemKind.DUPLICATE, "second row for images/a.png")]
    document = {
        "schema": 1,
        "created_at": "2026-11-30T06:00:00+00:00",
        "dataset": {
            "source": "/data/genimage-val",
            "layout": "genimage",
            "images": int(labels.size),
            "ai": int(is_ai.sum()),
            "real": int((~is_ai).sum()),
            "problems": [p.as_dict() for p in problems],
            "generators": list(GENERATORS),
            "groups": sorted(set(groups.tolist())),
        },
        "threshold": THRESHOLD,
        "ensemble_version": "weighted-mean@3",
        "detectors": [
            {"name": "texture", "version": "texture-v2", "weights_sha256": "ab" * 32},
            {"name": "clip", "version": "clip-vit-l14@1", "weights_sha256": None},
        ],
        "conditions": entries,
        "provenance": {
            "detector": "provenance",
            "signals": {
                "c2pa": _signal(11, 1),
                "watermark": _signal(0, 0),
            },
            "any": _signal(11, 1),
        },
    }
    # What a reader of the JSON file gets: null for undefined values, no NaN.
    loaded: dict[str, Any] = json.loads(json.dumps(document, allow_nan=False))
    return loaded


def _signal(ai: int, real: int) -> dict[str, Any]:
    flagged = ai + real
    return {
        "flagged": flagged,
        "flagged_ai": ai,
        "flagged_real": real,
        "precision": ai / flagged if flagged else None,
        "precision_ci": clopper_pearson(ai, flagged).as_list() if flagged else None,
    }


# --- reading the page back -----------------------------------------------------------

VOID = frozenset({"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def clean(self) -> str:
        return " ".join(self.text().split())

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> elements"
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def cells(row: Node) -> dict[str, Node]:
    return {td.attrs["data-metric"]: td for td in row.find_all("td")}


def formatted(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document()


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return build_document(("identity",))


@pytest.fixture(scope="module")
def report_file(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(document, path)
    return path


@pytest.fixture(scope="module")
def html(report_file: Path) -> str:
    return report_file.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(html: str) -> Node:
    return parse(html)


# --- tests ---------------------------------------------------------------------------


def test_summary_tables_print_every_subject_with_the_documents_numbers(
    document: dict[str, Any], tree: Node
) -> None:
    for condition in document["conditions"]:
        table = tree.find("table", data_table="summary", data_condition=condition["name"])
        rows = {tr.attrs["data-row"]: tr for tr in table.find("tbody").find_all("tr")}
        assert list(rows) == list(SUBJECTS)
        for subject, entry in condition["subjects"].items():
            overall = entry["overall"]
            row = cells(rows[subject])
            assert rows[subject].find("th").clean() == subject
            assert row["answered"].clean() == str(overall["answered"])
            assert row["abstained"].clean() == str(overall["abstained"])
            for key, interval in SUMMARY_METRICS:
                expected = formatted(overall[key], overall[interval] if interval else None)
                assert row[key].clean() == expected, (condition["name"], subject, key)


def test_abstentions_are_counted_per_class(document: dict[str, Any], tree: Node) -> None:
    overall = document["conditions"][0]["subjects"]["clip"]["overall"]
    assert overall["abstained"] > 0
    table = tree.find("table", data_table="summary", data_condition="identity")
    abstained = cells(table.find("tr", data_row="clip"))["abstained"]
    assert abstained.clean() == str(overall["abstained"])
    assert abstained.attrs["title"] == (
        f"{overall['abstained_ai']} AI, {overall['abstained_real']} real"
    )


def test_undefined_values_are_na_with_the_reason(document: dict[str, Any], tree: Node) -> None:
    by_group = document["conditions"][0]["subjects"]["texture"]["by_group"]
    assert by_group["studio"]["roc_auc"] is None
    assert by_group["camera"]["tpr_at_threshold"] is None
    table = tree.find("table", data_table="group", data_condition="identity")
    studio = table.find("tr", data_row="studio").find_all("td", data_metric="roc_auc")
    camera = table.find("tr", data_row="camera").find_all("td", data_metric="tpr_at_threshold")
    assert len(studio) == len(SUBJECTS) == len(camera)
    for cell in studio:
        assert cell.clean() == "n/a"
        assert "na" in cell.attrs["class"].split()
        assert cell.attrs["title"] == "one class only: no answered real image"
    for cell in camera:
        assert cell.clean() == "n/a"
        assert cell.attrs["title"] == "one class only: no answered AI image"
    web = table.find("tr", data_row="web").find_all("td", data_metric="roc_auc")
    expected = by_group["web"]
    assert web[0].clean() == formatted(expected["roc_auc"], expected["roc_auc_ci"])
    assert "class" not in web[0].attrs


def test_generator_table_matches_the_document(document: dict[str, Any], tree: Node) -> None:
    for condition in document["conditions"]:
        table = tree.find("table", data_table="generator", data_condition=condition["name"])
        rows = {tr.attrs["data-row"]: tr for tr in table.find("tbody").find_all("tr")}
        assert set(rows) == set(GENERATORS)
        for generator, row in rows.items():
            auc_cells = row.find_all("td", data_metric="roc_auc")
            for subject, cell in zip(SUBJECTS, auc_cells, strict=True):
                metrics = condition["subjects"][subject]["by_generator"][generator]
                assert cell.clean() == formatted(metrics["roc_auc"], metrics["roc_auc_ci"])
            counts = cells(row)
            first = condition["subjects"]["texture"]["by_generator"][generator]
            assert counts["n_ai"].clean() == str(first["n_ai"])


def test_figures_are_embedded_pngs(tree: Node) -> None:
    images = tree.find_all("img")
    # ROC, reliability, histograms and generators per condition, and the degradation chart.
    assert len(images) == 2 * 4 + 1
    for image in images:
        src = image.attrs["src"]
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True))) as png:
            assert png.format == "PNG"
            assert png.width > 100
            assert png.height > 100
        assert image.attrs["alt"]


def test_nothing_is_fetched_from_anywhere(html: str, tree: Node) -> None:
    for node in tree.iter():
        for name in ("src", "href", "srcset", "action", "data"):
            value = node.attrs.get(name, "")
            assert not re.match(r"\s*(https?:)?//", value, re.IGNORECASE), (node.tag, value)
        assert node.tag not in {"script", "link", "iframe", "object", "embed"}
    style = tree.find("style").text()
    assert "url(" not in style
    assert "@import" not in style
    assert "http://" not in html
    assert "https://" not in html


def test_names_are_escaped(html: str, tree: Node) -> None:
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not tree.find_all("script")
    # The parser unescapes: the hostile name reads back as the plain text it is.
    table = tree.find("table", data_table="generator", data_condition="identity")
    assert table.find("tr", data_row=HOSTILE).find("th").clean() == HOSTILE
    assert HOSTILE in tree.find("dd", data_field="generators").clean()


def test_header_states_the_setup_and_the_caveats(document: dict[str, Any], tree: Node) -> None:
    assert tree.find("title").clean() == "Evaluation report: /data/genimage-val"
    note = tree.find("div", **{"class": "note"}).clean()
    assert "Scores are an indication, not proof." in note
    assert "never scored as real" in note
    assert "Intervals are 95%" in note
    assert tree.find("dd", data_field="threshold").clean().startswith("0.600")
    assert tree.find("dd", data_field="ensemble").clean() == "weighted-mean@3"
    assert tree.find("dd", data_field="images").clean() == "480 (240 AI-generated, 240 real)"
    detectors = tree.find("table", data_table="detectors")
    assert [tr.find("th").clean() for tr in detectors.find("tbody").find_all("tr")] == list(
        DETECTORS
    )
    assert "clip-vit-l14@1" in detectors.clean()
    problems = tree.find("dd", data_field="problems")
    assert problems.clean().startswith("7 entries did not become labelled images")
    assert "1 duplicate, 6 unlabelled" in problems.clean()
    listed = [li.clean() for li in problems.find_all("li")]
    assert len(listed) == 5
    assert listed[0] == "images/bad-0.txt: not an image by its name (unlabelled)"


def test_degradation_findings_follow_the_numbers(document: dict[str, Any], tree: Node) -> None:
    section = tree.find("section", id="degradation")
    findings = [li.clean() for li in section.find("ul", **{"class": "findings"}).find_all("li")]
    jpeg = document["conditions"][1]
    at_chance = {
        subject
        for subject, entry in jpeg["subjects"].items()
        if entry["overall"]["roc_auc_ci"][0] <= 0.5
    }
    # The synthetic data is built so that exactly texture has lost its signal.
    assert at_chance == {"texture"}
    for subject in SUBJECTS:
        mentioned = any(
            f.startswith(f"{subject} is no better than chance under jpeg_30") for f in findings
        )
        assert mentioned == (subject in at_chance), (subject, findings)
    auc = section.find("table", data_table="degradation_auc")
    tpr = section.find("table", data_table="degradation_tpr")
    for subject in SUBJECTS:
        auc_cells = auc.find("tr", data_row=subject).find_all("td")
        tpr_cells = tpr.find("tr", data_row=subject).find_all("td")
        for condition, auc_cell, tpr_cell in zip(
            document["conditions"], auc_cells, tpr_cells, strict=True
        ):
            overall = condition["subjects"][subject]["overall"]
            assert auc_cell.clean() == formatted(overall["roc_auc"], overall["roc_auc_ci"])
            assert tpr_cell.clean() == formatted(overall["tpr_at_5pct_fpr"])


def test_degradation_section_needs_more_than_one_condition(single: dict[str, Any]) -> None:
    page = parse(render_report(single))
    assert not page.find_all("section", id="degradation")
    assert not any(a.attrs.get("href") == "#degradation" for a in page.find_all("a"))
    assert len(page.find_all("table", data_table="summary")) == 1
    assert page.find_all("section", id="provenance")


def test_provenance_is_reported_apart(document: dict[str, Any], tree: Node) -> None:
    section = tree.find("section", id="provenance")
    table = section.find("table", data_table="provenance")
    rows = {tr.attrs["data-row"]: cells(tr) for tr in table.find("tbody").find_all("tr")}
    assert list(rows) == ["c2pa", "watermark", "any"]
    signals = document["provenance"]["signals"]
    for kind, expected in [*signals.items(), ("any", document["provenance"]["any"])]:
        row = rows[kind]
        assert row["flagged"].clean() == str(expected["flagged"])
        assert row["flagged_ai"].clean() == str(expected["flagged_ai"])
        assert row["flagged_real"].clean() == str(expected["flagged_real"])
        assert row["precision"].clean() == formatted(
            expected["precision"], expected["precision_ci"]
        )
    assert rows["watermark"]["precision"].attrs["class"] == "na"
    assert "Missing provenance says nothing about an image" in section.clean()


def test_no_provenance_detector_means_no_counts(single: dict[str, Any]) -> None:
    document = {**single}
    document["provenance"] = {
        "detector": None,
        "signals": {},
        "any": _signal(0, 0),
    }
    section = parse(render_report(document)).find("section", id="provenance")
    assert not section.find_all("table")
    assert "No provenance detector ran in this evaluation" in section.clean()
    assert "Missing provenance says nothing about an image" in section.clean()


def test_another_schema_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="schema 2"):
        render_report({**document, "schema": 2})


def test_the_report_renders_in_a_browser(report_file: Path, page: Page, artifacts: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(report_file.as_uri())
    assert page.title() == "Evaluation report: /data/genimage-val"
    widths: list[int] = page.evaluate(
        "() => Array.from(document.images, (img) => img.complete ? img.naturalWidth : 0)"
    )
    assert len(widths) == 9
    assert all(width > 0 for width in widths), widths
    assert page.locator(".note").is_visible()
    page.screenshot(path=str(artifacts / "eval-report.png"))
