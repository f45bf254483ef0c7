"""S3 upload events: turn a notification payload into the uploads it announces.

Pure functions, no I/O. One parser takes every route an upload event reaches us by:

- S3 -> SQS (or Lambda): ``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {...}}]}``,
  object keys URL-encoded the way HTML forms are ("red flower.jpg" arrives as
  ``red+flower.jpg``, a literal "+" as ``%2B``).
- S3 -> SNS -> SQS: the same document as a JSON string in ``Message`` of an SNS envelope
  (``{"Type": "Notification", "Message": "..."}``); raw message delivery needs no unwrapping.
- S3 -> EventBridge -> SQS: ``{"source": "aws.s3", "detail-type": "Object Created",
  "detail": {"bucket": {"name": ...}, "object": {"key": ...}}}``.
- MinIO webhook / queue targets: the ``Records`` document plus top-level ``EventName`` and
  ``Key`` (bucket/key, unescaped); the record's ``eventName`` carries an ``s3:`` prefix and
  its key is escaped with Go's ``url.QueryEscape``, which ``unquote_plus`` reverses.

Configuring a notification makes S3 send ``{"Event": "s3:TestEvent", ...}`` first; it
announces nothing. Anything else that is not one of these shapes raises
:class:`MalformedEvent`: a queue consumer keeps such a message for an operator rather than
guessing.

One payload can carry several records, and each stands on its own: a record no retry can
make usable (a field missing, a key that is not UTF-8 once decoded, an empty or over-long
key, a bucket name S3 would refuse) becomes an :class:`InvalidRecord` beside the good ones,
so a consumer takes in the good ones once and keeps the bad one for an operator, instead of
refusing (or retrying) the whole payload for one record. Every string a parsed upload
carries is valid Unicode without NUL: it can be stored, logged and written as JSON.

JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused before it is decoded (S3 events
are about six levels deep), so a hostile payload cannot exhaust the decoder's recursion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any
from urllib.parse import unquote_plus

TEST_EVENT = "s3:TestEvent"
UPLOAD_EVENT_PREFIX = "ObjectCreated:"

# An SNS envelope holds one S3 document; deeper nesting is not something S3 produces.
_MAX_ENVELOPE_DEPTH = 2

# Longest payload value quoted in a MalformedEvent message.
_MAX_QUOTED = 40

# Deepest JSON nesting accepted. An S3 record is six levels deep (Records, the record, s3,
# object, userMetadata); an SNS envelope carries its document as a string, checked apart.
MAX_JSON_DEPTH = 32

# S3's own limits: an object key is at most 1024 bytes of UTF-8. S3 ETags are 32 hex digits
# (plus "-<parts>" for multipart uploads) and version ids 32 characters; these bounds leave
# room for other S3-protocol stores and keep an identity (bucket/key@version) storable.
MAX_KEY_BYTES = 1024
_MAX_ETAG_CHARS = 128
_MAX_VERSION_CHARS = 255
_MAX_SEQUENCER_CHARS = 128

# A JSON string literal (an unterminated one runs to the end), and everything that is not a
# bracket: what the depth check skips.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}

# EventBridge names the API that created the object in detail.reason; the S3 -> SQS records
# name the same thing in eventName. One vocabulary downstream: the eventName one.
_EVENTBRIDGE_REASONS = {
    "PutObject": "ObjectCreated:Put",
    "POST Object": "ObjectCreated:Post",
    "CopyObject": "ObjectCreated:Copy",
    "CompleteMultipartUpload": "ObjectCreated:CompleteMultipartUpload",
}

# General purpose bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit.
BUCKET_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class MalformedEvent(ValueError):
    """A payload that is not an S3 event notification we understand; the message says why."""


class TooManyRecords(MalformedEvent):
    """A payload with more records than the consumer takes from one payload."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"the payload has {count} records; at most {limit} are taken at once")
        self.count = count
        self.limit = limit


