"""Platform hooks as services: submit objects or bytes for scanning, read what became of
them. The HTTP handlers (``api/scans.py``) and the CLI call these; the work itself runs
through the fleet's steps, sent by a ``Dispatcher`` (the fleet's queues or the embedded
worker) once the transaction that recorded it has committed.

Every scan is one object and gets a ``sources`` row of its own (kind ``hook``), so two
platforms submitting the same object, or one platform submitting it twice, each get their
answer; the bytes are addressed by content, so the second costs no detector work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import IdempotencyKey, Scan, ScanPriority, SourceKind, SourceStatus
from db.session import transaction
from workers import metrics, results
from workers.dispatch import Dispatcher
from workers.events import BucketPolicy
from workers.intake import SNIFF_BYTES, SUPPORTED_FORMATS, IntakeLimits, sniff
from workers.objects import ObjectStore
from workers.refusals import Refused

log = logging.getLogger(__name__)

MAX_OBJECTS = 1000
SCAN_ID_PREFIX = "scn_"

NOTICE = (
    "flagged asks a person to review the image; it is not a finding that the image is "
    "AI-generated. Detector scores are an indication, not proof. A moderator's decision, "
    "once made, is reported separately under review.decision."
)


class SubmissionRefused(Refused):
    """A submission that cannot be taken (see ``workers.refusals``)."""


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    version_id: str | None = None


@dataclass(frozen=True)
class ScanRequest:
    objects: Sequence[ObjectRef]
    external_id: str | None = None
    callback_url: str | None = None
    priority: ScanPriority = ScanPriority.NORMAL

    def digest(self, *, extra: str = "") -> str:
        """What an ``Idempotency-Key`` is bound to: the request's meaning, canonically."""
        canonical = json.dumps(
            {
                "objects": [[o.bucket, o.key, o.version_id] for o in self.objects],
                "external_id": self.external_id,
                "callback_url": self.callback_url,
                "priority": self.priority.value,
                "extra": extra,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who submits: a token (its row id and public id), or an operator at the CLI."""

    token_id: int | None
    actor: str  # "token:<public id>" or "cli"


@dataclass(frozen=True)
class Submitted:
    scan_ids: list[str]
    replayed: bool  # the same Idempotency-Key and body were seen before: nothing new made


CallbackCheck = Callable[[Session, int, str], str]


@dataclass(frozen=True)
class SubmitPolicy:
    """What the deployment allows a submission to name."""

    buckets: BucketPolicy | None  # None: no bucket may be named (uploads of bytes only)
    upload_bucket: str
    upload_prefix: str
    limits: IntakeLimits
    # Where a token's callbacks may go (``workers.callbacks.check_callback_url``); raises
    # ValueError saying why not. None: callbacks are not offered.
    check_callback: CallbackCheck | None = None


def _new_scan_id() -> str:
    return SCAN_ID_PREFIX + secrets.token_hex(12)


def check_key(key: str) -> None:
    """Keys the API refuses outright: empty, NUL, ``.``/``..`` segments, over 1024 bytes."""
    if not key or "\x00" in key:
        raise SubmissionRefused(422, "invalid-key", "an object key must be non-empty, without NUL")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise SubmissionRefused(422, "invalid-key", f"the key {key!r} has a '.' or '..' segment")
    if len(key.encode()) > 1024:
        raise SubmissionRefused(422, "invalid-key", "an object key is at most 1024 bytes")


def submit_objects(
    session_factory: sessionmaker[Session],
    dispatcher: Dispatcher,
    request: ScanRequest,
    caller: Caller,
    policy: SubmitPolicy,
    *,
    idempotency_key: str | None = None,
    digest_extra: str = "",
    upload: Callable[[], object] | None = None,
) -> Submitted:
    """Record one scan per object and queue their intake. With ``idempotency_key``, a second
    request with the same key and the same body answers with the first one's scans (and
    queues nothing); the same key with another body is refused (422).

    ``upload`` writes the bytes the request names to the upload bucket (which needs no
    allowing then): it runs once every check has passed and the request is not a replay,
    so a refused request writes nothing.

    Every object taken counts in ``synthsentry_uploads_received_total`` (source ``api``
    for a token, ``cli`` for an operator); a refusal of the CLI counts here too, the API's
    at its door (``api.app``), where every problem answer is seen."""
    source = "cli" if caller.token_id is None else "api"
    try:
        submitted = _submit(
            session_factory,
            dispatcher,
            request,
            caller,
            policy,
            idempotency_key=idempotency_key,
            digest_extra=digest_extra,
            upload=upload,
        )
    except SubmissionRefused as exc:
        if source == "cli":
            metrics.upload_refused(source, exc.kind)
        raise
    metrics.upload_received(source, len(submitted.scan_ids))
    return submitted


def _submit(
    session_factory: sessionmaker[Session],
    dispatcher: Dispatcher,
    request: ScanRequest,
    caller: Caller,
    policy: SubmitPolicy,
    *,
    idempotency_key: str | None,
    digest_extra: str,
    upload: Callable[[], object] | None,
) -> Submitted:
    _check_objects(request.objects, policy, uploaded=upload is not None)
    digest = request.digest(extra=digest_extra)
    if idempotency_key is not None and caller.token_id is not None:
        replay = _replay(session_factory, caller.token_id, idempotency_key, digest)
        if replay is not None:
            return replay
    if request.callback_url is not None:
        _check_callback(session_factory, request.callback_url, caller, policy)
    if upload is not None:
        upload()
    try:
        made = _record(
            session_factory,
            request,
            caller,
            policy,
            idempotency_key=idempotency_key,
            digest=digest,
        )
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its scans.
        if idempotency_key is None or caller.token_id is None:
            raise
        replay = _replay(session_factory, caller.token_id, idempotency_key, digest)
        if replay is None:
            raise
        return replay
    bulk = request.priority == ScanPriority.LOW
    for source_id in made.source_ids:
        try:
            dispatcher.intake(source_id, bulk=bulk)
        except Exception:
            # Recorded and committed: the sweep (reconciler, or the embedded worker's)
            # sends the work of an upload left pending. The caller gets its scan ids.
            log.warning("intake not sent; left for the sweep", extra={"source_id": source_id})
    return Submitted(scan_ids=made.scan_ids, replayed=False)


def _check_objects(objects: Sequence[ObjectRef], policy: SubmitPolicy, *, uploaded: bool) -> None:
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise SubmissionRefused(
            422, "too-many-objects", f"a request names 1 to {MAX_OBJECTS} objects"
        )
    for ref in objects:
        check_key(ref.key)
        if uploaded and ref.bucket == policy.upload_bucket:
            continue
        if policy.buckets is None or not policy.buckets.permits(ref.bucket, ref.key):
            raise SubmissionRefused(
                403,
                "bucket-not-allowed",
                f"s3://{ref.bucket}/{ref.key} is not in a bucket (or prefix) this deployment scans",
            )


def _check_callback(
    session_factory: sessionmaker[Session], url: str, caller: Caller, policy: SubmitPolicy
) -> None:
    with session_factory() as session:
        _check_callback_in(session, url, caller, policy)


def _check_callback_in(session: Session, url: str, caller: Caller, policy: SubmitPolicy) -> None:
    if policy.check_callback is None or caller.token_id is None:
        raise SubmissionRefused(
            422, "callback-not-allowed", "callbacks are sent for platform tokens only"
        )
    try:
        policy.check_callback(session, caller.token_id, url)
    except ValueError as exc:
        raise SubmissionRefused(422, "callback-not-allowed", str(exc)) from exc


@dataclass(frozen=True)
class _Made:
    scan_ids: list[str]
    source_ids: list[int]


def _record(
    session_factory: sessionmaker[Session],
    request: ScanRequest,
    caller: Caller,
    policy: SubmitPolicy,
    *,
    idempotency_key: str | None,
    digest: str,
) -> _Made:
    with transaction(session_factory) as session:
        if request.callback_url is not None:
            # Checked again where the scan is recorded: an allow-list changed since the
            # first check (made before any bytes were stored) is seen.
            _check_callback_in(session, request.callback_url, caller, policy)
        scan_ids: list[str] = []
        source_ids: list[int] = []
        for ref in request.objects:
            public_id = _new_scan_id()
            source, _ = repository.record_source(
                session,
                repository.SourceRef(
                    kind=SourceKind.HOOK,
                    ref_key=f"scan:{public_id}",
                    bucket=ref.bucket,
                    object_key=ref.key,
                    version_id=ref.version_id,
                    submitted_by=caller.actor,
                ),
                None,
            )
            repository.add_scan(
                session,
                Scan(
                    public_id=public_id,
                    token_id=caller.token_id,
                    source_id=source.id,
                    external_id=request.external_id,
                    callback_url=request.callback_url,
                    priority=request.priority,
                ),
            )
            scan_ids.append(public_id)
            source_ids.append(source.id)
        if idempotency_key is not None and caller.token_id is not None:
            repository.add_idempotency_key(
                session,
                IdempotencyKey(
                    token_id=caller.token_id,
                    key=idempotency_key,
                    request_sha256=digest,
                    scan_ids=scan_ids,
                ),
            )
        return _Made(scan_ids, source_ids)


def _replay(
    session_factory: sessionmaker[Session], token_id: int, key: str, digest: str
) -> Submitted | None:
    with session_factory() as session:
        seen = repository.idempotency_key(session, token_id, key)
        if seen is None:
            return None
        if seen.request_sha256 != digest:
            raise SubmissionRefused(
                422,
                "idempotency-key-reused",
                "this Idempotency-Key was used with another request body; use a new key",
            )
        return Submitted(scan_ids=list(seen.scan_ids), replayed=True)


def check_upload(data: bytes, limits: IntakeLimits) -> str:
    """The sha256 of posted image bytes, once they are known to be an image of a format the
    scanner reads and within the size limit (nothing is written before)."""
    if not data:
        raise SubmissionRefused(422, "empty-upload", "the uploaded file is empty")
    if len(data) > limits.max_bytes:
        raise SubmissionRefused(
            413, "upload-too-large", f"an image is at most {limits.max_bytes} bytes"
        )
    fmt = sniff(data[:SNIFF_BYTES])
    if fmt not in SUPPORTED_FORMATS:
        what = f"a {fmt} file" if fmt else "not an image this service recognises"
        raise SubmissionRefused(
            415,
            "unsupported-media-type",
            f"the upload is {what}; supported: {', '.join(sorted(SUPPORTED_FORMATS))}",
        )
    return hashlib.sha256(data).hexdigest()


def upload_ref(policy: SubmitPolicy, sha256: str) -> ObjectRef:
    """Where posted bytes are stored: addressed by content, so the same bytes posted twice
    are one object."""
    return ObjectRef(
        bucket=policy.upload_bucket, key=f"{policy.upload_prefix}{sha256[:2]}/{sha256}"
    )


def store_upload(
    store: ObjectStore, ref: ObjectRef, data: bytes, *, content_type: str | None = None
) -> None:
    params: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key, "Body": data}
    if content_type:
        params["ContentType"] = content_type
    store.put_object(**params)


# --- reading -----------------------------------------------------------------------------

LIST_LIMIT = 100


class ScanNotFound(LookupError):
    """No such scan, or not one the reader may see (answered alike)."""


def scan_document(session: Session, scan: Scan, *, active_ensemble: str) -> dict[str, Any]:
    """What a platform reads of one scan: the result exactly as ``scan --json`` prints it
    (``review`` included), plus the scan's own fields, the review state, the moderator's
    decision apart from the flag (``decision``), every detector's version, and what a flag
    means (``notice``)."""
    source = repository.get_source(session, scan.source_id)
    assert source is not None  # a scan's source is never deleted
    path = f"s3://{source.bucket}/{source.object_key}"
    outcome = results.source_outcome(session, source, path, active_ensemble=active_ensemble)
    case = repository.case_for_image(session, source.image_id) if source.image_id else None
    decision = None
    if case is not None and case.decision is not None:
        decided_at = case.decided_at.isoformat() if case.decided_at else None
        decision = {"label": case.decision.value, "decided_at": decided_at}
    document = outcome.to_json()
    document.update(
        {
            "id": scan.public_id,
            "external_id": scan.external_id,
            "object": {
                "bucket": source.bucket,
                "key": source.object_key,
                "version_id": source.version_id,
            },
            "priority": scan.priority.value,
            "submitted_at": scan.created_at.isoformat(),
            "finished": source.status != SourceStatus.PENDING,
            "review_state": case.state.value if case is not None else "none",
            "decision": decision,
            "detector_versions": {d.name: d.version for d in outcome.detectors},
            "notice": NOTICE,
            "links": {"self": f"/v1/scans/{scan.public_id}"},
        }
    )
    return document


@dataclass(frozen=True)
class Reader:
    """Who reads: a platform sees the scans it submitted (``token_id``), an operator all
    (``token_id`` None)."""

    token_id: int | None


def read_scan(
    session_factory: sessionmaker[Session], public_id: str, reader: Reader, *, active_ensemble: str
) -> dict[str, Any]:
    """One scan's document; raises ScanNotFound for one that does not exist and for one the
    reader may not see alike (so ids cannot be probed)."""
    with session_factory() as session:
        scan = repository.scan_by_public_id(session, public_id)
        if scan is None or (reader.token_id is not None and scan.token_id != reader.token_id):
            raise ScanNotFound(f"no scan {public_id!r}")
        return scan_document(session, scan, active_ensemble=active_ensemble)


def find_scans(
    session_factory: sessionmaker[Session],
    reader: Reader,
    *,
    active_ensemble: str,
    external_id: str | None = None,
    object_ref: ObjectRef | None = None,
    sha256: str | None = None,
) -> list[dict[str, Any]]:
    """The newest scans (at most ``LIST_LIMIT``) the reader may see, by exactly one of: the
    platform's own id, an object, the bytes' sha256."""
    with session_factory() as session:
        if external_id is not None:
            found = repository.scans_by_external_id(
                session, external_id, token_id=reader.token_id, limit=LIST_LIMIT
            )
        elif object_ref is not None:
            found = repository.scans_of_object(
                session,
                object_ref.bucket,
                object_ref.key,
                token_id=reader.token_id,
                limit=LIST_LIMIT,
            )
        elif sha256 is not None:
            found = repository.scans_of_image(
                session, sha256, token_id=reader.token_id, limit=LIST_LIMIT
            )
        else:
            raise ValueError("name an external id, an object or a sha256")
        return [scan_document(session, scan, active_ensemble=active_ensemble) for scan in found]
