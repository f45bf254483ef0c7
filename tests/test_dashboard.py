"""The review dashboard's pages on the real application and real Postgres: signing in and
out, CSRF, the security headers, who may open which page, the queue, claiming and deciding
a case through the pages, the pictures, the admin pages and the export."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api import dashboard
from api.app import create_app
from api.dashboard.security import CONTENT_SECURITY_POLICY
from api.dashboard.session import SignedIn
from db import repository
from db.models import ReviewState, SourceKind, TokenRole, VerdictLabel
from db.session import transaction
from synthsentry.cli.serve import BuiltApi
from workers import review, tokens
from workers.names import identity, printable

from apitest import build_test_api
from badfiles import pixel_bomb_png
from conftest import DatabaseFactory, emptied_sessions

BASE = "https://testserver"  # the session cookie is Secure outside development
# Secure cookies carry the __Host- prefix (only this host, over HTTPS, for the whole site).
SESSION = "__Host-ss_session"
LOGIN_CSRF = "__Host-ss_login_csrf"
ENSEMBLE = repository.EnsembleRecord(
    "weighted-mean@" + "d" * 16, "d" * 64, {"rule": "weighted-mean", "threshold": 0.5}
)
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


# --- fixtures and helpers ---------------------------------------------------------------


class Response(Protocol):
    """What the tests read of a TestClient answer."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def content(self) -> bytes: ...
    @property
    def headers(self) -> Any: ...
    @property
    def url(self) -> Any: ...


@pytest.fixture(scope="module")
def dashboard_database(committing_database: DatabaseFactory) -> str:
    return committing_database("dashboard")


@pytest.fixture
def sessions(dashboard_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(dashboard_database)


@pytest.fixture
def built(sessions: sessionmaker[Session], tmp_path: Path) -> BuiltApi:
    return build_test_api(sessions, tmp_path)


@pytest.fixture
def app_client(built: BuiltApi) -> TestClient:
    return _client(built)


def _client(built: BuiltApi) -> TestClient:
    return TestClient(create_app(built.context), base_url=BASE, follow_redirects=False)


def _token(sessions: sessionmaker[Session], role: TokenRole, name: str) -> str:
    with transaction(sessions) as session:
        return tokens.issue_token(session, role=role, name=name, actor="test").token


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""


VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


class ParsedPage(HTMLParser):
    """Every element with its attributes and the text inside it, and the text inside each
    <script> and <style>."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self.inline_code: list[str] = []
        self._open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1].tag in ("script", "style") and data.strip():
            self.inline_code.append(data)
        for element in self._open:
            element.text += data

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag)
            and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def parse(html: str) -> ParsedPage:
    parsed = ParsedPage()
    parsed.feed(html)
    parsed.close()
    return parsed


def csrf_of(reply: Response) -> str:
    fields = parse(reply.text).find("input", name="csrf_token")
    assert fields, "no csrf_token field on the page"
    return fields[0].attrs["value"]


def sign_in(client: TestClient, token: str) -> Response:
    form = client.get("/review/login")
    assert form.status_code == 200
    return client.post("/review/login", data={"token": token, "csrf_token": csrf_of(form)})


@dataclass
class Moderator:
    client: TestClient
    token: str
    actor: str
    csrf: str

    def post(self, path: str, **data: str) -> Response:
        return self.client.post(path, data={"csrf_token": self.csrf, **data})


def signed_in(
    built: BuiltApi, sessions: sessionmaker[Session], role: TokenRole, name: str
) -> Moderator:
    client = _client(built)
    token = _token(sessions, role, name)
    reply = sign_in(client, token)
    assert reply.status_code == 303 and reply.headers["location"] == "/review", reply.text
    queue = client.get("/review")
    assert queue.status_code == 200
    public_id = token.split("_")[1]
    return Moderator(client, token, f"token:{public_id}", csrf_of(queue))


def _jpeg(seed: int) -> bytes:
    picture = Image.new("RGB", (80, 60), (seed * 53 % 256, seed * 29 % 256, 90))
    for x in range(0, 80, 3):
        picture.putpixel((x, (x * seed) % 60), (255, 255, 255))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90)
    return out.getvalue()


_seeds = iter(range(1, 1_000_000))


def make_case(
    sessions: sessionmaker[Session],
    folder: Path,
    *,
    score: float = 0.9,
    detectors: tuple[str, ...] = ("mj5",),
    provenance: bool = False,
    source: SourceKind = SourceKind.CLI,
    data: bytes | None = None,
) -> tuple[int, str]:
    """A flagged picture with a review case, as a scan leaves it: the file on disk, where
    it was seen, each detector's answer and the verdict. Returns (case id, sha256)."""
    data = data if data is not None else _jpeg(next(_seeds))
    sha256 = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sha256[:16]}.jpg"
    path.write_bytes(data)
    with transaction(sessions) as session:
        ensemble = repository.register_ensemble(session, ENSEMBLE)
    with transaction(sessions) as session:
        image = repository.get_or_create_image(
            session, repository.ImageFacts(sha256=sha256, size_bytes=len(data), format="JPEG")
        )
        if source == SourceKind.CLI:
            ref = repository.SourceRef(
                kind=source, ref_key=f"{identity(path)}@{sha256}", local_path=printable(path)
            )
        else:
            ref = repository.SourceRef(
                kind=source, ref_key=f"media/up/{sha256}", bucket="media", object_key=f"up/{sha256}"
            )
        repository.record_source(session, ref, image.id)
        entries = []
        for name in detectors:
            repository.save_detection(
                session,
                image.id,
                repository.DetectionRecord(name, "1", "f" * 64, score, {}, 3.0),
            )
            entries.append({"name": name, "version": "1", "score": score, "failed": False})
        if provenance:
            finding = {
                "kind": "c2pa",
                "ai": True,
                "summary": "A C2PA manifest declares trainedAlgorithmicMedia",
                "details": {
                    "signer": {"issuer": "Adobe Inc.", "common_name": "Adobe Firefly"},
                    "validity": "valid",
                    "claim_generator": "Adobe Firefly 3",
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "software_agent": "Firefly",
                            "digital_source_type": TRAINED,
                        }
                    ],
                },
            }
            repository.save_detection(
                session,
                image.id,
                repository.DetectionRecord(
                    "provenance",
                    "2",
                    None,
                    1.0,
                    {"summary": "signed AI claim", "items": [finding]},
                    1.0,
                ),
            )
            entries.append({"name": "provenance", "version": "2", "score": 1.0, "failed": False})
        record = repository.VerdictRecord(
            ensemble_id=ensemble.id,
            ensemble_version=ensemble.version,
            detector_set_digest=sha256,
            detector_set={"detectors": entries},
            ai_score=score,
            label=VerdictLabel.LIKELY_AI,
            flagged=True,
            reason=f"ai_score {score:.2f} is at or above the review threshold 0.50",
        )
        repository.save_verdict(session, image.id, record, actor="test")
        case = repository.case_for_image(session, image.id)
        assert case is not None
        return case.id, sha256