@dataclass(frozen=True)
class UploadRecord:
    """One object created in a bucket, as an event announced it.

    ``key`` is the real object key (URL-decoded where the route encodes it); ``etag`` has no
    surrounding quotes; ``event_name`` uses the S3 -> SQS vocabulary (``ObjectCreated:Put``).
    """

    bucket: str
    key: str
    size: int | None
    etag: str | None
    version_id: str | None
    sequencer: str | None
    event_name: str
    event_time: str | None

    def ref_key(self) -> str:
        """The identity of this upload, for de-duplication.

        S3 delivers events at least once and in no particular order, so the same upload can
        arrive twice (and SNS, EventBridge or an SQS redelivery can add more copies). Copies of
        one event carry the same bucket, key, version id, ETag and sequencer; what tells two
        *different* uploads of one key apart is, from most to least precise:

        - the version id (versioned buckets: every write gets a new one),
        - the ETag (a content digest: an overwrite with other bytes changes it; an overwrite
          with the same bytes does not, and is rightly the same upload for scoring),
        - the sequencer (hex, grows with each event on one key; duplicates share it),
        - nothing: bare ``bucket/key``, which folds every write of the key into one.

        A created object always has an ETag on AWS and MinIO, so the bare form only appears
        for hand-made payloads.
        """
        base = f"{self.bucket}/{self.key}"
        if self.version_id:
            return f"{base}@{self.version_id}"
        if self.etag:
            return f"{base}@etag:{self.etag}"
        if self.sequencer:
            return f"{base}@seq:{self.sequencer}"
        return base


@dataclass(frozen=True)
class InvalidRecord:
    """A record of a payload that no retry can make usable, and why.

    ``index`` is its place in ``Records`` (0 for an EventBridge event); ``record`` is the
    record as JSON with every non-ASCII character escaped, so that it can be kept (a dead
    letter) whatever it holds, lone surrogates and NUL included.
    """

    index: int
    reason: str
    record: str


@dataclass(frozen=True)
class S3Notification:
    """Everything one payload says: its uploads, the other events it carried, the records it
    could not use, or a test event.

    ``ignored_events`` holds the event names of records that are not uploads
    (``ObjectRemoved:Delete``, EventBridge ``Object Deleted`` ...), so a consumer can count
    them; they need no work. ``upload_indexes`` gives each upload's place in ``Records``.
    """

    uploads: tuple[UploadRecord, ...] = ()
    ignored_events: tuple[str, ...] = ()
    is_test_event: bool = False
    invalid_records: tuple[InvalidRecord, ...] = ()
    upload_indexes: tuple[int, ...] = ()

    def numbered_uploads(self) -> list[tuple[int, UploadRecord]]:
        """``(index in Records, upload)`` for every upload, in payload order."""
        indexes = self.upload_indexes or tuple(range(len(self.uploads)))
        return list(zip(indexes, self.uploads, strict=True))


def parse_s3_event(payload: bytes | str | Mapping[str, Any]) -> list[UploadRecord]:
    """The uploads a notification announces: ``[]`` for a test event or only non-upload records.

    Raises :class:`MalformedEvent` for anything that is not an S3 event notification, and for
    a payload with any invalid record. Use :func:`parse_s3_notification` to take the good
    records of a payload that also has bad ones, or to tell a test event from skipped records.
    """
    notification = parse_s3_notification(payload)
    if notification.invalid_records:
        raise MalformedEvent(notification.invalid_records[0].reason)
    return list(notification.uploads)


