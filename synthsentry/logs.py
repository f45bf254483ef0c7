"""Structured logging: one JSON object per line, with whatever context the caller binds
through ``extra=`` (task id, item id, detector). Image bytes, presigned URLs and secrets are
never passed to a logger in this code base."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from workers.names import printable

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": printable(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                # A path or key from outside may hold bytes no JSON reader accepts.
                payload[key] = printable(value) if isinstance(value, str) else value
        if record.exc_info:
            payload["exc"] = printable(self.formatException(record.exc_info))
        return json.dumps(payload, default=lambda value: printable(str(value)))


def configure(level: str = "INFO", *, json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries narrate routine steps (each migration plugin, each HTTP retry) at INFO;
    # operators need their warnings, not their progress.
    for noisy in ("alembic", "botocore", "boto3", "urllib3", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
