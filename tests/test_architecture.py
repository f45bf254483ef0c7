"""The import graph points one way:

    db  <-  workers (the scoring core, then scan and fleet side by side)  <-  tasks  <-  CLI

Nothing in ``workers/`` or ``db/`` reads settings or knows the CLI; the scan and the fleet
do not import each other; and a process that only sends tasks (the API) loads neither the
database driver nor the image library nor torch by importing the Celery app."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every module a file imports, at any depth (deferred imports in functions count);
    relative imports are resolved against the file's package."""
    package = list(path.relative_to(root).with_suffix("").parts)[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    offending = {}
    for path in _modules(package):
        bad = sorted(
            name for name in _imports(path) if name.split(".")[0] in forbidden or name in forbidden
        )
        if bad:
            offending[str(path.relative_to(REPO))] = bad
    return offending


def test_db_imports_nothing_above_it() -> None:
    assert _offending("db", ("workers", "tasks", "synthsentry", "api")) == {}


def test_workers_import_neither_settings_nor_tasks_nor_the_cli() -> None:
    assert _offending("workers", ("synthsentry", "tasks", "api")) == {}


def test_tasks_do_not_import_the_cli() -> None:
    offending = {
        file: [name for name in names if name.startswith("synthsentry.cli")]
        for file, names in _offending("tasks", ("synthsentry",)).items()
    }
    assert {file: names for file, names in offending.items() if names} == {}


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    module = tmp_path / "workers" / "scan.py"
    module.parent.mkdir()
    module.write_text("from . import fleet\nfrom .detectors import base\n", encoding="utf-8")
    found = _imports(module, root=tmp_path)
    assert {"workers.fleet", "workers.detectors.base"} <= found


@pytest.mark.parametrize(("one", "other"), [("scan", "fleet"), ("fleet", "scan")])
def test_the_two_pipelines_stand_side_by_side(one: str, other: str) -> None:
    assert f"workers.{other}" not in _imports(REPO / "workers" / f"{one}.py")


def test_both_pipelines_go_through_the_scoring_core() -> None:
    for pipeline in ("scan", "fleet"):
        assert "workers.scoring" in _imports(REPO / "workers" / f"{pipeline}.py")


def test_sending_a_task_loads_no_database_image_or_model_library() -> None:
    probe = (
        "import json, sys\n"
        "from synthsentry.settings import Settings\n"
        "from tasks import app\n"
        "app.configure(Settings(broker_url='redis://127.0.0.1:1/0'))\n"
        "assert app.app.conf.task_routes\n"
        "heavy = ('sqlalchemy', 'PIL', 'torch', 'timm', 'psycopg2')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