def parse_s3_notification(
    payload: bytes | str | Mapping[str, Any], *, max_records: int | None = None
) -> S3Notification:
    """Parse any supported route's payload (see the module docstring) into uploads.

    Raises :class:`MalformedEvent` when the payload as a whole is unusable, and
    :class:`TooManyRecords` when it has more than ``max_records`` records (None: no limit);
    a bad record among others is reported in ``invalid_records`` instead.
    """
    return _parse_document(_load(payload), depth=0, max_records=max_records)


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`MalformedEvent` when ``text`` nests arrays and objects deeper than
    ``limit``: one linear pass over the brackets outside string literals, before a decoder
    recurses into them. Unbalanced brackets are left for the decoder to report."""
    structure = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    deepest = max(accumulate(map(_BRACKET_STEP.__getitem__, structure)), default=0)
    if deepest > limit:
        raise MalformedEvent(f"payload nests JSON deeper than {limit} levels")


def _load(payload: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(payload, Mapping):
        return payload
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEvent(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    check_json_depth(payload)
    try:
        document = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedEvent(f"payload is not JSON: {exc.msg} at char {exc.pos}") from exc
    if not isinstance(document, Mapping):
        raise MalformedEvent(f"payload is a JSON {type(document).__name__}, not an object")
    return document


def _parse_document(
    document: Mapping[str, Any], *, depth: int, max_records: int | None
) -> S3Notification:
    if document.get("Event") == TEST_EVENT:
        return S3Notification(is_test_event=True)
    if "Records" in document:
        return _parse_records(document["Records"], max_records)
    if document.get("source") == "aws.s3" and "detail" in document:
        return _parse_eventbridge(document)
    sns_type = document.get("Type")
    if sns_type == "Notification" and "Message" in document:
        if depth >= _MAX_ENVELOPE_DEPTH:
            raise MalformedEvent("SNS envelopes nested too deep")
        message = document["Message"]
        if not isinstance(message, str):
            raise MalformedEvent("SNS Message is not a string")
        return _parse_document(_load(message), depth=depth + 1, max_records=max_records)
    if isinstance(sns_type, str):
        # SubscriptionConfirmation and friends: an operator has to act on those.
        raise MalformedEvent(f"SNS {_brief(sns_type)} message, not an S3 event notification")
    if "source" in document and "detail-type" in document:
        raise MalformedEvent(f"EventBridge event from {_brief(document.get('source'))}, not aws.s3")
    raise MalformedEvent(
        "not an S3 event notification (top-level fields: "
        f"{', '.join(_brief(name) for name in sorted(map(str, document))[:8])})"
    )


def _parse_records(records: Any, max_records: int | None) -> S3Notification:
    if not isinstance(records, Sequence) or isinstance(records, str | bytes):
        raise MalformedEvent("Records is not a list")
    if not records:
        raise MalformedEvent("Records is empty")
    if max_records is not None and len(records) > max_records:
        raise TooManyRecords(len(records), max_records)
    uploads: list[UploadRecord] = []
    indexes: list[int] = []
    ignored: list[str] = []
    invalid: list[InvalidRecord] = []
    for index, record in enumerate(records):
        where = f"Records[{index}]"
        try:
            if not isinstance(record, Mapping):
                raise MalformedEvent(f"{where} is not an object")
            # MinIO writes "s3:ObjectCreated:Put" where AWS writes "ObjectCreated:Put".
            event_name = _require_str(record, "eventName", where).removeprefix("s3:")
            if not event_name.startswith(UPLOAD_EVENT_PREFIX):
                ignored.append(event_name)
                continue
            uploads.append(_parse_record(record, event_name, where))
            indexes.append(index)
        except MalformedEvent as exc:
            invalid.append(InvalidRecord(index=index, reason=str(exc), record=_as_json(record)))
    return S3Notification(
        uploads=tuple(uploads),
        ignored_events=tuple(ignored),
        invalid_records=tuple(invalid),
        upload_indexes=tuple(indexes),
    )


def _parse_record(record: Mapping[str, Any], event_name: str, where: str) -> UploadRecord:
    s3 = _require_mapping(record, "s3", where)
    obj = _require_mapping(s3, "object", f"{where}.s3")
    return UploadRecord(
        bucket=_bucket_name(
            _require_mapping(s3, "bucket", f"{where}.s3"), "name", f"{where}.s3.bucket"
        ),
        key=_object_key(obj, "key", f"{where}.s3.object", url_encoded=True),
        size=_optional_size(obj, "size", f"{where}.s3.object"),
        etag=_optional_etag(obj.get("eTag"), f"{where}.s3.object.eTag"),
        version_id=_optional_version(obj.get("versionId"), f"{where}.s3.object.versionId"),
        sequencer=_optional_str(
            obj.get("sequencer"), f"{where}.s3.object.sequencer", limit=_MAX_SEQUENCER_CHARS
        ),
        event_name=event_name,
        event_time=_optional_str(record.get("eventTime"), f"{where}.eventTime"),
    )


def _parse_eventbridge(document: Mapping[str, Any]) -> S3Notification:
    detail_type = _require_str(document, "detail-type", "EventBridge event")
    if detail_type != "Object Created":
        return S3Notification(ignored_events=(detail_type,))
    try:
        upload = _parse_eventbridge_upload(document)
    except MalformedEvent as exc:
        invalid = InvalidRecord(index=0, reason=str(exc), record=_as_json(document))
        return S3Notification(invalid_records=(invalid,))
    return S3Notification(uploads=(upload,), upload_indexes=(0,))


def _parse_eventbridge_upload(document: Mapping[str, Any]) -> UploadRecord:
    detail = _require_mapping(document, "detail", "EventBridge event")
    obj = _require_mapping(detail, "object", "detail")
    reason = _optional_str(detail.get("reason"), "detail.reason")
    event_name = _EVENTBRIDGE_REASONS.get(reason or "", f"{UPLOAD_EVENT_PREFIX}{reason or '*'}")
    return UploadRecord(
        bucket=_bucket_name(_require_mapping(detail, "bucket", "detail"), "name", "detail.bucket"),
        # Taken as is: AWS documents URL-encoding for the S3 -> SQS/SNS/Lambda records only,
        # and moto sends EventBridge keys raw. (AWS Powertools and Data Prepper decode this
        # key anyway; not verified against real S3 here.)
        key=_object_key(obj, "key", "detail.object", url_encoded=False),
        size=_optional_size(obj, "size", "detail.object"),
        # AWS spells it "etag" here; moto spells it "eTag" as in the SQS records.
        etag=_optional_etag(obj.get("etag", obj.get("eTag")), "detail.object.etag"),
        version_id=_optional_version(obj.get("version-id"), "detail.object.version-id"),
        sequencer=_optional_str(
            obj.get("sequencer"), "detail.object.sequencer", limit=_MAX_SEQUENCER_CHARS
        ),
        event_name=event_name,
        event_time=_optional_str(document.get("time"), "time"),
    )


def _as_json(value: Any) -> str:
    # ensure_ascii escapes lone surrogates and control characters, so this always stores.
    return json.dumps(value, ensure_ascii=True)


def _require_mapping(parent: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = parent.get(name)
    if not isinstance(value, Mapping):
        raise MalformedEvent(f"{where}.{name} is missing or not an object")
    return value


def _require_str(parent: Mapping[str, Any], name: str, where: str) -> str:
    value = parent.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{where}.{name} is missing or not a non-empty string")
    return _text(value, f"{where}.{name}")


def _text(value: str, where: str, *, limit: int | None = None) -> str:
    # A lone surrogate (JSON allows "\ud800") cannot be encoded, and PostgreSQL text cannot
    # hold NUL: refused here, such a value would fail wherever it is stored or logged.
    if not _is_unicode(value):
        raise MalformedEvent(f"{where} is not valid Unicode: {_brief(value)}")
    if "\x00" in value:
        raise MalformedEvent(f"{where} contains a NUL character: {_brief(value)}")
    if limit is not None and len(value) > limit:
        raise MalformedEvent(f"{where} is longer than {limit} characters: {_brief(value)}")
    return value


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bucket_name(parent: Mapping[str, Any], name: str, where: str) -> str:
    bucket = _require_str(parent, name, where)
    if not BUCKET_NAME_PATTERN.fullmatch(bucket):
        raise MalformedEvent(f"{where}.{name} is not a bucket name: {_brief(bucket)}")
    return bucket


def _object_key(parent: Mapping[str, Any], name: str, where: str, *, url_encoded: bool) -> str:
    raw = _require_str(parent, name, where)
    key = raw
    if url_encoded:
        try:
            # Strict: replacing bad bytes with U+FFFD would name an object that does not exist.
            key = unquote_plus(raw, errors="strict")
        except UnicodeDecodeError:
            raise MalformedEvent(
                f"{where}.{name} is not UTF-8 once URL-decoded: {_brief(raw)}"
            ) from None
        if not key:
            raise MalformedEvent(f"{where}.{name} is empty once URL-decoded")
        _text(key, f"{where}.{name}")
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise MalformedEvent(
            f"{where}.{name} is {size} bytes of UTF-8; S3 keys are at most {MAX_KEY_BYTES}"
        )
    return key


def _optional_str(value: Any, where: str, *, limit: int | None = None) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return _text(value, where, limit=limit)


def _optional_etag(value: Any, where: str) -> str | None:
    etag = _optional_str(value, where, limit=_MAX_ETAG_CHARS)
    if etag is None:
        return None
    return etag.strip('"') or None


def _optional_version(value: Any, where: str) -> str | None:
    # "null" is the version id S3 gives objects written while versioning is off or
    # suspended: every such write shares it, so it identifies nothing.
    version = _optional_str(value, where, limit=_MAX_VERSION_CHARS)
    return None if version == "null" else version


def _optional_size(parent: Mapping[str, Any], name: str, where: str) -> int | None:
    value = parent.get(name)
    if value is None:
        return None
    # Ceph RGW sends the size as a string; bool is an int to Python but not a size.
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MalformedEvent(f"{where}.{name} is not a non-negative integer: {_brief(value)}")


def _brief(value: Any) -> str:
    # Reasons are logged and shown to operators: quote payload values, never at length (a
    # hostile or broken payload can put anything there, presigned URLs included).
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else f"{text[: _MAX_QUOTED - 3]}..."


@dataclass(frozen=True)
class BucketPolicy:
    """Which buckets (and, optionally, which key prefixes in them) this deployment scans.

    Parsed from ``"uploads,media:incoming/,media:hooks/"``: every key in ``uploads``, keys
    under ``incoming/`` or ``hooks/`` in ``media``. A bucket listed alone allows all its keys
    even if it is also listed with prefixes. Prefixes match the decoded key.
    """

    rules: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, spec: str) -> BucketPolicy:
        rules: set[tuple[str, str]] = set()
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            bucket, sep, prefix = entry.partition(":")
            bucket = bucket.strip()
            if not BUCKET_NAME_PATTERN.fullmatch(bucket):
                raise ValueError(f"bucket policy entry {entry!r}: {bucket!r} is not a bucket name")
            if sep and not prefix:
                raise ValueError(
                    f"bucket policy entry {entry!r} has an empty prefix; "
                    "list the bucket alone to allow all of it"
                )
            rules.add((bucket, prefix))
        if not rules:
            raise ValueError("bucket policy names no bucket")
        return cls(frozenset(rules))

    def allows(self, record: UploadRecord) -> bool:
        return self.permits(record.bucket, record.key)

    def permits(self, bucket: str, key: str) -> bool:
        return any(bucket == allowed and key.startswith(prefix) for allowed, prefix in self.rules)

    def __str__(self) -> str:
        return ",".join(
            f"{bucket}:{prefix}" if prefix else bucket for bucket, prefix in sorted(self.rules)
        )
