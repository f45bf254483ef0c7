"""What every command shares: exit statuses, the error a command raises, the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from synthsentry.settings import Settings

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.runtime import Runtime
    from workers.detectors.base import DetectorSpec
    from workers.ensemble import EnsembleConfig

    # What a command group's register() adds its parsers to.
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A usage or system error: printed as one line, exit status 2 (usage) or 1."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def load_runtime(settings: Settings, *, fleet: bool = False) -> Runtime:
    """The runtime for this command; a malformed detector file, a value the settings cannot
    check alone, or with ``fleet`` a fleet ensemble naming an unknown detector, is a usage
    error."""
    from synthsentry.runtime import Runtime
    from workers.detectors.registry import SpecError

    try:
        runtime = Runtime.from_settings(settings)
        if fleet:
            _ = runtime.fleet_ensemble
    except (SpecError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    return runtime


def with_active_ensemble(runtime: Runtime, session_factory: sessionmaker[Session]) -> Runtime:
    """``runtime`` deciding with the configuration an operator activated, when there is one
    (``workers.ensembles``); a fleet whose detectors differ from the ones it combines is a
    usage error, never a silent fallback to the settings' configuration."""
    from workers.detectors.registry import SpecError
    from workers.ensembles import EnsembleRefused

    try:
        activated = runtime.with_active_ensemble(session_factory)
        _ = activated.fleet_ensemble
    except EnsembleRefused as exc:
        raise CliError(exc.detail, EXIT_USAGE) from exc
    except (SpecError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    return activated


def deciding_ensemble(
    runtime: Runtime, session_factory: sessionmaker[Session], specs: Sequence[DetectorSpec]
) -> tuple[EnsembleConfig, str | None]:
    """The configuration these detectors decide with: the one an operator activated when
    it combines exactly them, else the settings' one; and, in that second case while one is
    active, the sentence saying why it is not used."""
    from workers import ensembles

    settings_config = runtime.ensemble(specs)
    try:
        stored = ensembles.active(session_factory)
    except ensembles.EnsembleRefused as exc:
        raise CliError(exc.detail, EXIT_USAGE) from exc
    if stored is None:
        return settings_config, None
    names = sorted(spec.name for spec in specs)
    if stored.config is not None and set(stored.detectors) == set(names):
        return stored.config, None
    return settings_config, (
        f"the active ensemble configuration {stored.version} combines "
        f"{', '.join(sorted(stored.detectors))}; these detectors are {', '.join(names)}: the "
        "settings' configuration is used"
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    from workers.names import is_clean, printable

    if not is_clean(uri):  # an argument in another encoding: S3 keys are UTF-8 text
        raise CliError(
            f"'{printable(uri)}' is not valid UTF-8 (S3 object keys are UTF-8 text)", EXIT_USAGE
        )
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise CliError(f"expected s3://BUCKET/KEY, got {uri!r}", EXIT_USAGE)
    return bucket, key
