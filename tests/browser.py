"""A real Chromium for the dashboard's browser tests, driven by Playwright's sync API.

A test module that wants the ``browser``, ``page`` and ``artifacts`` fixtures says
``pytest_plugins = ["browser"]`` (importing the fixture functions instead would have the test
functions' arguments shadow them, and importing this module before pytest loads it as a plugin
costs it assertion rewriting). The browser comes from, in order: ``SYNTHSENTRY_CHROMIUM``
(a path to a Chromium or Chrome binary), Debian's ``/usr/bin/chromium``, or the Chromium that
``playwright install chromium`` downloaded. With none of them the fixtures fail, never skip:
a page that no browser has loaded is a page nobody has checked.

Screenshots and other artifacts go to ``test-artifacts/`` at the repository root, or to
``SYNTHSENTRY_TEST_ARTIFACTS`` when set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, Page, sync_playwright

CHROMIUM_ENV = "SYNTHSENTRY_CHROMIUM"
ARTIFACTS_ENV = "SYNTHSENTRY_TEST_ARTIFACTS"
DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# Long enough for a cold page on a busy machine, short enough that a missing element fails
# the test in seconds rather than Playwright's default half minute.
DEFAULT_TIMEOUT_MS = 10_000

INSTALL_HINT = (
    "install Debian's Chromium (`apt-get install chromium`, which `make browser` does when "
    "run as root) or Playwright's (`.venv/bin/playwright install chromium`), or set "
    f"{CHROMIUM_ENV} to a Chromium binary"
)


def _playwright_chromium() -> str | None:
    """The Chromium that ``playwright install chromium`` put in its cache, if it is there."""
    try:
        with sync_playwright() as playwright:
            path = playwright.chromium.executable_path
    except Error:
        return None
    return path if Path(path).is_file() else None


def chromium_executable() -> str | None:
    """The Chromium binary the browser tests run, or None when there is none.

    A path named in ``SYNTHSENTRY_CHROMIUM`` is returned as given, even if nothing is there:
    silently falling back to another browser would hide a misconfiguration.
    """
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit
    if DEBIAN_CHROMIUM.is_file() and os.access(DEBIAN_CHROMIUM, os.X_OK):
        return str(DEBIAN_CHROMIUM)
    return _playwright_chromium()


def launch_args() -> list[str]:
    """Chromium's sandbox refuses to start as root, which is how containers usually run."""
    args = ["--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


def artifacts_dir() -> Path:
    """The folder for screenshots from browser tests, created if missing."""
    configured = os.environ.get(ARTIFACTS_ENV)
    folder = Path(configured) if configured else REPOSITORY_ROOT / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def artifacts() -> Path:
    """``artifacts_dir()`` as a fixture, for modules that load this one as a plugin."""
    return artifacts_dir()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module. Not per session: while Playwright's sync API
    is started it keeps an asyncio loop running in this thread, and a later module's own
    event loop (``anyio.run``, ``asyncio.run``) would be refused."""
    executable = chromium_executable()
    if executable is None:
        pytest.fail(f"No Chromium for the browser tests: {INSTALL_HINT}.", pytrace=False)
    if not Path(executable).is_file():
        pytest.fail(f"{CHROMIUM_ENV}={executable} names no file: {INSTALL_HINT}.", pytrace=False)
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=executable, headless=True, args=launch_args()
            )
        except Error as exc:
            pytest.fail(
                f"Chromium at {executable} did not start ({exc}): {INSTALL_HINT}.",
                pytrace=False,
            )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context: no cookies or storage carried over between tests."""
    context = browser.new_context()
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()
