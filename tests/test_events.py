"""S3 upload events from every route: AWS S3 -> SQS, SNS, EventBridge and MinIO payloads.

Payload shapes follow the published examples: AWS "Event message structure" and
"EventBridge event message structure" pages, and MinIO's ``ToEvent`` (key escaped with
``url.QueryEscape``, ``eventName`` with an ``s3:`` prefix, top-level ``EventName``/``Key``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from workers.events import (
    MAX_JSON_DEPTH,
    BucketPolicy,
    InvalidRecord,
    MalformedEvent,
    TooManyRecords,
    UploadRecord,
    parse_s3_event,
    parse_s3_notification,
)


def aws_record(
    key: str,
    *,
    bucket: str = "uploads",
    event_name: str = "ObjectCreated:Put",
    version_id: str | None = None,
    etag: str | None = "0123456789abcdef0123456789abcdef",
    sequencer: str | None = "0A1B2C3D4E5F678901",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": 1024}
    if etag is not None:
        obj["eTag"] = etag
    if version_id is not None:
        obj["versionId"] = version_id
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2024-05-01T12:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.9"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "synthsentry-uploads",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }


def aws_event(*records: dict[str, Any]) -> str:
    return json.dumps({"Records": list(records)})


def test_aws_record_key_is_url_decoded() -> None:
    uploads = parse_s3_event(aws_event(aws_record("incoming/red+flower.jpg")))
    assert uploads == [
        UploadRecord(
            bucket="uploads",
            key="incoming/red flower.jpg",
            size=1024,
            etag="0123456789abcdef0123456789abcdef",
            version_id=None,
            sequencer="0A1B2C3D4E5F678901",
            event_name="ObjectCreated:Put",
            event_time="2024-05-01T12:00:00.000Z",
        )
    ]


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("c%2B%2B+notes.png", "c++ notes.png"),
        ("a%2Fb%3D1%2Fphoto%281%29.jpg", "a/b=1/photo(1).jpg"),
        ("caf%C3%A9.jpg", "café.jpg"),
        ("100%25.jpg", "100%.jpg"),
    ],
)
def test_aws_key_decoding(encoded: str, key: str) -> None:
    assert parse_s3_event(aws_event(aws_record(encoded)))[0].key == key


def test_accepts_bytes_str_and_mapping() -> None:
    document = {"Records": [aws_record("a.jpg")]}
    text = json.dumps(document)
    assert parse_s3_event(text) == parse_s3_event(text.encode()) == parse_s3_event(document)


def test_several_records_in_one_event() -> None:
    uploads = parse_s3_event(aws_event(aws_record("a.jpg"), aws_record("b.jpg")))
    assert [u.key for u in uploads] == ["a.jpg", "b.jpg"]


def test_test_event_announces_nothing() -> None:
    payload = json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2024-05-01T12:00:00.000Z",
            "Bucket": "uploads",
            "RequestId": "5582815E1AEA5ADF",
            "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
        }
    )
    assert parse_s3_event(payload) == []
    assert parse_s3_notification(payload).is_test_event


def test_object_removed_records_are_skipped_and_reported() -> None:
    payload = aws_event(
        aws_record("gone.jpg", event_name="ObjectRemoved:Delete", etag=None),
        aws_record("new.jpg", event_name="ObjectCreated:CompleteMultipartUpload"),
    )
    notification = parse_s3_notification(payload)
    assert [u.key for u in notification.uploads] == ["new.jpg"]
    assert notification.uploads[0].event_name == "ObjectCreated:CompleteMultipartUpload"
    assert notification.ignored_events == ("ObjectRemoved:Delete",)
    assert not notification.is_test_event


def test_sns_envelope_is_unwrapped() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
        "Subject": "Amazon S3 Notification",
        "Message": aws_event(aws_record("sns/red+flower.jpg")),
        "Timestamp": "2024-05-01T12:00:01.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }
    assert [u.key for u in parse_s3_event(json.dumps(envelope))] == ["sns/red flower.jpg"]


def test_sns_wrapped_test_event() -> None:
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "x"})
    envelope = {"Type": "Notification", "MessageId": "1", "Message": test_event}
    assert parse_s3_notification(envelope).is_test_event


def test_sns_subscription_confirmation_is_malformed() -> None:
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37",
        "Message": "You have chosen to subscribe to the topic ...",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
    }
    with pytest.raises(MalformedEvent, match="SubscriptionConfirmation"):
        parse_s3_event(json.dumps(confirmation))


def eventbridge_event(detail_type: str = "Object Created", **object_fields: Any) -> str:
    obj = {
        "key": "incoming/red flower+1.jpg",
        "size": 5,
        "etag": "b1946ac92492d2347c6235b4d2611184",
        "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
        "sequencer": "617f08299329d189",
        **object_fields,
    }
    return json.dumps(
        {
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": detail_type,
            "source": "aws.s3",
            "account": "111122223333",
            "time": "2021-11-12T00:00:00Z",
            "region": "ca-central-1",
            "resources": ["arn:aws:s3:::media"],
            "detail": {
                "version": "0",
                "bucket": {"name": "media"},
                "object": obj,
                "request-id": "N4N7GDK58NMKJ12R",
                "requester": "123456789012",
                "source-ip-address": "1.2.3.4",
                "reason": "PutObject",
            },
        }
    )


def test_eventbridge_object_created() -> None:
    assert parse_s3_event(eventbridge_event()) == [
        UploadRecord(
            bucket="media",
            # EventBridge keys are taken as they come: no '+' -> ' ' decoding.
            key="incoming/red flower+1.jpg",
            size=5,
            etag="b1946ac92492d2347c6235b4d2611184",
            version_id="IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
            sequencer="617f08299329d189",
            event_name="ObjectCreated:Put",
            event_time="2021-11-12T00:00:00Z",
        )
    ]


def test_eventbridge_object_deleted_is_ignored() -> None:
    notification = parse_s3_notification(eventbridge_event("Object Deleted"))
    assert notification.uploads == ()
    assert notification.ignored_events == ("Object Deleted",)


def test_eventbridge_from_another_source_is_malformed() -> None:
    payload = json.dumps({"source": "aws.ec2", "detail-type": "EC2 Instance State", "detail": {}})
    with pytest.raises(MalformedEvent, match=r"not aws\.s3"):
        parse_s3_event(payload)


def minio_event(event_name: str, key: str, escaped_key: str) -> str:
    # What MinIO's webhook target posts (cmd/event-notification.go ToEvent(escape=true)).
    return json.dumps(
        {
            "EventName": event_name,
            "Key": f"photos/{key}",
            "Records": [
                {
                    "eventVersion": "2.0",
                    "eventSource": "minio:s3",
                    "awsRegion": "",
                    "eventTime": "2024-05-01T12:00:00.123Z",
                    "eventName": event_name,
                    "userIdentity": {"principalId": "minioadmin"},
                    "requestParameters": {
                        "principalId": "minioadmin",
                        "region": "",
                        "sourceIPAddress": "172.18.0.1",
                    },
                    "responseElements": {
                        "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf3",
                        "x-amz-request-id": "17CE1E9B0A2F2A43",
                        "x-minio-deployment-id": "f1d0e7a6-1c2b-4f3a-9a8e-2b1d3c4e5f60",
                        "x-minio-origin-endpoint": "http://172.18.0.2:9000",
                    },
                    "s3": {
                        "s3SchemaVersion": "1.0",
                        "configurationId": "Config",
                        "bucket": {
                            "name": "photos",
                            "ownerIdentity": {"principalId": "minioadmin"},
                            "arn": "arn:aws:s3:::photos",
                        },
                        "object": {
                            "key": escaped_key,
                            "size": 224662,
                            "eTag": "5fc7298143efe1276d39a3466d4e255f",
                            "contentType": "image/jpeg",
                            "userMetadata": {"content-type": "image/jpeg"},
                            "sequencer": "17CE1E9B0A4D6C1B",
                        },
                    },
                    "source": {"host": "172.18.0.1", "port": "", "userAgent": "MinIO (linux)"},
                }
            ],
        }
    )


def test_minio_webhook_payload() -> None:
    # Go's url.QueryEscape("in/my summer+(2024).jpg")
    payload = minio_event(
        "s3:ObjectCreated:Put", "in/my summer+(2024).jpg", "in%2Fmy+summer%2B%282024%29.jpg"
    )
    [upload] = parse_s3_event(payload)
    assert upload.bucket == "photos"
    assert upload.key == "in/my summer+(2024).jpg"
    assert upload.event_name == "ObjectCreated:Put"
    assert upload.version_id is None  # unversioned bucket: MinIO leaves versionId out
    assert (
        upload.ref_key() == "photos/in/my summer+(2024).jpg@etag:5fc7298143efe1276d39a3466d4e255f"
    )


def test_minio_delete_is_ignored() -> None:
    notification = parse_s3_notification(minio_event("s3:ObjectRemoved:Delete", "a.jpg", "a.jpg"))
    assert notification.uploads == ()
    assert notification.ignored_events == ("ObjectRemoved:Delete",)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe not utf-8", "not UTF-8"),
        ("", "not JSON"),
        ("{'Records': []}", "not JSON"),
        ("<xml/>", "not JSON"),
        ("[1, 2]", "JSON list"),
        ("{}", "not an S3 event notification"),
        ('{"hello": "world"}', "not an S3 event notification"),
        ('{"Records": {}}', "Records is not a list"),
        ('{"Records": []}', "Records is empty"),
        ('{"Records": ["x"]}', r"Records\[0\] is not an object"),
        ('{"Records": [{"s3": {}}]}', r"Records\[0\]\.eventName"),
        ('{"Type": "Notification", "Message": "not json"}', "not JSON"),
        ('{"Type": "Notification", "Message": {"Records": []}}', "Message is not a string"),
    ],
)
def test_malformed_payloads(payload: str | bytes, message: str) -> None:
    with pytest.raises(MalformedEvent, match=message):
        parse_s3_event(payload)


def _without(record: dict[str, Any], *path: str) -> dict[str, Any]:
    node = record
    for name in path[:-1]:
        node = node[name]
    del node[path[-1]]
    return record


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("s3", "bucket", "name"), r"Records\[0\]\.s3\.bucket\.name"),
        (("s3", "bucket"), r"Records\[0\]\.s3\.bucket is missing"),
        (("s3", "object", "key"), r"Records\[0\]\.s3\.object\.key"),
        (("s3",), r"Records\[0\]\.s3 is missing"),
    ],
)
def test_missing_required_fields(path: tuple[str, ...], message: str) -> None:
    record = _without(aws_record("a.jpg"), *path)
    with pytest.raises(MalformedEvent, match=message):
        parse_s3_event(aws_event(record))


def test_a_bad_record_is_reported_beside_the_good_ones() -> None:
    bad = _without(aws_record("b.jpg"), "s3", "bucket", "name")
    payload = aws_event(aws_record("a.jpg"), bad, "not a record", aws_record("c.jpg"))
    notification = parse_s3_notification(payload)
    assert notification.numbered_uploads() == [
        (0, parse_s3_event(aws_event(aws_record("a.jpg")))[0]),
        (3, parse_s3_event(aws_event(aws_record("c.jpg")))[0]),
    ]
    assert notification.invalid_records == (
        InvalidRecord(
            index=1,
            reason="Records[1].s3.bucket.name is missing or not a non-empty string",
            record=json.dumps(bad),
        ),
        InvalidRecord(index=2, reason="Records[2] is not an object", record='"not a record"'),
    )
    # The list-of-uploads shorthand refuses such a payload rather than drop records quietly.
    with pytest.raises(MalformedEvent, match=r"Records\[1\]"):
        parse_s3_event(payload)


def _invalid_reason(record: dict[str, Any]) -> str:
    notification = parse_s3_notification(aws_event(aws_record("good.jpg"), record))
    assert [u.key for u in notification.uploads] == ["good.jpg"]
    (invalid,) = notification.invalid_records
    assert invalid.index == 1
    # Kept as ASCII JSON: storable and printable whatever the record held.
    assert json.loads(invalid.record) == record
    invalid.record.encode("ascii")
    return invalid.reason


@pytest.mark.parametrize(
    ("key", "message"),
    [
        # A UTF-16 surrogate encoded as if it were UTF-8: unquote_plus would make it U+FFFD
        # (or, with surrogateescape, a lone surrogate); neither names an object.
        ("bad%ED%A0%80key.jpg", "not UTF-8 once URL-decoded"),
        ("%FF.jpg", "not UTF-8 once URL-decoded"),
        ("bad\ud800key.jpg", "not valid Unicode"),  # a lone surrogate straight from JSON
        ("nul%00.jpg", "NUL character"),
        ("k" * 1025, "1025 bytes of UTF-8; S3 keys are at most 1024"),
        ("%C3%A9" * 513, "1026 bytes of UTF-8"),
        ("", "missing or not a non-empty string"),
    ],
)
def test_keys_no_object_can_have_are_invalid(key: str, message: str) -> None:
    assert message in _invalid_reason(aws_record(key))


def test_longest_key_is_accepted() -> None:
    [upload] = parse_s3_event(aws_event(aws_record("%C3%A9" * 512)))
    assert len(upload.key.encode()) == 1024


def test_keys_with_dot_segments_are_taken_verbatim() -> None:
    # An S3 key is a name, not a path: nothing normalises it (or joins it to a local path).
    [upload] = parse_s3_event(aws_event(aws_record("..%2F..%2Fetc%2Fpasswd")))
    assert upload.key == "../../etc/passwd"


@pytest.mark.parametrize(
    "bucket", ["Uploads", "ab", "a" * 64, "under_score", "-uploads", "uploads\ud800"]
)
def test_bucket_names_s3_refuses_are_invalid(bucket: str) -> None:
    assert "s3.bucket" in _invalid_reason(aws_record("a.jpg", bucket=bucket))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eTag", "e" * 129, "eTag is longer than 128 characters"),
        ("versionId", "v" * 256, "versionId is longer than 255 characters"),
        ("sequencer", "0" * 129, "sequencer is longer than 128 characters"),
        ("eTag", "bad\udc80", "eTag is not valid Unicode"),
        ("size", -1, "size is not a non-negative integer"),
        ("size", True, "size is not a non-negative integer"),
    ],
)
def test_bad_object_fields_are_invalid(field: str, value: Any, message: str) -> None:
    record = aws_record("a.jpg")
    record["s3"]["object"][field] = value
    assert message in _invalid_reason(record)


def test_bad_eventbridge_object_is_an_invalid_record() -> None:
    payload = json.loads(eventbridge_event(key="k" * 2000))
    notification = parse_s3_notification(payload)
    assert notification.uploads == ()
    (invalid,) = notification.invalid_records
    assert invalid.index == 0
    assert "detail.object.key is 2000 bytes" in invalid.reason
    assert json.loads(invalid.record) == payload


def _nested(depth: int) -> str:
    # Records is one level; each further list one more.
    return '{"Records": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_nesting_up_to_the_limit_is_decoded() -> None:
    (invalid,) = parse_s3_notification(_nested(MAX_JSON_DEPTH)).invalid_records
    assert invalid.reason == "Records[0] is not an object"


@pytest.mark.parametrize(
    "payload",
    [
        _nested(MAX_JSON_DEPTH + 1),
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        "[" * 100_000,  # unbalanced: refused by depth before the decoder sees it
        json.dumps({"Type": "Notification", "Message": "[" * 100_000}),  # inside SNS
    ],
)
def test_deep_nesting_is_refused_before_decoding(payload: str) -> None:
    with pytest.raises(MalformedEvent, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        parse_s3_notification(payload.encode())


def test_brackets_inside_strings_do_not_count() -> None:
    key = "[" * 500 + '\\"{' * 100
    [upload] = parse_s3_event(aws_event(aws_record(key.replace("%", "%25"))))
    assert upload.key == key


def test_record_cap() -> None:
    payload = aws_event(*(aws_record(f"{i}.jpg") for i in range(6)))
    assert len(parse_s3_notification(payload, max_records=6).uploads) == 6
    with pytest.raises(TooManyRecords, match="6 records; at most 5") as caught:
        parse_s3_notification(payload, max_records=5)
    assert (caught.value.count, caught.value.limit) == (6, 5)


def test_size_as_string_is_accepted() -> None:
    # Ceph RGW's notifications carry the size as a string.
    record = aws_record("a.jpg")
    record["s3"]["object"]["size"] = "2048"
    assert parse_s3_event(aws_event(record))[0].size == 2048


def test_quoted_etag_is_unquoted() -> None:
    record = aws_record("a.jpg", etag='"9dd4e461268c8034f5c8564e155c67a6"')
    assert parse_s3_event(aws_event(record))[0].etag == "9dd4e461268c8034f5c8564e155c67a6"


def _upload(**fields: Any) -> UploadRecord:
    defaults: dict[str, Any] = {
        "bucket": "uploads",
        "key": "red flower.jpg",
        "size": 1,
        "etag": None,
        "version_id": None,
        "sequencer": None,
        "event_name": "ObjectCreated:Put",
        "event_time": None,
    }
    return UploadRecord(**{**defaults, **fields})


@pytest.mark.parametrize(
    ("fields", "ref_key"),
    [
        (
            {"version_id": "3HL4kqtJlcpXroDTDmJ", "etag": "abc", "sequencer": "0A"},
            "uploads/red flower.jpg@3HL4kqtJlcpXroDTDmJ",
        ),
        ({"etag": "abc", "sequencer": "0A"}, "uploads/red flower.jpg@etag:abc"),
        ({"sequencer": "0055AED6DCD90281E5"}, "uploads/red flower.jpg@seq:0055AED6DCD90281E5"),
        ({}, "uploads/red flower.jpg"),
    ],
)
def test_ref_key(fields: dict[str, Any], ref_key: str) -> None:
    assert _upload(**fields).ref_key() == ref_key


def test_null_version_id_falls_back_to_etag() -> None:
    # Writes while versioning is off/suspended all get version id "null": it tells none apart.
    record = aws_record("a.jpg", version_id="null", etag="abc")
    [upload] = parse_s3_event(aws_event(record))
    assert upload.version_id is None
    assert upload.ref_key() == "uploads/a.jpg@etag:abc"


def test_duplicate_deliveries_share_a_ref_key_and_overwrites_do_not() -> None:
    first = parse_s3_event(aws_event(aws_record("a.jpg", etag="aaa", sequencer="01")))[0]
    again = parse_s3_event(aws_event(aws_record("a.jpg", etag="aaa", sequencer="01")))[0]
    overwrite = parse_s3_event(aws_event(aws_record("a.jpg", etag="bbb", sequencer="02")))[0]
    assert first.ref_key() == again.ref_key()
    assert first.ref_key() != overwrite.ref_key()


def test_bucket_policy_parsing() -> None:
    policy = BucketPolicy.parse(" uploads, media:incoming/ ,media:hooks/,, ")
    assert policy.rules == frozenset({("uploads", ""), ("media", "incoming/"), ("media", "hooks/")})
    assert str(policy) == "media:hooks/,media:incoming/,uploads"
    assert BucketPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    ("bucket", "key", "allowed"),
    [
        ("uploads", "anything/at/all.jpg", True),
        ("media", "incoming/red flower.jpg", True),
        ("media", "hooks/x.png", True),
        ("media", "private/x.png", False),
        ("media", "incoming", False),  # the prefix is "incoming/", not "incoming"
        ("media", "Incoming/x.png", False),  # keys are case-sensitive
        ("other", "incoming/x.png", False),
        ("uploads-2", "x.png", False),  # no prefix matching on bucket names
    ],
)
def test_bucket_policy_allows(bucket: str, key: str, allowed: bool) -> None:
    policy = BucketPolicy.parse("uploads,media:incoming/,media:hooks/")
    assert policy.allows(_upload(bucket=bucket, key=key)) is allowed


def test_bare_bucket_wins_over_its_prefixes() -> None:
    policy = BucketPolicy.parse("media:incoming/,media")
    assert policy.allows(_upload(bucket="media", key="private/x.png"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "names no bucket"),
        (" , ", "names no bucket"),
        ("Uploads", "not a bucket name"),
        ("ab", "not a bucket name"),
        ("s3://uploads", "not a bucket name"),
        ("media:", "empty prefix"),
    ],
)
def test_bucket_policy_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketPolicy.parse(spec)
