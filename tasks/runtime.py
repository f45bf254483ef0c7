"""What a fleet process needs, built from settings: kept apart from the task definitions so
that importing ``tasks`` (to send a task) loads neither models nor database drivers."""

from __future__ import annotations

from typing import Any

from synthsentry.settings import get_settings
from workers.detectors.base import Detector


def build_context(threads: int = 1) -> Any:
    """``threads``: tasks this process runs at once (sizes the database and S3 pools)."""
    import boto3
    from botocore.config import Config

    from db.session import make_engine, make_sessionmaker
    from workers.detectors.registry import Catalog
    from workers.ensemble import EnsembleConfig
    from workers.fleet import FleetContext
    from workers.intake import IntakeLimits

    settings = get_settings()
    catalog = Catalog.build(settings.detector_config)
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(max_pool_connections=max(10, threads)),
    )
    engine = make_engine(settings.resolved_database_url, pool_size=max(5, threads))
    return FleetContext(
        session_factory=make_sessionmaker(engine),
        s3=lambda: client,
        limits=IntakeLimits.from_settings(settings),
        ensemble=EnsembleConfig(
            threshold=settings.flag_threshold, weights=settings.ensemble_weights
        ),
        detectors=list(settings.fleet_detectors),
        decisive={
            name: bool(catalog.specs[name].options.get("decisive", False))
            for name in settings.fleet_detectors
            if name in catalog.specs
        },
        max_attempts=settings.max_detect_attempts,
    )


def load_detector(name: str) -> Detector:
    from synthsentry.runtime import resolver
    from workers.detectors.registry import Catalog, build_detector

    settings = get_settings()
    spec = Catalog.build(settings.detector_config).resolve(name)
    return build_detector(spec, device=settings.device, resolve=resolver(settings))