def _cookie_header(reply: Response, name: str) -> str:
    found: list[str] = [h for h in reply.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    assert found, f"no {name} cookie set"
    return found[-1]


# --- signing in and out -----------------------------------------------------------------


@pytest.mark.parametrize("role", [TokenRole.MODERATOR, TokenRole.ADMIN])
def test_a_moderator_or_admin_token_signs_in_with_a_safe_cookie(
    built: BuiltApi, sessions: sessionmaker[Session], role: TokenRole
) -> None:
    client = _client(built)
    token = _token(sessions, role, "mona")
    assert client.get("/review").headers["location"].startswith("/review/login")
    reply = sign_in(client, token)
    assert reply.status_code == 303 and reply.headers["location"] == "/review"
    cookie = _cookie_header(reply, SESSION)
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "path=/", "samesite=lax", "max-age=43200"} <= flags
    assert token not in cookie  # the browser keeps a session, never the token
    queue = client.get("/review")
    assert queue.status_code == 200
    assert "mona" in queue.text and f"({role.value})" in queue.text
    admin_links = parse(queue.text).find("a", href="/admin")
    assert bool(admin_links) == (role == TokenRole.ADMIN)
    with sessions() as session:
        row = repository.dashboard_session_by_public_id(
            session, client.cookies[SESSION].split(".")[0]
        )
    assert row is not None
    secret = client.cookies[SESSION].split(".")[1]
    assert row[0].secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()


