"""The dashboard's static files: the vendored htmx is the file VENDORED.md names, our own
script and stylesheet stay within a strict CSP, and in a real Chromium the shortcuts, the
help overlay, the blur toggle and confirmations behave as the page templates expect."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Dialog, Page, expect

# browser, page and artifacts (the folder for screenshots).
pytest_plugins = ["browser"]

STATIC = Path(__file__).resolve().parent.parent / "api" / "dashboard" / "static"
HTMX = STATIC / "htmx.min.js"
VENDORED = STATIC / "VENDORED.md"

# What the dashboard's responses send; a meta tag carries it here (frame-ancestors and
# report-uri only work as a header, and this page needs neither).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'"
)
HTMX_CONFIG = (
    '{"includeIndicatorStyles":false,"allowEval":false,'
    '"allowScriptTags":false,"selfRequestsOnly":true}'
)

# Records every CSP violation the page reports. Playwright injects init scripts through the
# DevTools protocol, outside the page's CSP.
VIOLATION_RECORDER = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""

# Patterns that would need 'unsafe-eval' or 'unsafe-inline', or that write styles from script
# (the CSP allows CSSOM writes, but the look belongs in dashboard.css, in one place).
FORBIDDEN_IN_SCRIPT = {
    "eval(": "eval",
    "new Function": "Function constructor",
    "Function(": "Function constructor",
    'setTimeout("': "string timer",
    'setInterval("': "string timer",
    "innerHTML": "HTML parsing from strings",
    "outerHTML": "HTML parsing from strings",
    "insertAdjacentHTML": "HTML parsing from strings",
    "document.write": "HTML parsing from strings",
    ".style.": "inline style from script",
    ".style =": "inline style from script",
    "cssText": "inline style from script",
    'setAttribute("style"': "inline style attribute",
    "setAttribute('style'": "inline style attribute",
    "javascript:": "script URL",
}
FORBIDDEN_IN_STYLESHEET = {
    "eval(": "eval",
    "new Function": "Function constructor",
    "expression(": "CSS expression",
    "@import": "a second stylesheet request",
    "url(http": "another origin",
    "url(//": "another origin",
}


def vendored_field(pattern: str) -> str:
    match = re.search(pattern, VENDORED.read_text(encoding="utf-8"))
    assert match is not None, f"VENDORED.md has no line matching {pattern!r}"
    return match.group(1)


def test_vendored_htmx_is_the_file_vendored_md_names() -> None:
    expected = vendored_field(r"sha256 of htmx\.min\.js: `([0-9a-f]{64})`")
    assert hashlib.sha256(HTMX.read_bytes()).hexdigest() == expected


def test_vendored_htmx_version_and_config_keys() -> None:
    version = vendored_field(r"`htmx\.org` version (2\.0\.\d+)")
    source = HTMX.read_text(encoding="utf-8")
    assert f'version:"{version}"' in source
    # Renamed or dropped keys would silently stop protecting the page after an upgrade.
    for key in ("includeIndicatorStyles", "allowEval", "allowScriptTags", "selfRequestsOnly"):
        assert f"{key}:" in source, key
    assert 'meta[name="htmx-config"]' in source
    assert (STATIC / "htmx.LICENSE.txt").read_text(encoding="utf-8").startswith("Zero-Clause BSD")


@pytest.mark.parametrize(
    ("name", "forbidden"),
    [("dashboard.js", FORBIDDEN_IN_SCRIPT), ("dashboard.css", FORBIDDEN_IN_STYLESHEET)],
)
def test_own_assets_need_no_unsafe_csp(name: str, forbidden: dict[str, str]) -> None:
    text = (STATIC / name).read_text(encoding="utf-8")
    found = {pattern: why for pattern, why in forbidden.items() if pattern in text}
    assert found == {}


# A page shaped like the dashboard's, served from a local HTTP server -------------------

PAGE_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="htmx-config" content='{htmx_config}'>
<title>Case 7</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/htmx.min.js" defer></script>
<script src="/static/dashboard.js" defer></script>
</head>
<body data-blur="{blur}">
<header class="topbar">
  <span class="brand">synthsentry</span>
  <nav><a href="/queue.html" aria-current="page">Queue</a><a href="/admin.html">Admin</a></nav>
  <span class="user">mod@example.org</span>
  <button type="button" data-help-toggle>Shortcuts <kbd>?</kbd></button>
  <button type="button" data-blur-toggle data-key="b">Reveal</button>
</header>
<main>
  <p class="flash ok">Claimed for 10 minutes.</p>
  <p class="notice">A detector score is an indication, not proof.</p>
  <div hidden><a href="#hidden-ai" data-key="a">hidden</a></div>
  <form class="filters" action="/case.html" method="get">
    <label>Search <input name="q" id="search"></label>
    <button type="button" data-key="h" hx-get="/fragment.html" hx-target="#fragment">
      Load <span class="htmx-indicator">…</span>
    </button>
  </form>
  <div id="fragment"></div>
  <div class="case">
    <div class="case-media"><img class="media blurrable" src="/image.png" alt="case 7"></div>
    <aside class="evidence">
      <dl><dt>State</dt><dd><span class="badge state-claimed">claimed</span></dd></dl>
    </aside>
  </div>
  <div class="decision-bar">
    <button type="button" class="decide-ai" data-key="a" disabled>AI (disabled)</button>
    <a class="button decide-ai" href="#decided-ai" data-key="a">AI <kbd>a</kbd></a>
    <a class="button decide-human" href="#decided-human" data-key="u">Human <kbd>u</kbd></a>
    <a class="button decide-unsure" href="#decided-unsure" data-key="n">Unsure <kbd>n</kbd></a>
  </div>
  <form action="/case.html" method="get" data-confirm="Revoke this token?">
    <input type="hidden" name="revoked" value="1">
    <button class="danger" data-key="r">Revoke <kbd>r</kbd></button>
  </form>
</main>
<dialog id="shortcuts">
  <h2>Keyboard shortcuts</h2>
  <table><tr><td><kbd>a</kbd></td><td>AI-generated</td></tr></table>
  <form method="dialog"><button>Close</button></form>
</dialog>
<dialog id="other"><p>Another dialog</p></dialog>
</body>
</html>
"""


