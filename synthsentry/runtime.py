"""The process's runtime: settings read once into typed values, and the one place that
builds what the pipelines need from them (database sessions, the S3 client, detectors,
the ensemble configuration, the fleet's context).

Domain code in ``workers/`` takes these plain values, never the settings object. A CLI
option that changes a setting for one process (``--device``, ``--threshold``) makes a
changed runtime with :meth:`Runtime.replace`; nothing writes the environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from synthsentry.settings import Settings, check_device, get_settings
from workers.budget import MemoryBudget
from workers.detectors.base import Detector, DetectorSpec
from workers.detectors.registry import (
    Catalog,
    Skipped,
    SpecError,
    WeightsResolver,
    build_available,
    build_detector,
    weights_resolver,
)
from workers.engine import BatchObserver, LogBatches
from workers.ensemble import Calibration, EnsembleConfig
from workers.intake import IntakeLimits, RejectReason

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from workers.callbacks import CallbackPolicy
    from workers.fleet import FleetContext
    from workers.objects import ObjectStore


@dataclass(frozen=True)
class Batching:
    """How a detector worker groups messages into model batches."""

    max_batch: int
    max_wait_s: float
    # A batch running longer than this is taken as hung: the worker exits so that its
    # messages are delivered again (a thread cannot be interrupted).
    watchdog_s: float


@dataclass(frozen=True)
class Runtime:
    """What this process runs with, read once from settings."""

    environment: str
    database_url: str
    database_echo: bool
    data_dir: Path
    limits: IntakeLimits
    catalog: Catalog
    device: str
    batch_size: int
    batch_wait_s: float
    intake_threads: int
    intake_memory_bytes: int
    threshold: float
    weights: Mapping[str, float]
    calibrations: Mapping[str, Calibration]
    review_unscored: frozenset[RejectReason]
    fleet_detectors: tuple[str, ...]
    max_detect_attempts: int
    task_time_limit_s: int
    visibility_timeout_s: int
    s3_endpoint_url: str | None
    s3_region: str
    weights_dir: Path
    log_level: str
    allowed_buckets: str  # parsed by workers.events.BucketPolicy where events are taken in
    webhook_secret: SecretStr = field(repr=False)
    webhook_max_records: int
    embedded_api: bool = False  # `serve` runs scans in its own process (see api_mode)
    api_max_body_bytes: int = 1024 * 1024
    api_read_timeout_s: int = 30
    api_connection_limit: int = 200
    upload_bucket: str = "uploads"
    upload_prefix: str = "api/"
    object_store_dir: Path = Path(".synthsentry/objects")
    embedded_queue_size: int = 256
    secret_key: SecretStr = field(default=SecretStr(""), repr=False)
    secret_key_previous: tuple[SecretStr, ...] = field(default=(), repr=False)
    callback_timeout_s: float = 15.0
    callback_retry_hours: float = 24.0
    callback_allow_private: bool = False
    rescan_page_size: int = 1000
    rescan_max_in_flight: int = 5000
    # The stored configuration an operator activated (workers.ensembles), read when the
    # process starts, and the detectors it combines; None: the settings' configuration.
    stored_ensemble: EnsembleConfig | None = None
    stored_ensemble_detectors: tuple[str, ...] = ()
    review_lease_minutes: float = 10.0
    review_second_opinion_share: float = 0.0
    dashboard_session_hours: float = 12.0
    review_media_cache_mb: int = 256
    review_thumbnail_px: int = 320
    review_display_px: int = 2048
    # Where batch figures go: the logs; a metrics exporter implements the same protocol.
    batch_observer: BatchObserver = field(default_factory=LogBatches)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        """Raises ``SpecError`` when the operator's detector file is malformed, ValueError
        for a value the settings cannot check alone (an unknown rejection reason)."""
        unknown = sorted(set(settings.review_unscored_reasons) - {r.value for r in RejectReason})
        if unknown:
            raise ValueError(
                f"SYNTHSENTRY_REVIEW_UNSCORED_REASONS names unknown reasons: {', '.join(unknown)};"
                f" known: {', '.join(r.value for r in RejectReason)}"
            )
        return cls(
            environment=settings.environment,
            database_url=settings.resolved_database_url,
            database_echo=settings.database_echo,
            data_dir=settings.data_dir,
            limits=IntakeLimits(
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                decode_timeout_s=settings.decode_timeout_seconds,
            ),
            catalog=Catalog.build(settings.detector_config),
            device=settings.device,
            batch_size=settings.batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
            intake_threads=settings.intake_threads,
            intake_memory_bytes=settings.intake_memory_mb * 1024 * 1024,
            threshold=settings.flag_threshold,
            weights=dict(settings.ensemble_weights),
            calibrations={
                name: Calibration(a=platt.a, b=platt.b)
                for name, platt in settings.ensemble_calibrations.items()
            },
            review_unscored=frozenset(RejectReason(r) for r in settings.review_unscored_reasons),
            fleet_detectors=tuple(settings.fleet_detectors),
            max_detect_attempts=settings.max_detect_attempts,
            task_time_limit_s=settings.task_time_limit_seconds,
            visibility_timeout_s=settings.visibility_timeout_seconds,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            weights_dir=settings.weights_dir,
            log_level=settings.log_level,
            allowed_buckets=settings.allowed_buckets,
            webhook_secret=settings.webhook_secret,
            webhook_max_records=settings.webhook_max_records,
            embedded_api=settings.api_mode == "embedded"
            or (
                settings.api_mode == "auto" and settings.resolved_database_url.startswith("sqlite")
            ),
            api_max_body_bytes=settings.api_max_body_bytes,
            api_read_timeout_s=settings.api_read_timeout_seconds,
            api_connection_limit=settings.api_connection_limit,
            upload_bucket=settings.upload_bucket,
            upload_prefix=settings.upload_prefix,
            object_store_dir=settings.resolved_object_store_dir,
            embedded_queue_size=settings.embedded_queue_size,
            secret_key=settings.secret_key,
            secret_key_previous=tuple(settings.secret_key_previous),
            callback_timeout_s=settings.callback_timeout_seconds,
            callback_retry_hours=settings.callback_retry_hours,
            callback_allow_private=settings.callback_allow_private_addresses,
            rescan_page_size=settings.rescan_page_size,
            rescan_max_in_flight=settings.rescan_max_in_flight,
            review_lease_minutes=settings.review_lease_minutes,
            review_second_opinion_share=settings.review_second_opinion_share,
            dashboard_session_hours=settings.dashboard_session_hours,
            review_media_cache_mb=settings.review_media_cache_mb,
            review_thumbnail_px=settings.review_thumbnail_px,
            review_display_px=settings.review_display_px,
        )

    def replace(self, **changes: Any) -> Runtime:
        """This runtime with some values changed for this process (a CLI option); the
        values are checked as the settings check them."""
        if "device" in changes:
            changes["device"] = check_device(changes["device"])
        if "threshold" in changes and not 0.0 <= changes["threshold"] <= 1.0:
            raise ValueError("the threshold must be between 0 and 1")
        for name in ("batch_size", "intake_threads"):
            if name in changes and changes[name] < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if "batch_wait_s" in changes and changes["batch_wait_s"] < 0:
            raise ValueError("the batch wait must not be negative")
        return dataclasses.replace(self, **changes)

    # --- the ensemble -------------------------------------------------------------------

    def ensemble(self, specs: Iterable[DetectorSpec]) -> EnsembleConfig:
        """The ensemble configuration over these detectors: the configured threshold,
        weights, calibrations and rejection reasons for review, and the decisive rules of
        their specs."""
        return EnsembleConfig.for_detectors(
            specs,
            threshold=self.threshold,
            weights=self.weights,
            calibrations=self.calibrations,
            review_unscored=(r.value for r in self.review_unscored),
        )

    def with_active_ensemble(self, session_factory: sessionmaker[Session]) -> Runtime:
        """This runtime deciding with the configuration an operator activated, when there
        is one (``workers.ensembles``); ``fleet_ensemble`` then refuses a fleet whose
        detectors differ from the ones it combines."""
        from workers import ensembles

        stored = ensembles.active(session_factory)
        if stored is None or stored.config is None:
            return self
        return self.replace(
            stored_ensemble=stored.config, stored_ensemble_detectors=stored.detectors
        )

    @property
    def fleet_ensemble(self) -> EnsembleConfig:
        """The configuration the fleet decides with: the activated stored one, or the one
        the settings describe over its detectors' specs."""
        unknown = [name for name in self.fleet_detectors if name not in self.catalog.specs]
        if unknown:
            raise SpecError(
                f"SYNTHSENTRY_FLEET_DETECTORS names unknown detectors: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.catalog.specs))}"
            )
        if self.stored_ensemble is not None:
            if set(self.stored_ensemble_detectors) != set(self.fleet_detectors):
                raise SpecError(
                    f"the active ensemble configuration {self.stored_ensemble.version} "
                    f"combines {', '.join(sorted(self.stored_ensemble_detectors))}; this "
                    f"fleet runs {', '.join(sorted(self.fleet_detectors))} "
                    "(SYNTHSENTRY_FLEET_DETECTORS): activate a configuration for these "
                    "detectors, or run the ones it combines"
                )
            specs = [self.catalog.specs[name] for name in self.fleet_detectors]
            decisive = {spec.name for spec in specs if spec.decisive}
            if set(self.stored_ensemble.decisive) != decisive:
                raise SpecError(
                    f"the active ensemble configuration {self.stored_ensemble.version} "
                    f"treats {', '.join(sorted(self.stored_ensemble.decisive)) or 'no detector'}"
                    f" as decisive; the detector specs say {', '.join(sorted(decisive)) or 'none'}"
                    ": calibrate and activate a configuration for the specs in force"
                )
            return self.stored_ensemble
        return self.ensemble(self.catalog.specs[name] for name in self.fleet_detectors)

    # --- detectors ----------------------------------------------------------------------

    def weights_resolver(self, *, local_only: bool = False) -> WeightsResolver:
        return weights_resolver(
            cache_dir=self.weights_dir,
            s3_endpoint_url=self.s3_endpoint_url,
            s3_region=self.s3_region,
            local_only=local_only,
        )

    def build_detector(self, spec: DetectorSpec) -> Detector:
        """Fetch (if needed) and load one detector; raises ``DetectorUnavailable``."""
        return build_detector(spec, device=self.device, resolve=self.weights_resolver())

    def build_available(self) -> tuple[list[Detector], list[Skipped]]:
        """Every catalog detector whose weights are already on this machine (no download)."""
        return build_available(
            self.catalog.specs.values(),
            device=self.device,
            resolve=self.weights_resolver(local_only=True),
        )

    # --- services -----------------------------------------------------------------------

    def session_factory(self, *, pool_size: int = 5) -> sessionmaker[Session]:
        from db.session import make_engine, make_sessionmaker

        engine = make_engine(self.database_url, echo=self.database_echo, pool_size=pool_size)
        return make_sessionmaker(engine)

    def s3_client(self, *, max_connections: int = 10) -> ObjectStore:
        import boto3
        from botocore.config import Config

        client: ObjectStore = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.s3_region,
            config=Config(max_pool_connections=max(10, max_connections)),
        )
        return client

    def fleet_context(self, *, threads: int = 1) -> FleetContext:
        """``threads``: tasks this process runs at once (sizes the database and S3 pools)."""
        from workers.fleet import FleetContext

        client = self.s3_client(max_connections=threads)
        return FleetContext(
            session_factory=self.session_factory(pool_size=max(5, threads)),
            s3=lambda: client,
            limits=self.limits,
            memory=MemoryBudget(self.intake_memory_bytes),
            ensemble=self.fleet_ensemble,
            detectors=list(self.fleet_detectors),
            max_attempts=self.max_detect_attempts,
        )

    def callback_policy(self) -> CallbackPolicy:
        """How callbacks are signed and sent. Without a configured secret key (development
        only: production refuses to start without one) the key is kept in
        ``<data_dir>/secret.key``, made on first use, readable by this user only; the API,
        the callback sender and ``tokens create`` must then share the data folder. The
        previous secret keys still decrypt what they encrypted (see ``callbacks
        rotate-key``)."""
        from workers.callbacks import CallbackPolicy, SecretBox, load_or_create_key

        key = self.secret_key.get_secret_value()
        if not key:
            key = load_or_create_key(self.data_dir / "secret.key")
        return CallbackPolicy(
            box=SecretBox(key, [k.get_secret_value() for k in self.secret_key_previous]),
            allow_private=self.callback_allow_private,
            timeout_s=self.callback_timeout_s,
            retry_hours=self.callback_retry_hours,
        )

    def batching(self) -> Batching:
        return Batching(
            max_batch=self.batch_size,
            max_wait_s=self.batch_wait_s,
            watchdog_s=float(self.task_time_limit_s),
        )


def build_runtime(settings: Settings | None = None) -> Runtime:
    return Runtime.from_settings(settings or get_settings())
