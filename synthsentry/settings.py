"""Runtime configuration: the only module that reads the environment.

Defaults are the embedded ones (SQLite file, local storage, in-process execution) so that
`synthsentry scan` works on a laptop with no services. Every field can be set through an
environment variable named ``SYNTHSENTRY_<FIELD>`` (upper case).
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _looks_like_placeholder(secret: str) -> bool:
    lowered = secret.lower()
    return len(secret) < 16 or any(
        marker in lowered for marker in ("change-me", "changeme", "secret", "password", "xxx")
    )


def _default_data_dir() -> Path:
    return Path.cwd() / ".synthsentry"


def check_device(value: str) -> str:
    """A torch device name this project runs on: ``cpu``, ``cuda`` or ``cuda:N``."""
    if value in {"cpu", "cuda"} or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")


class PlattCalibration(BaseModel):
    """``p' = sigmoid(a * logit(p) + b)`` for one detector's scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(1.0, allow_inf_nan=False)
    b: float = Field(0.0, allow_inf_nan=False)


class Settings(BaseSettings):
    # A refused value is never echoed back: several of these settings are secrets.
    model_config = SettingsConfigDict(
        env_prefix="SYNTHSENTRY_", extra="ignore", hide_input_in_errors=True
    )

    environment: Literal["development", "test", "production"] = Field(
        "development", description="Deployment environment; production refuses unsafe defaults."
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the embedded database and local weights cache.",
    )
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL. Unset: SQLite file `<data_dir>/synthsentry.db`. "
            "Postgres: postgresql+psycopg2://user:pass@host:5432/db"
        ),
    )
    database_echo: bool = Field(False, description="Log every SQL statement (debugging only).")

    # Intake limits: applied before and while decoding every image.
    max_image_bytes: int = Field(
        50 * 1024 * 1024, gt=0, description="Largest accepted file, in bytes."
    )
    max_image_pixels: int = Field(
        100_000_000,
        gt=0,
        description="Largest accepted width x height; checked from the header, before decoding.",
    )
    decode_timeout_seconds: float = Field(
        20.0, gt=0, description="Wall-clock budget for decoding one image."
    )

    # Detection and ensemble.
    device: str = Field("cpu", description="Torch device for model detectors: cpu, cuda, cuda:N.")
    batch_size: int = Field(16, ge=1, le=1024, description="Largest batch a model sees.")
    intake_threads: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2),
        ge=1,
        description="Threads that read, decode and preprocess images while the models run.",
    )
    intake_memory_mb: int = Field(
        2048,
        ge=64,
        description="Memory for decoded images held at once by one scan or one worker "
        "process (pixels x 8 bytes plus the file, reserved from the header before decoding): "
        "a decode that does not fit waits, so peak memory does not grow with the inputs.",
    )
    detector_config: Path | None = Field(
        None,
        description="TOML file with extra or overriding detector specs (docs/detectors.md).",
    )
    flag_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="ai_score at or above which an item is flagged for human review.",
    )
    ensemble_weights: dict[str, float] = Field(
        default_factory=dict,
        description='Per-detector weight in the ensemble mean, JSON: {"sumsub-v2": 2.0}. '
        "Detectors not named weigh 1.0.",
    )
    ensemble_calibrations: dict[str, PlattCalibration] = Field(
        default_factory=dict,
        description="Per-detector Platt calibration of scores before they are combined, JSON: "
        '{"sumsub-v2": {"a": 1.3, "b": -0.2}}. Detectors not named are taken as they are.',
    )

    review_unscored_reasons: list[str] = Field(
        default_factory=lambda: ["decode_error", "decode_timeout", "truncated"],
        description="Rejection reasons whose uploads open a review case although no detector "
        'scored them, JSON: ["decode_error"]. The default sends a recognised image format '
        "the decoder refused (damaged, cut short, too slow) to a moderator; [] reviews none.",
    )

    # Object storage (S3 or any S3-protocol server such as MinIO).
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-protocol server; unset means AWS S3."
    )
    s3_region: str = Field("us-east-1", description="Region for the S3 client.")

    # The fleet: Celery over Redis, S3 upload events, Postgres.
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker (Redis). JSON messages only."
    )
    visibility_timeout_seconds: int = Field(
        900,
        ge=10,
        description="Redis redelivers a message not acknowledged within this time (this is "
        "how the messages of a worker that died come back); must exceed the longest wait plus "
        "run time of any task: more than twice the task time limit plus the batch wait.",
    )
    task_time_limit_seconds: int = Field(
        300,
        ge=5,
        description="A task (or one batch of a detector worker) running longer than this is "
        "stopped: a prefork child is killed, a batching worker exits; the messages come back.",
    )
    batch_wait_ms: float = Field(
        50.0,
        ge=0,
        le=10_000,
        description="Longest a detector worker holds a message waiting for others to fill a "
        "batch; a full batch (SYNTHSENTRY_BATCH_SIZE) runs at once.",
    )
    max_detect_attempts: int = Field(
        3,
        ge=1,
        description="Deliveries of one detector task before it is recorded as failed "
        "(stops a message that kills its worker every time).",
    )
    fleet_detectors: list[str] = Field(
        default_factory=lambda: ["provenance"],
        description='Detectors that make up the fleet\'s ensemble, JSON: ["provenance", '
        '"sumsub-v2"]. Each listens on the queue detect.<name>.',
    )
    allowed_buckets: str = Field(
        "",
        description="Buckets (and optional key prefixes) whose upload events are scanned: "
        '"uploads,media:incoming/". Empty refuses every event.',
    )

    webhook_secret: SecretStr = Field(
        SecretStr(""),
        description="Shared secret the upload webhook expects as 'Authorization: Bearer ...'.",
    )
    api_read_timeout_seconds: int = Field(
        30,
        ge=1,
        le=3600,
        description="The API answers 408 and closes a connection whose request body stops "
        "arriving for this long (uvicorn has no read timeout of its own).",
    )
    api_connection_limit: int = Field(
        200,
        ge=1,
        description="Requests and connections `synthsentry serve` handles at once; past it, "
        "new ones are answered 503.",
    )
    webhook_max_records: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most records the upload webhook takes from one event; more is answered "
        "413, queues nothing and is kept as a dead letter.",
    )

    # --- the platform API (``synthsentry serve``) -------------------------------------------
    api_mode: Literal["auto", "embedded", "fleet"] = Field(
        "auto",
        description="embedded: scans run in the API process on a local object store (no "
        "broker, no S3); fleet: the API records and enqueues for the workers. auto: embedded "
        "with the SQLite default database, fleet with a server database.",
    )
    api_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest JSON request body the API reads; a bigger one is answered 413 "
        "before it is read. Multipart uploads may be as large as SYNTHSENTRY_MAX_IMAGE_BYTES "
        "plus 64 KiB of form overhead.",
    )
    upload_bucket: str = Field(
        "uploads",
        min_length=3,
        max_length=63,
        description="Bucket that image bytes posted to /v1/scans are stored in before they are "
        "scanned (in the embedded mode: a folder of the local object store).",
    )
    upload_prefix: str = Field(
        "api/", max_length=255, description="Key prefix of the bytes posted to /v1/scans."
    )
    object_store_dir: Path | None = Field(
        None,
        description="Embedded mode only: the folder that serves as the object store (one "
        "sub-folder per bucket). Default: <data_dir>/objects.",
    )
    embedded_queue_size: int = Field(
        256,
        ge=1,
        description="Embedded mode: work items the in-process worker holds in memory; more "
        "wait in the database and are picked up by its sweep.",
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Key that encrypts callback signing secrets at rest (any long random "
        "string). Required in production; in development one is generated into "
        "<data_dir>/secret.key.",
    )
    secret_key_previous: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Earlier secret keys, while an operator changes SYNTHSENTRY_SECRET_KEY: "
        "what they encrypted is still read, nothing new is written with them. JSON: "
        '["old key"], or one key as it is. Remove them once `synthsentry callbacks '
        "rotate-key` has re-encrypted the stored secrets under the new key.",
    )
    callback_timeout_seconds: float = Field(
        15.0,
        gt=0,
        le=60,
        description="Callback timeout: to resolve the host, to connect, and for each read of "
        "the answer; an attempt takes at most twice this in all.",
    )
    callback_retry_hours: float = Field(
        24.0,
        ge=24.0,
        description="How long a failing callback is retried (exponential backoff with jitter) "
        "before its delivery is marked failed.",
    )
    callback_allow_private_addresses: bool = Field(
        False,
        description="Let callbacks reach private, loopback and link-local addresses (local "
        "development only; refused in production).",
    )
    rescan_page_size: int = Field(
        1000, ge=1, le=1000, description="Objects listed per page of a batch re-scan."
    )
    rescan_max_in_flight: int = Field(
        5000,
        ge=1,
        description="Re-scan work queued but not finished, per re-scan; its listing waits "
        "while there is more (bounded queues, bounded memory).",
    )

    # --- human review (the dashboard and /v1/reviews) ---------------------------------------
    review_lease_minutes: float = Field(
        10.0,
        ge=2,
        le=240,
        description="How long a moderator holds a claimed case; the open case page renews "
        "it every minute, and an abandoned case returns to the queue when it runs out.",
    )
    review_second_opinion_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of first decisions sent, blind, to a second moderator to measure "
        "agreement (0: none). Disagreements go to the admins.",
    )
    dashboard_session_hours: float = Field(
        12.0, gt=0, le=24 * 7, description="How long a dashboard sign-in lasts."
    )
    review_media_cache_mb: int = Field(
        256,
        ge=1,
        description="Disk cache of the thumbnails and display copies the dashboard renders "
        "(under <data_dir>/review-media).",
    )
    review_thumbnail_px: int = Field(
        320, ge=64, le=1024, description="Longest side of a queue thumbnail."
    )
    review_display_px: int = Field(
        2048, ge=256, le=8192, description="Longest side of the image on a case page."
    )

    # --- metrics and probes of the processes beside the API ---------------------------------
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Port of the HTTP server every worker, ingest, reconciler and callback "
        "sender runs for Prometheus and its supervisor: /metrics, /livez, /readyz (the API "
        "serves /metrics on its own port). 0: no server. `--metrics-port` overrides it.",
    )
    metrics_host: str = Field(
        "0.0.0.0",  # noqa: S104 - Prometheus and the kubelet reach it from outside the pod
        description="Address the metrics server listens on.",
    )

    log_level: str = Field("INFO", description="Root log level.")
    log_json: bool = Field(True, description="One JSON object per log line (False: plain text).")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("secret_key_previous", mode="before")
    @classmethod
    def _parse_previous_keys(cls, value: object) -> object:
        # From the environment: a JSON list like the other list settings, or one key as it
        # is (a value that starts with "[" is taken for a list, and must parse as one). An
        # empty entry never encrypted anything (the secret key cannot be empty): it is left
        # out.
        if isinstance(value, str):
            if not value.strip():
                return []
            if not value.lstrip().startswith("["):
                return [value]
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("not a JSON list of keys (one key is given as it is)") from None
        if isinstance(value, list):
            return [key for key in value if key != ""]
        return value

    @field_validator("ensemble_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, weight in value.items() if not 0 <= weight < math.inf)
        if bad:
            raise ValueError(f"ensemble weights must be finite and >= 0: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        # The embedded SQLite file is for one person's laptop: a fleet that silently wrote
        # verdicts to a local file would lose them with the container.
        if self.environment == "production" and not self.database_url:
            raise ValueError(
                "SYNTHSENTRY_DATABASE_URL must be set when SYNTHSENTRY_ENVIRONMENT=production"
            )
        # A batching worker holds a message while the batch before it runs and while its
        # own runs; Redis must not hand it to another worker meanwhile.
        held = 2 * self.task_time_limit_seconds + self.batch_wait_ms / 1000
        if self.visibility_timeout_seconds <= held:
            raise ValueError(
                f"SYNTHSENTRY_VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must "
                f"exceed twice SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS plus the batch wait ({held:g})"
            )
        if self.environment == "production":
            key = self.secret_key.get_secret_value()
            if not key or _looks_like_placeholder(key):
                raise ValueError(
                    "SYNTHSENTRY_SECRET_KEY must be set to a real secret in production"
                )
            if any(_looks_like_placeholder(k.get_secret_value()) for k in self.secret_key_previous):
                raise ValueError(
                    "SYNTHSENTRY_SECRET_KEY_PREVIOUS holds a placeholder; list only the real "
                    "earlier keys"
                )
            if self.callback_allow_private_addresses:
                raise ValueError(
                    "SYNTHSENTRY_CALLBACK_ALLOW_PRIVATE_ADDRESSES is for local development only"
                )
        secret = self.webhook_secret.get_secret_value()
        if self.environment == "production" and secret and _looks_like_placeholder(secret):
            raise ValueError("SYNTHSENTRY_WEBHOOK_SECRET is a placeholder; set a real secret")
        return self

    @property
    def weights_dir(self) -> Path:
        """Where weights fetched from s3:// are cached (hf:// uses huggingface_hub's cache)."""
        return self.data_dir / "weights"

    @property
    def resolved_object_store_dir(self) -> Path:
        return self.object_store_dir or self.data_dir / "objects"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'synthsentry.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests call ``get_settings.cache_clear()``."""
    return Settings()
