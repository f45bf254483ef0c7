"""The review dashboard end to end, as moderators and an admin use it: a real Chromium on
the real application (uvicorn on a loopback port, the embedded worker, real Postgres), with
pictures that went through the platform API's and the S3 webhook's real pipeline.

One walk through the pages: signing in, the queue with its counts, blurred thumbnails and
filters, "next" by keyboard, the case page and its evidence, a second moderator who sees
the case as held and cannot decide it, a keyboard decision and the audit trail, a lease
that runs out under a moderator (time moves by calling ``expire_leases`` with a later
``now`` and by the page's fake clock, never by sleeping), an escalation that an admin
decides, and not one CSP violation or script error on the way. Its screenshots
(queue.png, case.png, admin.png in the artifacts folder) are where the README's pictures
in docs/images come from."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw, ImageFilter
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
)
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import TokenRole, utcnow
from db.repository import QueueFilter
from db.session import transaction
from synthsentry.cli.serve import BuiltApi
from workers import review, tokens

from apitest import BUCKET, build_test_api
from conftest import DatabaseFactory, emptied_sessions
from provenance_fixtures import png_with_chunks, text_chunk, xmp_packet

# browser, page and artifacts (the folder for screenshots).
pytest_plugins = ["browser"]

VIEWPORT = ViewportSize(width=1280, height=800)
DEADLINE_S = 30.0
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"

# Reports every CSP violation to the test through an exposed function; Playwright injects
# init scripts through the DevTools protocol, outside the page's CSP.
VIOLATION_REPORTER = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.reportViolation(`${event.violatedDirective} ${event.blockedURI}`);
});
"""
BLURRED = re.compile(r"blur\(")


# --- pictures --------------------------------------------------------------------------

SIDE = 512
# sky at the top, sky at the horizon, the sun, the farthest ridge, the nearest ridge
PALETTES = (
    ((16, 78, 139), (160, 215, 235), (255, 250, 220), (74, 128, 140), (24, 64, 58)),
    ((10, 12, 40), (70, 54, 120), (236, 236, 255), (52, 44, 92), (14, 14, 34)),
    ((250, 208, 140), (252, 120, 92), (255, 244, 214), (170, 70, 84), (72, 28, 48)),
    ((40, 110, 100), (220, 236, 200), (255, 255, 235), (96, 150, 120), (30, 76, 60)),
    ((90, 40, 110), (255, 150, 170), (255, 230, 200), (140, 70, 120), (50, 20, 60)),
    ((28, 39, 86), (246, 164, 110), (255, 226, 160), (120, 84, 126), (38, 30, 60)),
)