@dataclass
class ServedSite:
    root: Path
    base_url: str

    def write_page(self, name: str, *, blur: str = "on", htmx_config: str = HTMX_CONFIG) -> str:
        html = PAGE_TEMPLATE.format(csp=CSP, htmx_config=htmx_config, blur=blur)
        (self.root / name).write_text(html, encoding="utf-8")
        return f"{self.base_url}/{name}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[ServedSite]:
    """The real static files under /static/, a test image and an htmx fragment."""
    shutil.copytree(STATIC, tmp_path / "static")
    Image.new("RGB", (320, 240), (200, 40, 40)).save(tmp_path / "image.png")
    (tmp_path / "fragment.html").write_text(
        '<p id="loaded" class="flash ok">Lease renewed.</p>', encoding="utf-8"
    )
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ServedSite(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class PageProblems:
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.add_init_script(VIOLATION_RECORDER)
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type in {"error", "warning"}:
            self.console.append(message.text)


def open_page(page: Page, url: str) -> PageProblems:
    problems = PageProblems()
    problems.watch(page)
    # goto waits for the load event, which comes after every deferred script has run.
    page.goto(url)
    assert page.evaluate("() => typeof htmx") == "object"
    return problems


def hash_of(page: Page) -> str:
    return str(page.evaluate("() => location.hash"))


def help_open(page: Page) -> bool:
    return bool(page.evaluate("() => document.getElementById('shortcuts').open"))


def test_shortcuts_help_blur_and_htmx_under_strict_csp(
    site: ServedSite, page: Page, artifacts: Path
) -> None:
    problems = open_page(page, site.write_page("case.html"))
    assert page.evaluate("() => htmx.config.allowEval") is False
    assert page.evaluate("() => htmx.config.includeIndicatorStyles") is False

    # "?" opens and closes the help; Escape closes it too.
    page.keyboard.press("?")
    assert help_open(page)
    page.screenshot(path=str(artifacts / "static-assets-help.png"))
    page.keyboard.press("?")
    assert not help_open(page)
    page.keyboard.press("?")
    page.keyboard.press("Escape")
    expect(page.locator("#shortcuts")).not_to_have_attribute("open", "")
    page.click("[data-help-toggle]")
    assert help_open(page)
    page.keyboard.press("Escape")

    # Typing in a field types; it does not decide.
    page.click("#search")
    page.keyboard.type("a?u")
    assert page.input_value("#search") == "a?u"
    assert hash_of(page) == ""
    assert not help_open(page)

    # Out of the field, "a" clicks the first visible, enabled data-key="a": not the hidden
    # link, not the disabled button.
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("a")
    assert hash_of(page) == "#decided-ai"
    page.keyboard.press("u")
    assert hash_of(page) == "#decided-human"
    page.keyboard.press("U")
    assert hash_of(page) == "#decided-human"
    page.keyboard.press("Control+n")
    assert hash_of(page) == "#decided-human"

    # A shortcut pressed with the help open acts on the page and closes the help.
    page.keyboard.press("?")
    page.keyboard.press("n")
    assert hash_of(page) == "#decided-unsure"
    assert not help_open(page)

    # Another dialog owns the keyboard while it is open.
    page.evaluate("() => document.getElementById('other').showModal()")
    page.keyboard.press("a")
    page.keyboard.press("?")
    assert hash_of(page) == "#decided-unsure"
    assert not help_open(page)
    page.evaluate("() => document.getElementById('other').close()")

    # The blur toggle, by click and by its key.
    image = page.locator("img.media")
    body = page.locator("body")
    toggle = page.locator("[data-blur-toggle]")
    expect(body).not_to_have_class(re.compile(r"\brevealed\b"))
    expect(toggle).to_have_attribute("aria-pressed", "false")
    expect(image).to_have_css("filter", "blur(18px)")
    page.screenshot(path=str(artifacts / "static-assets-blurred.png"))
    toggle.click()
    expect(body).to_have_class(re.compile(r"\brevealed\b"))
    expect(toggle).to_have_attribute("aria-pressed", "true")
    expect(image).to_have_css("filter", "none")
    page.screenshot(path=str(artifacts / "static-assets-revealed.png"))
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("b")
    expect(body).not_to_have_class(re.compile(r"\brevealed\b"))
    expect(image).to_have_css("filter", "blur(18px)")

    # An htmx request started by a shortcut swaps its fragment in without inline styles.
    page.keyboard.press("h")
    expect(page.locator("#loaded")).to_have_text("Lease renewed.")

    assert page.evaluate("() => window.cspViolations") == []
    assert problems.errors == []
    assert [text for text in problems.console if "Content Security Policy" in text] == []


def test_page_that_starts_unblurred(site: ServedSite, page: Page) -> None:
    open_page(page, site.write_page("unblurred.html", blur="off"))
    expect(page.locator("body")).to_have_class(re.compile(r"\brevealed\b"))
    expect(page.locator("[data-blur-toggle]")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("img.media")).to_have_css("filter", "none")
    page.click("[data-blur-toggle]")
    expect(page.locator("img.media")).to_have_css("filter", "blur(18px)")


def test_confirmation_guards_a_form(site: ServedSite, page: Page) -> None:
    url = site.write_page("case.html")
    open_page(page, url)
    questions: list[str] = []

    def answer(accept: bool) -> None:
        def handle(dialog: Dialog) -> None:
            questions.append(dialog.message)
            if accept:
                dialog.accept()
            else:
                dialog.dismiss()

        page.once("dialog", handle)

    answer(False)
    page.keyboard.press("r")
    assert questions == ["Revoke this token?"]
    assert page.url == url

    answer(True)
    with page.expect_navigation():
        page.keyboard.press("r")
    assert questions == ["Revoke this token?", "Revoke this token?"]
    assert page.url.endswith("/case.html?revoked=1")


def test_violation_recorder_sees_what_the_csp_blocks(site: ServedSite, page: Page) -> None:
    """Without the page's htmx-config, htmx injects its indicator <style>, which the CSP
    blocks: the recorder the other tests rely on must see that."""
    problems = open_page(page, site.write_page("default-config.html", htmx_config="{}"))
    page.wait_for_function("() => window.cspViolations.length > 0")
    assert any(v.startswith("style-src") for v in page.evaluate("() => window.cspViolations"))
    assert any("Content Security Policy" in text for text in problems.console)
