"""The API as tests build it: through ``synthsentry serve``'s own builder, on settings made
for the test (a temporary data folder, the test's database), in the embedded mode unless
told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from synthsentry.cli.serve import BuiltApi, build_api
from synthsentry.runtime import Runtime
from synthsentry.settings import Settings

# A bucket every test context allows (besides the upload bucket, which needs no allowing).
BUCKET = "media"


def api_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "api_mode": "embedded",
        "allowed_buckets": BUCKET,
        "webhook_secret": "a-webhook-secret-for-tests-0123456789",
        "environment": "test",
        # No random blind second reviews unless a test asks for them.
        "review_second_opinion_share": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


def build_test_api(sessions: sessionmaker[Session], tmp_path: Path, **overrides: Any) -> BuiltApi:
    """The API's context and (embedded) worker, not started: call ``.start()``/``.stop()``
    (the worker runs in a thread of the test process)."""
    settings = api_settings(tmp_path, **overrides)
    return build_api(Runtime.from_settings(settings), sessions, settings)