Colour = tuple[int, int, int]


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def landscape(seed: int) -> Image.Image:
    """A 512 px picture of a sun over ridges, different for every seed: real pixels for the
    thumbnails and the full view, and something a person does not mind looking at."""
    rng = random.Random(seed)
    top, horizon, sun, far, near = PALETTES[seed % len(PALETTES)]
    t = np.linspace(0.0, 1.0, SIDE)[:, None, None] ** 1.4
    sky = np.array(top)[None, None, :] * (1 - t) + np.array(horizon)[None, None, :] * t
    picture = Image.fromarray(np.repeat(sky, SIDE, axis=1).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(picture)
    if sum(top) < 120:  # a night sky has stars
        for _ in range(140):
            value = rng.randrange(150, 256)
            draw.point((rng.randrange(SIDE), rng.randrange(SIDE * 55 // 100)), fill=(value,) * 3)
    x, y, r = rng.randrange(120, 392), rng.randrange(130, 240), rng.randrange(34, 60)
    glow = Image.new("L", picture.size, 0)
    ImageDraw.Draw(glow).ellipse((x - 3 * r, y - 3 * r, x + 3 * r, y + 3 * r), fill=110)
    glow = glow.filter(ImageFilter.GaussianBlur(r))
    picture = Image.composite(Image.new("RGB", picture.size, sun), picture, glow)
    draw = ImageDraw.Draw(picture)
    draw.ellipse((x - r, y - r, x + r, y + r), fill=sun)
    layers = 4
    for layer in range(layers):
        base = SIDE * (0.56 + 0.1 * layer)
        rough = 70 - 12 * layer
        ridge: list[tuple[float, float]] = [(0, SIDE)]
        height = base + rng.uniform(-rough, rough) / 2
        for across in range(0, SIDE + 16, 16):
            height = min(max(height + rng.uniform(-rough, rough) / 3, base - rough), base + rough)
            ridge.append((across, height))
        ridge.append((SIDE, SIDE))
        draw.polygon(ridge, fill=_mix(far, near, layer / (layers - 1)))
    return picture.filter(ImageFilter.SMOOTH)


def generated_png(seed: int, prompt: str) -> bytes:
    """A PNG carrying AUTOMATIC1111's generation settings: the provenance detector flags it
    (generator metadata)."""
    settings = (
        f"{prompt}\nNegative prompt: blurry, text\nSteps: 28, Sampler: DPM++ 2M Karras, "
        f"CFG scale: 6.5, Seed: {1000 + seed}, Size: 512x512, Model: sdxl_base_1.0"
    )
    return png_with_chunks([text_chunk("parameters", settings)], landscape(seed))


def declared_jpeg(seed: int) -> bytes:
    """A JPEG whose XMP declares the IPTC digital source type trainedAlgorithmicMedia."""
    inner = (
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{TRAINED}"/>'
    )
    out = io.BytesIO()
    landscape(seed).save(out, "JPEG", quality=90, xmp=xmp_packet(inner))
    return out.getvalue()


# --- the server ------------------------------------------------------------------------


@dataclass
class Live:
    """The application served on a loopback port, and what the test reaches around it."""

    base_url: str
    built: BuiltApi
    sessions: sessionmaker[Session]

    def url(self, path: str) -> str:
        return self.base_url + path

    def token(self, role: TokenRole, name: str) -> str:
        with transaction(self.sessions) as session:
            return tokens.issue_token(session, role=role, name=name, actor="test").token


def _wait_until(what: str, ready: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {deadline_s:.0f} s", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser_database(committing_database: DatabaseFactory) -> str:
    return committing_database("dashboard_browser")


@pytest.fixture
def sessions(browser_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(browser_database)


@pytest.fixture
def live(sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Live]:
    """The app with its embedded worker, under uvicorn in a thread, as ``serve`` runs it
    (secure cookies: the environment is not development)."""
    built = build_test_api(sessions, tmp_path)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(built.context), log_config=None, http="h11", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    built.start()
    thread.start()
    base_url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait_until("the server answers /healthz", lambda: server.started and answers())
        yield Live(base_url, built, sessions)
    finally:
        server.should_exit = True
        thread.join(15)
        listener.close()
        built.stop()


@dataclass(frozen=True)
class Scanned:
    """The flagged pictures by sha256: generated PNGs a platform posted, generated JPEGs an
    S3 event announced."""

    posted: frozenset[str]
    announced: frozenset[str]

    @property
    def cases(self) -> int:
        return len(self.posted | self.announced)


def _scan_pictures(live: Live) -> Scanned:
    """Flagged pictures through the real pipeline: PNGs posted to ``POST /v1/scans`` by a
    platform, JPEGs put in the bucket and announced by an S3 event; back once every one has
    its review case."""
    platform = {"Authorization": f"Bearer {live.token(TokenRole.PLATFORM, 'photo-app')}"}
    prompts = ("a quiet lake at dawn", "mountains under a full moon", "a desert sunset")
    generated = [
        (f"render-{seed}.png", generated_png(seed, prompt), "image/png")
        for seed, prompt in enumerate(prompts, start=1)
    ]
    uploads = generated
    events = {f"incoming/photo-{seed}.jpg": declared_jpeg(seed) for seed in (4, 5)}
    scan_ids: list[str] = []
    with httpx.Client(base_url=live.base_url, timeout=DEADLINE_S) as client:
        for number, (name, data, kind) in enumerate(uploads):
            reply = client.post(
                "/v1/scans",
                files={"file": (name, data, kind)},
                data={"external_id": f"post-{number}"},
                headers=platform,
            )
            assert reply.status_code == 202, reply.text
            scan_ids.extend(scan["id"] for scan in reply.json()["scans"])
        for key, data in events.items():
            live.built.context.store.put_object(Bucket=BUCKET, Key=key, Body=data)
            record = {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": BUCKET}, "object": {"key": key, "size": len(data)}},
            }
            reply = client.post(
                "/s3-events",
                content=json.dumps({"Records": [record]}),
                headers={
                    "Authorization": f"Bearer {live.built.context.webhook_secret}",
                    "Content-Type": "application/json",
                },
            )
            assert reply.status_code < 300, reply.text
        for scan_id in scan_ids:
            document = client.get(
                f"/v1/scans/{scan_id}", params={"wait": DEADLINE_S}, headers=platform
            ).json()
            assert document["finished"] and document["flagged"], document
    scanned = Scanned(
        posted=frozenset(hashlib.sha256(data).hexdigest() for _, data, _ in generated),
        announced=frozenset(hashlib.sha256(data).hexdigest() for data in events.values()),
    )
    _wait_until(
        f"{scanned.cases} review cases",
        lambda: review.queue(live.sessions, QueueFilter()).total == scanned.cases,
    )
    return scanned


# --- what the pages must not do ---------------------------------------------------------


@dataclass
class Problems:
    """Every CSP violation, script error and console error or warning of every page the
    test opens, but for the refusals the test provokes on purpose: (status, path)."""

    expected: list[tuple[int, str]] = field(default_factory=list)
    found: list[str] = field(default_factory=list)

    def watch(self, page: Page, who: str) -> None:
        page.expose_function(
            "reportViolation", lambda text: self.found.append(f"{who}: CSP {text}")
        )
        page.add_init_script(VIOLATION_REPORTER)
        page.on("pageerror", lambda error: self.found.append(f"{who}: page error {error}"))
        page.on("console", lambda message: self._console(who, message))

    def _console(self, who: str, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning"):
            return
        where = message.location.get("url", "")
        for status, path in self.expected:
            if f"status of {status} " in message.text and where.endswith(path):
                return
        self.found.append(f"{who}: console {message.type} {message.text} ({where})")


@dataclass
class Team:
    """The people at their browsers: one context (cookies, storage, clock) each, watched
    for problems, all closed at the end."""

    browser: Browser
    live: Live
    problems: Problems = field(default_factory=Problems)
    contexts: list[BrowserContext] = field(default_factory=list)

    def browser_of(self, who: str, *, fake_clock: bool = False) -> Page:
        """A fresh browser at the sign-in form, sent there from the queue. With
        ``fake_clock`` the page's timers run on a clock the test moves."""
        context = self.browser.new_context(viewport=VIEWPORT)
        self.contexts.append(context)
        context.set_default_timeout(10_000)
        if fake_clock:
            context.clock.install()
        page = context.new_page()
        self.problems.watch(page, who)
        page.goto(self.live.url("/review"))
        expect(page).to_have_url(re.compile(r"/review/login\?next=%2Freview$"))
        return page

    def signed_in(self, who: str, role: TokenRole, *, fake_clock: bool = False) -> Page:
        page = self.browser_of(who, fake_clock=fake_clock)
        sign_in(page, self.live, self.live.token(role, who))
        expect(page.locator("header .user")).to_contain_text(who)
        return page


def sign_in(page: Page, live: Live, token: str) -> None:
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(live.url("/review"))


@pytest.fixture
def team(browser: Browser, live: Live) -> Iterator[Team]:
    people = Team(browser, live)
    yield people
    for context in people.contexts:
        context.close()


def _csrf(page: Page) -> str:
    return page.locator("form.logout input[name=csrf_token]").input_value()


def _computed_filter(page: Page, selector: str) -> str:
    return str(page.locator(selector).first.evaluate("(e) => getComputedStyle(e).filter"))


def _all_loaded(page: Page, selector: str) -> None:
    """Every picture matching ``selector`` decoded with real pixels (lazy ones scrolled to)."""
    for image in page.locator(selector).all():
        image.scroll_into_view_if_needed()
    page.wait_for_function(
        "(s) => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
        arg=selector,
    )
    page.evaluate("() => window.scrollTo(0, 0)")


def _count(page: Page, state: str) -> int:
    return int(page.locator(f"span[data-count={state}]").inner_text())


def _summary_total(page: Page) -> int:
    found = re.match(r"(\d+) cases? match", page.locator("#queue-summary").inner_text())
    assert found is not None
    return int(found.group(1))


def _apply_filter(page: Page, live: Live, **chosen: str) -> set[str]:
    """Choose filters on the queue's form and send it: the sha256 of every case listed."""
    page.goto(live.url("/review"))
    for name, value in chosen.items():
        control = page.locator(f"form.filters [name={name}]")
        if name == "min_score":
            control.fill(value)
        else:
            control.select_option(value)
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    for name, value in chosen.items():
        assert f"{name}={value}" in page.url
    listed = {
        str(code.get_attribute("title"))
        for code in page.locator("table.queue tr[data-case-id] code[title]").all()
    }
    assert _summary_total(page) == len(listed)
    return listed


def _case_id(page: Page) -> int:
    found = re.search(r"/review/cases/(\d+)", page.url)
    assert found is not None, page.url
    return int(found.group(1))


def _history(page: Page) -> list[list[str]]:
    rows = page.locator("table#history tbody tr").all()
    return [[cell.inner_text().strip() for cell in row.locator("td").all()] for row in rows]


# --- the walk ---------------------------------------------------------------------------


def test_moderators_and_an_admin_work_the_queue_in_a_real_browser(
    live: Live, team: Team, artifacts: Path
) -> None:
    scanned = _scan_pictures(live)
    cases = scanned.cases
    policy = live.built.context.review_policy
    problems = team.problems

    # Signing in: a wrong token is refused on the form, the right one opens the queue.
    anna = team.browser_of("anna")
    anna_token = live.token(TokenRole.MODERATOR, "anna")
    problems.expected.append((401, "/review/login"))  # the form again, saying why
    anna.fill("#token", anna_token[:-4] + "abcd")
    anna.click("button[type=submit]")
    expect(anna.locator("#login-error")).to_be_visible()
    sign_in(anna, live, anna_token)
    expect(anna.locator("header .user")).to_contain_text("anna")

    # The queue: counts, every picture as a blurred thumbnail with real pixels.
    assert _count(anna, "open") == cases and _count(anna, "claimed") == 0
    expect(anna.locator("table.queue tr[data-case-id]")).to_have_count(cases)
    expect(anna.locator("body")).to_have_attribute("data-blur", "on")
    _all_loaded(anna, "table.queue img.thumb.blurrable")
    assert BLURRED.search(_computed_filter(anna, "table.queue img.thumb"))
    anna.screenshot(path=str(artifacts / "queue.png"))

    # Filters narrow the list: by provenance kind, by where the bytes came from.
    declared = _apply_filter(anna, live, provenance="iptc")
    assert scanned.announced <= declared and not declared & scanned.posted
    assert _apply_filter(anna, live, source="upload_event") == scanned.announced
    settings = _apply_filter(anna, live, provenance="generator_metadata", source="hook")
    assert scanned.posted <= settings and not settings & scanned.announced
    assert len(_apply_filter(anna, live, detector="provenance", min_score="0.9")) == cases
    assert _apply_filter(anna, live, state="decided") == set()
    expect(anna.locator("p.empty")).to_be_visible()

    # "n" claims the first case; its page says what the scores are and are not.
    anna.goto(live.url("/review"))
    with anna.expect_navigation():
        anna.keyboard.press("n")
    first = _case_id(anna)
    case_url = f"/review/cases/{first}"
    expect(anna.locator("#case-state")).to_have_text("claimed")
    expect(anna.locator("#notice")).to_contain_text("indication, not proof")
    expect(anna.locator("#lease")).to_contain_text("left")
    expect(anna.locator("table.detectors")).to_contain_text("provenance")
    expect(anna.locator("table.detectors")).to_contain_text("1.00")
    expect(anna.locator("section.findings li.finding.ai").first).to_be_visible()
    expect(anna.locator("#open-original")).to_have_attribute("href", f"{case_url}/image")
    _all_loaded(anna, "img.media.blurrable")
    assert BLURRED.search(_computed_filter(anna, "img.media"))
    anna.keyboard.press("b")
    expect(anna.locator("img.media")).to_have_css("filter", "none")
    expect(anna.locator("button[data-blur-toggle]")).to_have_attribute("aria-pressed", "true")
    anna.screenshot(path=str(artifacts / "case.png"))
    with anna.context.expect_page() as opened:
        anna.keyboard.press("o")
    original = opened.value
    original.wait_for_load_state()
    assert original.url == live.url(f"{case_url}/image")
    assert original.evaluate("() => document.images[0].naturalWidth") > 0
    original.close()
    anna.keyboard.press("?")
    expect(anna.locator("dialog#shortcuts")).to_be_visible()
    anna.keyboard.press("?")
    expect(anna.locator("dialog#shortcuts")).to_be_hidden()

    # Another moderator sees the case as held, read-only, and cannot decide it.
    boris = team.signed_in("boris", TokenRole.MODERATOR, fake_clock=True)
    assert _count(boris, "claimed") == 1
    expect(boris.locator(f"tr[data-case-id='{first}']")).to_contain_text("claimed")
    boris.goto(live.url(case_url))
    expect(boris.locator("#read-only")).to_contain_text("Another moderator holds this case")
    expect(boris.locator("#decision-form")).to_have_count(0)
    expect(boris.locator("#claim")).to_have_count(0)
    expect(boris.locator("img.media")).to_have_count(0)
    _all_loaded(boris, "img.thumb.blurrable")
    forged = boris.request.post(
        live.url(f"{case_url}/decision"),
        form={"csrf_token": _csrf(boris), "decision": "not_ai_generated"},
    )
    assert forged.status == 409, forged.text()
    assert "claim the case first" in forged.text().lower()
    no_token = boris.request.post(
        live.url(f"{case_url}/decision"), form={"decision": "not_ai_generated"}
    )
    assert no_token.status == 403
    assert boris.request.get(live.url(f"{case_url}/image")).status == 403

    # Typing in the note types; out of it, "a" decides.
    note = "Banding and haze, as in the others? A generator, surely."  # a, h, u, n, b, o, r, ?
    anna.click("#note")
    anna.keyboard.type(note)
    expect(anna.locator("#note")).to_have_value(note)
    expect(anna.locator("dialog#shortcuts")).to_be_hidden()
    expect(anna.locator("button[data-blur-toggle]")).to_have_attribute("aria-pressed", "true")
    assert anna.url == live.url(case_url)
    expect(anna.locator("#case-state")).to_have_text("claimed")
    anna.evaluate("() => document.activeElement.blur()")
    with anna.expect_navigation():
        anna.keyboard.press("a")
    expect(anna).to_have_url(live.url(f"{case_url}?flash=decided"))
    expect(anna.locator(".flash.ok")).to_contain_text("Decision saved")
    expect(anna.locator("#case-state")).to_have_text("decided")
    expect(anna.locator("#final-decision")).to_have_text("AI-generated")
    expect(anna.locator("table.decisions")).to_contain_text(note)
    history = _history(anna)
    assert [row[2] for row in history] == ["opened", "claimed", "decided"], history
    assert history[2][5] == "AI-generated"
    expect(anna.locator("#decision-form")).to_have_count(0)

    # The next case, escalated as unsure.
    with anna.expect_navigation():
        anna.keyboard.press("n")
    escalated = _case_id(anna)
    assert escalated != first
    with anna.expect_navigation():
        anna.keyboard.press("u")
    expect(anna.locator("#case-state")).to_have_text("escalated")
    expect(anna.locator(".flash.ok")).to_contain_text("an admin")

    # A lease runs out: boris holds a case, time moves past the lease, the case goes back.
    boris.goto(live.url("/review"))
    with boris.expect_navigation():
        boris.keyboard.press("n")
    dropped = _case_id(boris)
    assert dropped not in (first, escalated)
    expect(boris.locator("#lease")).to_contain_text("left")
    later = utcnow() + policy.lease + timedelta(seconds=1)
    assert review.expire_leases(live.sessions, now=later) == 1
    problems.expected.append((409, f"/review/cases/{dropped}/renew"))
    boris.clock.fast_forward("01:01")  # the page's own renewal, "every 60s", fires
    expect(boris.locator("#lease")).to_contain_text("Lease lost")
    boris.reload()
    expect(boris.locator("#case-state")).to_have_text("open")
    expect(boris.locator("#claim")).to_be_visible()
    expect(boris.locator("#decision-form")).to_have_count(0)
    assert [row[2] for row in _history(boris)][-1] == "lease ran out"

    anna.goto(live.url("/review"))
    assert _count(anna, "claimed") == 0
    assert _count(anna, "open") == cases - 2
    assert _count(anna, "decided") == 1 and _count(anna, "escalated") == 1
    expect(anna.locator(f"tr[data-case-id='{dropped}'] .badge")).to_have_text("open")
    expect(anna.locator(f"tr[data-case-id='{first}']")).to_have_count(0)

    # An admin finds the escalated case, claims it and decides; the tallies count it all.
    root = team.signed_in("root", TokenRole.ADMIN)
    root.click("nav a[href='/admin']")
    expect(root.locator(f"table.escalated tr[data-case-id='{escalated}']")).to_be_visible()
    expect(root.locator("#agreement")).to_be_visible()
    expect(root.locator("table.tallies")).to_contain_text("anna")
    _all_loaded(root, "table.escalated img.thumb")
    root.screenshot(path=str(artifacts / "admin.png"))
    root.click(f"table.escalated tr[data-case-id='{escalated}'] a")
    expect(root).to_have_url(live.url(f"/review/cases/{escalated}"))
    expect(root.locator("#case-state")).to_have_text("escalated")
    with root.expect_navigation():
        root.keyboard.press("c")
    expect(root.locator(".flash.ok")).to_contain_text("You hold this case")
    _all_loaded(root, "img.media")
    with root.expect_navigation():
        root.keyboard.press("h")
    expect(root.locator("#final-decision")).to_have_text("Human-made")
    root.goto(live.url("/admin"))
    expect(root.locator("table.escalated")).to_have_count(0)
    tallies = {
        row.locator("td").first.inner_text().split()[0]: [
            cell.inner_text() for cell in row.locator("td.num").all()
        ]
        for row in root.locator("table.tallies tbody tr").all()
    }
    headers = [h.inner_text() for h in root.locator("table.tallies thead th.num").all()]
    assert headers == ["AI-generated", "Human-made", "Unsure", "Total"]
    assert tallies == {"anna": ["1", "0", "1", "2"], "root": ["0", "1", "0", "1"]}, tallies

    root.click("form.logout button[type=submit]")
    expect(root).to_have_url(live.url("/review/login?flash=signed_out"))
    expect(root.locator(".flash.ok")).to_contain_text("signed out")
    root.goto(live.url("/admin"))
    expect(root).to_have_url(re.compile(r"/review/login\?next=%2Fadmin$"))

    assert problems.found == [], "\n".join(problems.found)
