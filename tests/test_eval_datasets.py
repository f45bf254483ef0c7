"""Labelled images from each source: GenImage and {ai,real} trees, CSVs, the review's
export (written by the export's own writer), the choice between them, the shared corpus."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from db.models import ReviewDecision
from workers.evaluation.datasets import (
    DatasetError,
    LabelledImage,
    ProblemKind,
    corpus_csv,
    load_csv,
    load_flat,
    load_genimage,
    load_labelled,
    load_review_export,
)
from workers.review import LabelledExample
from workers.review_export import write_examples


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 4x4 image file, in the format its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _rows(items: list[LabelledImage], root: Path) -> list[tuple[str, int, str | None, str | None]]:
    return [
        (str(i.path.relative_to(root)) if i.path else "", i.label, i.generator, i.split)
        for i in items
    ]


# --- GenImage ----------------------------------------------------------------------------


def _genimage(root: Path) -> None:
    # As the dataset unpacks: the archive's own folder inside the generator's.
    _image(root / "GLIDE/imagenet_glide/train/ai/b.png")
    _image(root / "GLIDE/imagenet_glide/train/ai/a.png")
    _image(root / "GLIDE/imagenet_glide/train/nature/n01440764/x.JPEG")
    _image(root / "GLIDE/imagenet_glide/val/nature/y.jpg")
    _text(root / "GLIDE/imagenet_glide.zip.md5", "0" * 32)
    # Flattened: train/val straight under the generator.
    _image(root / "Midjourney/val/ai/m2.png")
    _image(root / "Midjourney/val/ai/deeper/m1.png")
    _image(root / "Midjourney/val/ai/m1.png")
    _image(root / "Midjourney/val/nature/n.JPEG")
    _text(root / "Midjourney/val/ai/notes.txt", "kept by hand")
    _image(root / "Midjourney/val/ai/.hidden.png")
    _image(root / "Midjourney/val/extra/z.png")
    _image(root / "Midjourney/test/ai/t.png")
    _text(root / "README.md", "GenImage")
    _image(root / "empty_generator/readme.png")


def test_genimage_tree(tmp_path: Path) -> None:
    _genimage(tmp_path)
    loaded = load_genimage(tmp_path)
    assert _rows(loaded.items, tmp_path) == [
        ("GLIDE/imagenet_glide/train/ai/a.png", 1, "GLIDE", "train"),
        ("GLIDE/imagenet_glide/train/ai/b.png", 1, "GLIDE", "train"),
        ("GLIDE/imagenet_glide/train/nature/n01440764/x.JPEG", 0, "GLIDE", "train"),
        ("GLIDE/imagenet_glide/val/nature/y.jpg", 0, "GLIDE", "val"),
        ("Midjourney/val/ai/m1.png", 1, "Midjourney", "val"),
        ("Midjourney/val/ai/m2.png", 1, "Midjourney", "val"),
        ("Midjourney/val/ai/deeper/m1.png", 1, "Midjourney", "val"),
        ("Midjourney/val/nature/n.JPEG", 0, "Midjourney", "val"),
    ]
    assert all(i.sha256 is None and i.group is None for i in loaded.items)
    reported = {Path(p.where).relative_to(tmp_path).as_posix(): p for p in loaded.problems}
    assert set(reported) == {
        "README.md",
        "empty_generator",
        "GLIDE/imagenet_glide.zip.md5",
        "Midjourney/test",
        "Midjourney/val/extra",
        "Midjourney/val/ai/notes.txt",
    }
    assert (
        "not an image file by its name (ending '.txt')"
        in reported["Midjourney/val/ai/notes.txt"].reason
    )
    assert "outside train/ and val/" in reported["Midjourney/test"].reason
    assert "outside ai/ and nature/" in reported["Midjourney/val/extra"].reason
    assert all(p.kind is ProblemKind.UNLABELLED and p.line is None for p in loaded.problems)
    assert load_genimage(tmp_path) == loaded


def test_a_single_generator_folder(tmp_path: Path) -> None:
    _genimage(tmp_path)
    loaded = load_genimage(tmp_path / "GLIDE" / "imagenet_glide")
    assert [(i.generator, i.split, i.label) for i in loaded.items] == [
        ("imagenet_glide", "train", 1),
        ("imagenet_glide", "train", 1),
        ("imagenet_glide", "train", 0),
        ("imagenet_glide", "val", 0),
    ]
    assert loaded.problems == []


def test_genimage_refuses_a_folder_without_generators(tmp_path: Path) -> None:
    _image(tmp_path / "photos/a.png")
    with pytest.raises(DatasetError, match="no GenImage generator folders"):
        load_genimage(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_genimage(tmp_path / "missing")


# --- {ai,real} tree ----------------------------------------------------------------------


def test_flat_tree_in_the_walkers_order(tmp_path: Path) -> None:
    _image(tmp_path / "real/z.png")
    _image(tmp_path / "real/sub/a.png")
    _image(tmp_path / "real/b.webp")
    _image(tmp_path / "ai/c.jpg")
    _image(tmp_path / "ai/a.png")
    _image(tmp_path / "fake/f.png")
    _image(tmp_path / "nature/n.png")
    _image(tmp_path / "ai/.DS_Store.png")
    _image(tmp_path / "stray.png")
    _image(tmp_path / "unsorted/u.png")
    (tmp_path / "ai/link_to_real").symlink_to(tmp_path / "real", target_is_directory=True)
    loaded = load_flat(tmp_path)
    assert _rows(loaded.items, tmp_path) == [
        ("ai/a.png", 1, None, None),
        ("ai/c.jpg", 1, None, None),
        ("fake/f.png", 1, None, None),
        ("nature/n.png", 0, None, None),
        ("real/b.webp", 0, None, None),
        ("real/z.png", 0, None, None),
        ("real/sub/a.png", 0, None, None),
    ]
    assert [(Path(p.where).name, p.kind, p.reason) for p in loaded.problems] == [
        ("stray.png", ProblemKind.UNLABELLED, "a file outside ai/ or real/; not read"),
        ("unsorted", ProblemKind.UNLABELLED, "a folder outside ai/ or real/; not read"),
        ("link_to_real", ProblemKind.INVALID, "a symbolic link to a folder; not followed"),
    ]
    assert load_flat(tmp_path) == loaded


def test_flat_tree_needs_a_labelled_folder(tmp_path: Path) -> None:
    _image(tmp_path / "pictures/a.png")
    with pytest.raises(DatasetError, match="no ai/ or real/ folder"):
        load_flat(tmp_path)


# --- CSV ---------------------------------------------------------------------------------


def test_csv_of_paths(tmp_path: Path) -> None:
    a = _image(tmp_path / "images/a.png")
    b = _image(tmp_path / "images/b.jpg")
    c = _image(tmp_path / "elsewhere/c.png")
    _image(tmp_path / "images/d.png")
    (tmp_path / "images/folder.png").mkdir()
    table = _text(
        tmp_path / "lists/labels.csv",
        "Path, Label ,generator,group,notes\n"
        "../images/a.png,AI,sdxl,batch1,x\n"
        f"{c},real,,,\n"
        "\n"
        '../images/b.jpg,Nature,"multi\nline",g,\n'
        "../images/d.png,maybe,,,\n"
        "../images/missing.png,1,,,\n"
        ",0,,,\n"
        "../images/a.png,0,,,\n"
        "../images/d.png,fake\n"
        "../images/folder.png,0,,,\n"
        "../images/d.png, fake ,,,\n",
    )
    loaded = load_csv(table)
    assert [(i.path, i.label, i.generator, i.group, i.split) for i in loaded.items] == [
        (tmp_path / "lists/../images/a.png", 1, "sdxl", "batch1", None),
        (c, 0, None, None, None),
        (tmp_path / "lists/../images/b.jpg", 0, "multi\nline", "g", None),
        (tmp_path / "lists/../images/d.png", 1, None, None, None),
    ]
    assert all(i.path is not None and i.path.is_file() for i in loaded.items)
    assert a.is_file() and b.is_file()
    at = {p.line: p for p in loaded.problems if p.line is not None}
    assert len(at) == len(loaded.problems)
    assert sorted(at) == [1, 7, 8, 9, 10, 11, 12]
    assert "columns not used: notes" in at[1].reason
    assert "label 'maybe' is none of ai, fake, 1, real, nature, 0" in at[7].reason
    assert at[8].reason.endswith("missing.png does not exist")
    assert at[9].reason == "the path is empty"
    assert at[10].kind is ProblemKind.DUPLICATE
    assert "already listed at" in at[10].reason and f"{table}:2" in at[10].reason
    assert "with a different label" in at[10].reason
    assert at[11].reason == "2 fields where the header has 5"
    assert at[12].reason.endswith("folder.png is a folder, not a file")
    assert str(at[8]).startswith(f"{table}:8: ")


def test_csv_split_column_and_bom(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    table = tmp_path / "labels.csv"
    table.write_bytes("\ufeffpath,label,split\na.png,real,val\n".encode())
    loaded = load_csv(table)
    assert [(i.label, i.split) for i in loaded.items] == [(0, "val")]
    assert loaded.problems == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("file,label\na.png,ai\n", "must be a header naming the path and label"),
        ("a.png,ai\n", "must be a header naming the path and label"),
        ("path,label,path\n", "columns named twice: path"),
    ],
)
def test_csv_without_a_usable_header(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_csv(_text(tmp_path / "labels.csv", text))


# --- the review's export -----------------------------------------------------------------

SHA_AI = "a" * 64
SHA_REAL = "b" * 64
SHA_UNSURE = "c" * 64


def _examples() -> list[LabelledExample]:
    def example(sha: str, label: ReviewDecision, **fields: object) -> LabelledExample:
        values: dict[str, object] = {
            "sha256": sha,
            "label": label,
            "decided_at": "2025-01-02T03:04:05+00:00",
            "decided_by": "moderator",
            "ensemble_version": "ens-1",
            "ai_score": 0.91,
            "detectors": [
                {"name": "clip", "version": "1.0", "score": 0.93},
                {"name": "provenance", "version": "2", "score": None},
            ],
            "sources": ["s3://uploads/u/1.png", "/srv/images/1.png"],
        }
        values.update(fields)
        return LabelledExample(**values)  # type: ignore[arg-type]

    return [
        example(SHA_AI, ReviewDecision.AI_GENERATED),
        example(SHA_UNSURE, ReviewDecision.UNSURE),
        example(
            SHA_REAL,
            ReviewDecision.NOT_AI_GENERATED,
            ensemble_version=None,
            ai_score=None,
            detectors=[],
            sources=[],
        ),
    ]


def _export(tmp_path: Path, fmt: str) -> Path:
    out = io.StringIO()
    write_examples(_examples(), fmt, out)  # type: ignore[arg-type]
    return _text(tmp_path / f"examples.{fmt}", out.getvalue())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_review_export(tmp_path: Path, fmt: str) -> None:
    loaded = load_review_export(_export(tmp_path, fmt))
    first, second = loaded.items
    assert first == LabelledImage(
        path=None,
        sha256=SHA_AI,
        label=1,
        sources=("s3://uploads/u/1.png", "/srv/images/1.png"),
        recorded_scores={"clip": 0.93, "provenance": None},
        recorded_versions={"clip": "1.0", "provenance": "2"},
        recorded_ai_score=0.91,
        ensemble_version="ens-1",
    )
    assert second == LabelledImage(path=None, sha256=SHA_REAL, label=0)
    assert first.name == f"sha256:{SHA_AI}"
    assert loaded.count(ProblemKind.UNSURE) == 1
    (unsure,) = loaded.problems
    assert unsure.line == 3 if fmt == "csv" else unsure.line == 2
    assert "unsure" in unsure.reason


def test_review_export_bad_rows_with_line_numbers(tmp_path: Path) -> None:
    good = json.dumps({"sha256": SHA_AI, "label": "ai_generated"})
    lines = [
        good,
        "",
        "not json",
        "[1, 2]",
        json.dumps({"sha256": "xyz", "label": "ai_generated"}),
        json.dumps({"sha256": SHA_REAL, "label": "real"}),
        json.dumps({"sha256": SHA_REAL, "label": "ai_generated", "ai_score": 1.5}),
        json.dumps(
            {
                "sha256": SHA_REAL,
                "label": "ai_generated",
                "detectors": [{"name": "a", "score": 0.1}, {"name": "a", "score": 0.2}],
            }
        ),
        json.dumps({"sha256": SHA_REAL, "label": "not_ai_generated", "sources": "s3://b/k"}),
        json.dumps({"sha256": SHA_AI.upper(), "label": "not_ai_generated"}),
        json.dumps({"sha256": SHA_REAL, "label": "not_ai_generated", "ai_score": True}),
    ]
    loaded = load_review_export(_text(tmp_path / "examples.jsonl", "\n".join(lines) + "\n"))
    assert [(i.sha256, i.label) for i in loaded.items] == [(SHA_AI, 1)]
    reasons = {p.line: (p.kind, p.reason) for p in loaded.problems if p.line is not None}
    assert len(reasons) == len(loaded.problems)
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert reasons[3][1].startswith("not JSON")
    assert reasons[4][1] == "not a JSON object"
    assert "is not 64 hexadecimal digits" in reasons[5][1]
    assert "label 'real' is none of ai_generated, not_ai_generated, unsure" in reasons[6][1]
    assert "not a probability in [0, 1]" in reasons[7][1]
    assert "listed twice" in reasons[8][1]
    assert reasons[9][1] == "sources is not a list of strings"
    assert reasons[10][0] is ProblemKind.DUPLICATE and "different label" in reasons[10][1]
    assert "is not a number" in reasons[11][1]


def test_review_csv_bad_cells(tmp_path: Path) -> None:
    path = _export(tmp_path, "csv")
    with path.open("a", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([SHA_REAL.replace("b", "d"), "ai_generated", "", "", "", "x", "", ""])
        writer.writerow([SHA_REAL.replace("b", "e"), "ai_generated", "", "", "", "", "{", ""])
        writer.writerow([SHA_REAL.replace("b", "f"), "ai_generated"])
    loaded = load_review_export(path)
    assert len(loaded.items) == 2
    reasons = {p.line: p.reason for p in loaded.problems if p.kind is ProblemKind.INVALID}
    assert reasons == {
        5: "ai_score 'x' is not a number",
        6: "detectors is not JSON: Expecting property name enclosed in double quotes",
        7: "2 fields where the header has 8",
    }


# --- choosing a loader -------------------------------------------------------------------


def test_load_labelled_chooses_by_what_the_path_is(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _image(flat / "ai/a.png")
    _image(flat / "nature/b.png")
    assert [i.label for i in load_labelled(flat).items] == [1, 0]

    genimage = tmp_path / "genimage"
    _genimage(genimage)
    assert load_labelled(genimage) == load_genimage(genimage)
    one = genimage / "Midjourney"
    assert {i.generator for i in load_labelled(one).items} == {"Midjourney"}

    table = _text(tmp_path / "paths.csv", f"path,label\n{flat / 'ai/a.png'},ai\n")
    assert [i.path for i in load_labelled(table).items] == [flat / "ai/a.png"]

    for fmt in ("csv", "jsonl"):
        export = _export(tmp_path / fmt, fmt)
        assert [i.sha256 for i in load_labelled(export).items] == [SHA_AI, SHA_REAL]


def test_load_labelled_says_when_it_cannot_tell(tmp_path: Path) -> None:
    _image(tmp_path / "holiday/a.png")
    with pytest.raises(DatasetError, match=r"cannot tell what this folder holds.*found holiday"):
        load_labelled(tmp_path)
    with pytest.raises(DatasetError, match="cannot tell what this CSV holds"):
        load_labelled(_text(tmp_path / "other.csv", "file,verdict\n"))
    with pytest.raises(DatasetError, match=r"not a folder, a \.csv, a \.jsonl or a \.tsv"):
        load_labelled(_text(tmp_path / "labels.txt", "path,label\n"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_labelled(tmp_path / "nowhere.csv")


def test_a_labelled_image_must_say_what_it_is() -> None:
    with pytest.raises(ValueError, match="label must be 1"):
        LabelledImage(path=Path("a.png"), sha256=None, label=2)
    with pytest.raises(ValueError, match="label must be 1"):
        LabelledImage(path=Path("a.png"), sha256=None, label=True)
    with pytest.raises(ValueError, match="a path or a sha256"):
        LabelledImage(path=None, sha256=None, label=0)


# --- the shared corpus -------------------------------------------------------------------


def test_corpus_csv(corpus_dir: Path, tmp_path: Path) -> None:
    manifest = corpus_dir / "MANIFEST.tsv"
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    labelled = [r for r in rows if r["label"] in ("ai", "real")]
    assert labelled, "the corpus has ai and real rows"

    out = tmp_path / "corpus.csv"
    written, problems = corpus_csv(manifest, out)
    assert written == len(labelled)
    assert [p.kind for p in problems] == [ProblemKind.UNLABELLED] * (len(rows) - len(labelled))
    assert all("neither ai nor real" in p.reason for p in problems)

    loaded = load_labelled(out)
    assert loaded.problems == []
    assert [(i.path, i.label, i.group) for i in loaded.items] == [
        (corpus_dir.resolve() / r["file"], 1 if r["label"] == "ai" else 0, r["signal"] or None)
        for r in labelled
    ]
    assert all(
        i.generator == (r["generator"] or None) if i.label == 1 else i.generator is None
        for i, r in zip(loaded.items, labelled, strict=True)
    )
    # The manifest itself is a dataset: read as the CSV it describes, its other rows reported.
    direct = load_labelled(manifest)
    assert direct.items == loaded.items
    assert [p.kind for p in direct.problems] == [p.kind for p in problems]