def test_without_secure_cookies_the_session_cookie_is_not_secure(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    built = build_test_api(sessions, tmp_path, environment="development")
    client = TestClient(create_app(built.context), follow_redirects=False)
    reply = sign_in(client, _token(sessions, TokenRole.MODERATOR, "dev"))
    assert reply.status_code == 303
    assert "secure" not in _cookie_header(reply, "ss_session").lower()
    assert client.get("/review").status_code == 200


def test_platform_bad_and_revoked_tokens_are_refused_alike(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    platform = _token(sessions, TokenRole.PLATFORM, "hooks")
    moderator = _token(sessions, TokenRole.MODERATOR, "gone")
    with transaction(sessions) as session:
        tokens.revoke(session, moderator.split("_")[1], actor="test")
    errors = set()
    for presented in (platform, moderator, moderator[:-3] + "abc", "not a token", ""):
        client = _client(built)
        reply = sign_in(client, presented)
        assert reply.status_code == 401, presented
        assert not [h for h in reply.headers.get_list("set-cookie") if SESSION + "=" in h]
        errors.add(parse(reply.text).find(id="login-error")[0].text.strip())
        assert client.get("/review").status_code == 303
    assert len(errors) == 1, "every refusal reads the same"


def test_signing_out_ends_the_session_for_good(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    old = anna.client.cookies[SESSION]
    reply = anna.post("/review/logout")
    assert reply.status_code == 303 and reply.headers["location"].startswith("/review/login")
    assert SESSION + '=""' in _cookie_header(reply, SESSION)
    replay = _client(built)
    replay.cookies.set(SESSION, old)
    assert replay.get("/review").status_code == 303, "the old cookie no longer works"
    assert replay.post("/review/next", data={"csrf_token": anna.csrf}).status_code == 401


def test_a_revoked_token_ends_its_sessions(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")
    assert anna.client.get("/review").status_code == 200
    revoked = admin.post(f"/admin/tokens/{anna.actor.removeprefix('token:')}/revoke")
    assert revoked.status_code == 303 and "flash=token_revoked" in revoked.headers["location"]
    assert anna.client.get("/review").headers["location"].startswith("/review/login")
    assert anna.post("/review/next").status_code == 401
    assert admin.client.get("/review").status_code == 200


def test_after_signing_in_the_browser_returns_to_the_page_it_asked_for(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, _ = make_case(sessions, tmp_path / "files")
    token = _token(sessions, TokenRole.MODERATOR, "anna")
    client = _client(built)
    sent = client.get(f"/review/cases/{case_id}")
    assert sent.headers["location"] == f"/review/login?next=%2Freview%2Fcases%2F{case_id}"
    form = client.get(sent.headers["location"])
    assert parse(form.text).find("input", name="next")[0].attrs["value"] == (
        f"/review/cases/{case_id}"
    )
    data = {"token": token, "csrf_token": csrf_of(form), "next": f"/review/cases/{case_id}"}
    assert client.post("/review/login", data=data).headers["location"] == (
        f"/review/cases/{case_id}"
    )
    elsewhere = _client(built)
    form = elsewhere.get("/review/login", params={"next": "//evil.example/x"})
    assert not parse(form.text).find("input", name="next")
    data = {"token": token, "csrf_token": csrf_of(form), "next": "//evil.example/x"}
    assert elsewhere.post("/review/login", data=data).headers["location"] == "/review"
    # Signed in already: the form sends the browser on.
    assert elsewhere.get("/review/login").headers["location"] == "/review"


# --- CSRF -------------------------------------------------------------------------------


def test_an_unsafe_request_without_the_sessions_own_csrf_token_is_refused(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    make_case(sessions, tmp_path / "files")
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    boris = signed_in(built, sessions, TokenRole.MODERATOR, "boris")
    assert anna.csrf != boris.csrf
    for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": boris.csrf}):
        reply = anna.client.post("/review/next", data=data)
        assert reply.status_code == 403, data
        assert "security token" in parse(reply.text).find(id="error-detail")[0].text
    wrong_header = anna.client.post("/review/next", headers={"X-CSRF-Token": boris.csrf})
    assert wrong_header.status_code == 403
    cross_site = {"Origin": "https://evil.example", "X-CSRF-Token": anna.csrf}
    assert anna.client.post("/review/next", headers=cross_site).status_code == 403
    fetch_site = {"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": anna.csrf}
    assert anna.client.post("/review/next", headers=fetch_site).status_code == 403
    # The right token, as htmx sends it (a header) or as a form field, from this origin.
    same = {"Origin": BASE, "Sec-Fetch-Site": "same-origin", "X-CSRF-Token": anna.csrf}
    claimed = anna.client.post("/review/next", headers=same)
    assert claimed.status_code == 303 and claimed.headers["location"].startswith("/review/cases/")
    assert anna.post("/review/next").status_code == 303
    # A browser under Referrer-Policy: no-referrer sends "Origin: null" for its own forms.
    null_origin = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    assert anna.client.post("/review/next", headers=null_origin).status_code == 403
    null_origin["X-CSRF-Token"] = anna.csrf
    assert anna.client.post("/review/next", headers=null_origin).status_code == 303


def test_the_sign_in_form_is_protected_against_login_csrf(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.MODERATOR, "victim")
    fresh = _client(built)
    # Another site's form: no double-submit cookie, whatever value it puts in the field.
    forged = fresh.post("/review/login", data={"token": token, "csrf_token": "x" * 43})
    assert forged.status_code == 403
    assert not [h for h in forged.headers.get_list("set-cookie") if SESSION + "=" in h]
    form = fresh.get("/review/login")
    cookie = _cookie_header(form, LOGIN_CSRF).lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    mismatched = fresh.post("/review/login", data={"token": token, "csrf_token": "y" * 43})
    assert mismatched.status_code == 403
    missing = fresh.post("/review/login", data={"token": token})
    assert missing.status_code == 403
    assert sign_in(fresh, token).status_code == 303


# --- headers and markup -----------------------------------------------------------------


def test_every_page_carries_the_security_headers_and_no_inline_code(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, _ = make_case(sessions, tmp_path / "files", provenance=True)
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")
    anonymous = _client(built)
    assert admin.post(f"/review/cases/{case_id}/claim").status_code == 303
    pages: list[Response] = [
        anonymous.get("/review/login"),
        admin.client.get("/review"),
        admin.client.get(f"/review/cases/{case_id}"),
        admin.client.get("/review/settings"),
        admin.client.get("/admin"),
        admin.client.get("/admin/tokens"),
        admin.post("/admin/tokens", name="new one", role="moderator"),
        admin.client.get("/review/cases/999999"),  # an error page
        admin.client.get("/review/nowhere"),  # not a page at all
    ]
    assert [p.status_code for p in pages] == [200, 200, 200, 200, 200, 200, 201, 404, 404]
    for reply in pages:
        headers = reply.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert CONTENT_SECURITY_POLICY == (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'"
        )
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        if not headers["content-type"].startswith("text/html"):
            continue
        parsed = parse(reply.text)
        assert parsed.inline_code == [], reply.url
        assert not [e for e in parsed.elements if "style" in e.attrs], reply.url
        assert not parsed.find("style")
        assert not [e for e in parsed.elements if any(a.startswith("on") for a in e.attrs)]
        assert not [e for e in parsed.elements if any(a.startswith("hx-on") for a in e.attrs)]
        for script in parsed.find("script"):
            assert script.attrs["src"].startswith("/review/static/")
        config = parsed.find("meta", name="htmx-config")[0].attrs["content"]
        for setting in (
            '"includeIndicatorStyles":false',
            '"allowEval":false',
            '"allowScriptTags":false',
            '"selfRequestsOnly":true',
        ):
            assert setting in config
    static = anonymous.get(parse(pages[0].text).find("script")[0].attrs["src"])
    assert static.status_code == 200 and "immutable" in static.headers["cache-control"]
    assert static.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


# --- who may open what ------------------------------------------------------------------


PUBLIC = {("/review/login", "GET"), ("/review/login", "POST")}


def _dashboard_routes() -> list[tuple[APIRoute, str]]:
    """Every route and method, signing out last (it ends the walker's session)."""
    routes = [
        (route, method)
        for router in dashboard.ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    ]
    return sorted(routes, key=lambda pair: pair[0].path == "/review/logout")


def _roles_of(route: APIRoute) -> set[TokenRole]:
    found: set[TokenRole] = set()
    stack = list(route.dependant.dependencies)
    while stack:
        dependency = stack.pop()
        if isinstance(dependency.call, SignedIn):
            found |= dependency.call.roles
        stack.extend(dependency.dependencies)
    return found


def test_every_dashboard_route_names_who_may_open_it() -> None:
    routes = _dashboard_routes()
    assert len(routes) >= 18
    undeclared = {(r.path, m) for r, m in routes if not _roles_of(r)}
    assert undeclared == PUBLIC
    for route, _ in routes:
        if route.path.startswith("/admin"):
            assert _roles_of(route) == {TokenRole.ADMIN}, route.path
        elif (route.path, "GET") not in PUBLIC:
            assert _roles_of(route) == {TokenRole.MODERATOR, TokenRole.ADMIN}, route.path


def test_every_dashboard_route_answers_each_role_as_it_declares(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, _ = make_case(sessions, tmp_path / "files")
    anonymous = _client(built)
    moderator = signed_in(built, sessions, TokenRole.MODERATOR, "mo")
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")
    policy = built.context.review_policy
    checked = 0
    for route, method in _dashboard_routes():
        if (route.path, method) in PUBLIC:
            continue
        path = route.path.replace("{case_id}", str(case_id)).replace("{public_id}", "0" * 12)
        if method == "GET":
            reply = anonymous.get(path)
            assert reply.status_code == 303, path
            assert reply.headers["location"].startswith("/review/login"), path
        else:
            reply = anonymous.request(method, path, data={"csrf_token": moderator.csrf})
            assert reply.status_code == 401, (method, path)
        if route.path.endswith("/image"):
            # The full picture is the lease holder's: the moderator walks it holding the case.
            review.claim(sessions, case_id, review.Reviewer(moderator.actor), policy)
        for who in (moderator, admin):
            if method == "GET":
                answer = who.client.get(path)
            else:
                answer = who.client.request(method, path, data={"csrf_token": who.csrf})
            refused = answer.status_code in (401, 403)
            admin_only = route.path.startswith("/admin")
            assert refused == (admin_only and who is moderator), (method, path, answer.text)
            assert answer.status_code < 500, (method, path, answer.text)
            checked += 1
        if route.path.startswith("/admin") and method == "GET":
            page = moderator.client.get(path)
            assert page.status_code == 403 and "for admins" in page.text
    assert checked >= 2 * (len(_dashboard_routes()) - len(PUBLIC))


# --- the queue --------------------------------------------------------------------------


def test_the_queue_counts_filters_and_pages(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    folder = tmp_path / "files"
    low = [make_case(sessions, folder, score=0.55)[0] for _ in range(3)]
    high = [
        make_case(sessions, folder, score=0.95, detectors=("mj5", "sdxl"))[0] for _ in range(27)
    ]
    signed = make_case(sessions, folder, score=0.8, provenance=True)[0]
    uploaded = make_case(sessions, folder, score=0.7, source=SourceKind.UPLOAD_EVENT)[0]
    every = {*low, *high, signed, uploaded}
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    claimed = anna.post("/review/next").headers["location"]
    assert claimed == f"/review/cases/{high[0]}", "the highest score that waited longest"

    first = anna.client.get("/review")
    parsed = parse(first.text)
    counts = {
        e.attrs["data-count"]: int(e.text) for e in parsed.find("span") if "data-count" in e.attrs
    }
    assert counts == {
        "open": len(every) - 1,
        "claimed": 1,
        "decided": 0,
        "withdrawn": 0,
        "escalated": 0,
    }
    rows = _case_ids(parsed)
    assert rows == high[:25], "priority order: score first, then waiting time"
    assert "page 1 of 2" in first.text
    assert parsed.find("a", rel="next") and not parsed.find("a", rel="prev")
    thumbs = [e for e in parsed.find("img") if "thumb" in e.attrs.get("class", "")]
    assert [t.attrs["src"] for t in thumbs] == [f"/review/cases/{i}/thumbnail" for i in rows]
    assert all(t.attrs["loading"] == "lazy" and t.attrs["alt"] for t in thumbs)
    assert all("blurrable" in t.attrs["class"] for t in thumbs)
    assert parsed.find("button", data_key="n")
    assert parsed.find("a", href=f"/review/cases/{high[1]}")
    assert "you" in [e.text.strip() for e in parsed.find("td")]
    assert "fired: sdxl" in first.text

    second = parse(anna.client.get(parsed.find("a", rel="next")[0].attrs["href"]).text)
    assert set(_case_ids(second)) == every - set(rows)
    assert second.find("a", rel="prev") and not second.find("a", rel="next")

    def matching(**params: str) -> tuple[int, list[int]]:
        reply = anna.client.get("/review", params=params)
        assert reply.status_code == 200, reply.text
        summary = parse(reply.text).find(id="queue-summary")[0].text
        found = re.match(r"(\d+) cases? match", summary)
        assert found, summary
        return int(found.group(1)), _case_ids(parse(reply.text))

    assert matching(detector="sdxl")[0] == 27
    assert matching(provenance="c2pa") == (1, [signed])
    assert matching(source="upload_event") == (1, [uploaded])
    assert matching(min_score="0.75")[0] == 28
    assert matching(state="claimed") == (1, [high[0]])
    assert matching(state="decided") == (0, [])
    assert matching(min_score="0.6", detector="mj5", provenance="", page="2") == (
        29,
        [*high[25:], signed, uploaded],
    )
    options = {e.attrs["value"] for e in parsed.find("option")}
    assert {"mj5", "sdxl", "provenance", "c2pa", "cli", "upload_event"} <= options
    assert anna.client.get("/review", params={"min_score": "2"}).status_code == 400
    assert anna.client.get("/review", params={"state": "bogus"}).status_code == 400

    thumbnail = anna.client.get(f"/review/cases/{low[0]}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"
    assert thumbnail.headers["cache-control"] == "no-store"


def _case_ids(parsed: ParsedPage) -> list[int]:
    return [int(e.attrs["data-case-id"]) for e in parsed.find("tr") if "data-case-id" in e.attrs]


def test_next_says_so_when_nothing_is_left(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    reply = anna.post("/review/next")
    assert reply.status_code == 303 and reply.headers["location"] == "/review?flash=nothing"
    page = anna.client.get(reply.headers["location"])
    assert "Nothing to review right now" in page.text
    assert "not-a-message" not in anna.client.get("/review?flash=not-a-message").text


# --- a case through the pages ----------------------------------------------------------


def test_claim_decide_and_what_another_moderator_sees(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, sha256 = make_case(sessions, tmp_path / "files", provenance=True)
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    boris = signed_in(built, sessions, TokenRole.MODERATOR, "boris")
    case_url = f"/review/cases/{case_id}"

    before = parse(boris.client.get(case_url).text)
    assert before.find("button", data_key="c"), "an open case offers a Claim button"
    assert not before.find("form", id="decision-form")

    claimed = anna.post("/review/next")
    assert claimed.headers["location"] == case_url
    page = anna.client.get(case_url)
    held = parse(page.text)
    assert held.find("form", id="decision-form")
    assert {
        b.attrs["data-key"]: b.attrs["value"] for b in held.find("button", name="decision")
    } == {
        "a": "ai_generated",
        "h": "not_ai_generated",
        "u": "unsure",
    }
    labels = [b.text.strip() for b in held.find("button", name="decision")]
    assert [label.split()[0] for label in labels] == ["AI-generated", "Human-made", "Unsure"]
    assert held.find("textarea", name="note")
    assert held.find("button", data_key="r") and held.find("button", data_key="b")
    assert held.find("a", data_key="o")[0].attrs["target"] == "_blank"
    assert held.find("a", data_key="o")[0].attrs["rel"] == "noopener"
    lease = held.find(id="lease")[0]
    assert lease.attrs["hx-post"] == f"{case_url}/renew"
    assert lease.attrs["hx-trigger"] == "every 60s" and lease.attrs["hx-swap"] == "innerHTML"
    assert held.find("img", src=f"{case_url}/image")
    assert held.find("dialog", id="shortcuts")
    assert "an indication, not proof" in held.find(id="notice")[0].text
    # The evidence in plain words.
    for words in (
        "Adobe Inc. (Adobe Firefly)",
        "Adobe Firefly 3",
        "c2pa.created by Firefly (trainedAlgorithmicMedia)",
        "valid",
        "is at or above the review threshold",
        "ffffffffffff",
        sha256,
        str(tmp_path / "files"),
    ):
        assert words in page.text, words
    assert "https://" not in parse(page.text).find("table", **{"class": "sources"})[0].text

    body = anna.client.get(f"{case_url}/image")
    assert body.status_code == 200 and body.headers["content-type"] == "image/jpeg"

    other = boris.client.get(case_url)
    seen = parse(other.text)
    assert not seen.find("form", id="decision-form") and not seen.find("button", data_key="c")
    assert seen.find(id="read-only")
    assert seen.find("img", src=f"{case_url}/thumbnail") and not seen.find(
        "img", src=f"{case_url}/image"
    )
    assert boris.client.get(f"{case_url}/image").status_code == 403
    refused = boris.post(f"{case_url}/decision", decision="not_ai_generated")
    assert refused.status_code == 409
    assert "claim the case first" in parse(refused.text).find(id="error-detail")[0].text.lower()
    lost = boris.client.post(f"{case_url}/renew", headers={"X-CSRF-Token": boris.csrf})
    assert lost.status_code == 409 and "Lease lost" in lost.text
    renewed = anna.client.post(f"{case_url}/renew", headers={"X-CSRF-Token": anna.csrf})
    assert renewed.status_code == 200 and "left" in renewed.text
    assert "<html" not in renewed.text, "a fragment for htmx, not a page"

    decided = anna.post(f"{case_url}/decision", decision="ai_generated", note="matches Firefly")
    assert decided.status_code == 303 and decided.headers["location"] == f"{case_url}?flash=decided"
    after = anna.client.get(decided.headers["location"])
    shown = parse(after.text)
    assert shown.find(id="case-state")[0].text == "decided"
    assert shown.find(id="final-decision")[0].text == "AI-generated"
    assert "autofocus" in shown.find("button", data_key="n")[0].attrs
    assert "Decision saved" in after.text
    history = [[cell.text for cell in row] for row in _rows(shown, "history")]
    actions = [row[2] for row in history]
    assert actions == ["opened", "claimed", "decided"]
    assert history[1][1] == "anna" and history[2][5] == "AI-generated"
    assert history[2][3] == "claimed"
    assert "matches Firefly" in after.text
    again = anna.post(f"{case_url}/decision", decision="ai_generated")
    assert again.status_code == 409 and "decided" in again.text


def _rows(parsed: ParsedPage, table_id: str) -> list[list[Element]]:
    """The cells of each body row of the table with this id, in order."""
    rows: list[list[Element]] = []
    inside = False
    for element in parsed.elements:
        if element.tag == "table":
            inside = element.attrs.get("id") == table_id
        elif inside and element.tag == "tr":
            rows.append([])
        elif inside and element.tag == "td" and rows:
            rows[-1].append(element)
    return [row for row in rows if row]


def test_release_unsure_and_an_admin_deciding_an_escalated_case(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, _ = make_case(sessions, tmp_path / "files")
    case_url = f"/review/cases/{case_id}"
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")

    assert anna.post(f"{case_url}/claim").headers["location"] == f"{case_url}?flash=claimed"
    released = anna.post(f"{case_url}/release")
    assert released.headers["location"] == "/review?flash=released"
    assert "back in the queue" in anna.client.get(released.headers["location"]).text
    assert anna.post(f"{case_url}/claim").status_code == 303
    unsure = anna.post(f"{case_url}/decision", decision="unsure")
    assert unsure.headers["location"] == f"{case_url}?flash=escalated"

    assert anna.post(f"{case_url}/claim").status_code == 403
    overview = admin.client.get("/admin")
    escalated = parse(overview.text)
    assert escalated.find("form", action=f"{case_url}/claim")
    assert admin.post(f"{case_url}/claim").status_code == 303
    page = parse(admin.client.get(case_url).text)
    assert page.find("form", id="decision-form")
    final = admin.post(f"{case_url}/decision", decision="not_ai_generated")
    assert final.headers["location"] == f"{case_url}?flash=decided"
    with sessions() as session:
        case = repository.get_case(session, case_id)
        assert case is not None and case.state == ReviewState.DECIDED
    tallies = admin.client.get("/admin").text
    assert "Human-made" in tallies and "anna" in tallies


def test_a_blind_second_review_hides_the_first_decision(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    built = build_test_api(sessions, tmp_path, review_second_opinion_share=1.0)
    case_id, _ = make_case(sessions, tmp_path / "files")
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    boris = signed_in(built, sessions, TokenRole.MODERATOR, "boris")
    assert anna.post("/review/next").status_code == 303
    sent = anna.post(f"/review/cases/{case_id}/decision", decision="ai_generated", note="first")
    assert sent.headers["location"].endswith("flash=second_review")
    assert boris.post("/review/next").headers["location"] == f"/review/cases/{case_id}"
    page = boris.client.get(f"/review/cases/{case_id}")
    assert parse(page.text).find(id="blind-notice")
    assert "first" not in [c.text for c in parse(page.text).find("td")]
    assert parse(page.text).find("form", id="decision-form")


# --- settings, admin, export -----------------------------------------------------------


def test_the_blur_default_is_the_moderators_own(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    anna = signed_in(built, sessions, TokenRole.MODERATOR, "anna")
    boris = signed_in(built, sessions, TokenRole.MODERATOR, "boris")
    assert parse(anna.client.get("/review").text).find("body")[0].attrs["data-blur"] == "on"
    saved = anna.post("/review/settings")  # the checkbox left empty: no blurring
    assert saved.headers["location"] == "/review/settings?flash=settings_saved"
    settings = parse(anna.client.get("/review/settings").text)
    assert "checked" not in settings.find("input", name="blur_images")[0].attrs
    assert parse(anna.client.get("/review").text).find("body")[0].attrs["data-blur"] == "off"
    assert parse(boris.client.get("/review").text).find("body")[0].attrs["data-blur"] == "on"
    anna.post("/review/settings", blur_images="on")
    assert parse(anna.client.get("/review").text).find("body")[0].attrs["data-blur"] == "on"


def test_an_admin_makes_a_token_seen_once_and_revokes_it(
    built: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")
    made = admin.post("/admin/tokens", name="carla", role="moderator")
    assert made.status_code == 201
    token = parse(made.text).find("input", id="issued-token")[0].attrs["value"]
    assert token.startswith("sst_")
    listed = admin.client.get("/admin/tokens")
    assert token not in listed.text and "carla" in listed.text
    public_id = token.split("_")[1]
    revoke = parse(listed.text).find("form", action=f"/admin/tokens/{public_id}/revoke")
    assert revoke and revoke[0].attrs["data-confirm"].startswith("Revoke")
    carla = _client(built)
    assert sign_in(carla, token).status_code == 303
    assert admin.post(f"/admin/tokens/{public_id}/revoke").status_code == 303
    assert carla.get("/review").status_code == 303
    bad = admin.post("/admin/tokens", name=" ", role="moderator")
    assert bad.status_code == 400 and parse(bad.text).find(id="token-error")
    with sessions() as session:
        rows = repository.audit_trail(
            session, "api_token", [t.id for t in repository.list_tokens(session)]
        )
        assert [e.action for e in rows if e.details.get("name") == "carla"] == [
            "token.created",
            "token.revoked",
        ]
        assert all(e.actor == admin.actor for e in rows if e.details.get("name") == "carla")


def test_the_labelled_examples_download(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    case_id, sha256 = make_case(sessions, tmp_path / "files")
    make_case(sessions, tmp_path / "files")  # still open: not an example
    admin = signed_in(built, sessions, TokenRole.ADMIN, "root")
    moderator = signed_in(built, sessions, TokenRole.MODERATOR, "mo")
    assert moderator.post(f"/review/cases/{case_id}/claim").status_code == 303
    moderator.post(f"/review/cases/{case_id}/decision", decision="not_ai_generated")

    download = admin.client.get("/admin/export.csv")
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/csv")
    assert "attachment" in download.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert download.text.splitlines()[0].startswith("sha256,label,decided_at,decided_by")
    assert [(r["sha256"], r["label"], r["decided_by"]) for r in rows] == [
        (sha256, "not_ai_generated", moderator.actor)
    ]
    lines = admin.client.get("/admin/export.jsonl")
    assert lines.status_code == 200 and len(lines.text.splitlines()) == 1
    assert f'"sha256": "{sha256}"' in lines.text
    assert moderator.client.get("/admin/export.csv").status_code == 403
    assert re.search(r"labelled-examples\.csv", download.headers["content-disposition"])


def test_a_malformed_token_or_session_cookie_is_refused_not_looked_up(
    app_client: TestClient, sessions: sessionmaker[Session]
) -> None:
    """A NUL or any odd character never reaches the database (which cannot hold it)."""
    real = _token(sessions, TokenRole.MODERATOR, "mona")
    for token in (real.replace("_", "_\x00", 1), real + "\x00", "sst_zz_" + "a" * 43):
        reply = sign_in(app_client, token)
        assert reply.status_code == 401, (token, reply.text)
        assert parse(reply.text).find(id="login-error")
    for cookie in ("0" * 32 + ".sec\x00ret" + "a" * 20, "ab\x00cd.secret", "x" * 32 + ".y"):
        app_client.cookies.set(SESSION, cookie)
        reply = app_client.get("/review")
        assert reply.status_code == 303, (cookie, reply.text)
        assert reply.headers["location"].startswith("/review/login")


def test_pictures_are_never_decoded_outside_the_intake_limits(
    built: BuiltApi, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A stored file whose header declares 50000x50000 pixels: the thumbnail and the image
    answer with the intake's refusal, nothing is decoded, and nothing is cached."""
    bomb = pixel_bomb_png(50_000, 50_000)
    case_id, _ = make_case(sessions, tmp_path / "files", data=bomb)
    root = signed_in(built, sessions, TokenRole.ADMIN, "root")
    for endpoint in ("thumbnail", "image"):
        reply = root.client.get(f"/review/cases/{case_id}/{endpoint}")
        assert reply.status_code == 404, reply.text
        assert "pixels" in parse(reply.text).find(id="error-detail")[0].text
    media = built.context.media
    assert media is not None and media.memory.peak == 0, "no pixel was decoded"
    assert media.cache.total_bytes() == 0
