"""The runtime: settings read once into typed values, and options changed per process
without touching the environment."""

from __future__ import annotations

import os

import pytest

from synthsentry.runtime import Runtime
from synthsentry.settings import Settings
from workers.detectors.registry import SpecError
from workers.ensemble import Calibration
from workers.intake import IntakeLimits


def test_limits_and_batching_come_from_settings() -> None:
    defaults = Runtime.from_settings(Settings.model_construct())
    assert defaults.limits == IntakeLimits(50 * 1024 * 1024, 100_000_000, 20.0)
    custom = Runtime.from_settings(
        Settings(max_image_bytes=10, max_image_pixels=20, decode_timeout_seconds=0.5)
    )
    assert custom.limits == IntakeLimits(10, 20, 0.5)
    batching = Runtime.from_settings(Settings(batch_size=8, batch_wait_ms=20)).batching()
    assert (batching.max_batch, batching.max_wait_s) == (8, 0.02)


def test_the_fleet_ensemble_is_built_from_the_settings_and_the_specs() -> None:
    runtime = Runtime.from_settings(
        Settings(
            fleet_detectors=["provenance", "sumsub-mj5"],
            flag_threshold=0.7,
            ensemble_weights={"sumsub-mj5": 2.0},
            ensemble_calibrations={"sumsub-mj5": {"a": 1.5, "b": -0.5}},
        )
    )
    ensemble = runtime.fleet_ensemble
    assert ensemble.threshold == 0.7 and dict(ensemble.weights) == {"sumsub-mj5": 2.0}
    assert dict(ensemble.calibrations) == {"sumsub-mj5": Calibration(a=1.5, b=-0.5)}
    assert ensemble.decisive == frozenset({"provenance"})  # from the provenance spec


def test_an_unknown_fleet_detector_is_named() -> None:
    runtime = Runtime.from_settings(Settings(fleet_detectors=["provenance", "nope"]))
    with pytest.raises(SpecError, match="unknown detectors: nope"):
        _ = runtime.fleet_ensemble


def test_per_process_options_are_checked_and_leave_the_environment_alone() -> None:
    runtime = Runtime.from_settings(Settings.model_construct())
    before = dict(os.environ)
    assert runtime.replace(device="cuda:1").device == "cuda:1"
    assert runtime.device == "cpu"  # the original is unchanged
    for bad in ({"device": "tpu"}, {"threshold": 1.5}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            runtime.replace(**bad)
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ensemble_weights", {"a": -1}, "weights must be finite and >= 0"),
        ("ensemble_weights", {"a": "Infinity"}, "weights must be finite and >= 0"),
        ("ensemble_calibrations", {"a": {"a": "NaN"}}, "finite number"),
        ("ensemble_calibrations", {"a": {"a": 1, "c": 2}}, "Extra inputs"),
        ("device", "cuda:x", "device must be"),
    ],
)
def test_bad_ensemble_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**{field: value})
