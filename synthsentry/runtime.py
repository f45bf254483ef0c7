"""The process's runtime, built from settings in one place."""

from __future__ import annotations

from synthsentry.settings import Settings
from workers.detectors.registry import WeightsResolver, weights_resolver


def resolver(settings: Settings, *, local_only: bool = False) -> WeightsResolver:
    return weights_resolver(
        cache_dir=settings.weights_dir,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
        local_only=local_only,
    )
