"""Data access: the only package that builds queries, one module per aggregate.

    images        content addressed by sha256, and the row lock that serialises a verdict
    sources       where each image came from; rejections; pending work
    detections    each detector's answer per image and detector version
    verdicts      ensemble configurations and the verdicts stored under them
    review        review cases following the verdicts; the case beside its verdicts
    audit         the append-only trail
    bookkeeping   the fleet's delivery attempts and dead letters

Every write that an event, a retry or a re-run can repeat is an idempotent insert keyed by
a unique constraint (``INSERT ... ON CONFLICT DO NOTHING`` on Postgres and SQLite), so
doing it twice leaves one row. Callers import the functions from here.
"""

from db.repository._sql import count_rows
from db.repository.audit import append_audit, audit_trail
from db.repository.bookkeeping import attempts_so_far, count_attempt, record_dead_letter
from db.repository.detections import (
    DetectionRecord,
    current_versions,
    detections_by_version,
    detections_for_image,
    latest_detections,
    reusable_detections,
    save_detection,
)
from db.repository.images import (
    ImageFacts,
    get_image,
    get_or_create_image,
    image_by_sha256,
    lock_image,
    lock_images,
)
from db.repository.review import case_for_image, follow_verdict
from db.repository.scans import (
    add_idempotency_key,
    add_scan,
    idempotency_key,
    scan_by_public_id,
    scans_by_external_id,
    scans_by_public_ids,
    scans_of_image,
    scans_of_object,
)
from db.repository.sources import (
    SourceRef,
    StoredObject,
    attach_image,
    get_source,
    mark_pending_sources_scored,
    mark_resent,
    mark_source_rejected,
    mark_source_scored,
    objects_of_image,
    record_source,
    source_by_ref,
    sources_by_object,
    sources_for_image,
    stalled_sources,
    stored_object,
)
from db.repository.tokens import (
    TokenRecord,
    add_token,
    list_tokens,
    revoke_token,
    token_by_public_id,
)
from db.repository.verdicts import (
    CaseVerdicts,
    EnsembleRecord,
    EnsembleVersionClash,
    VerdictRecord,
    current_verdict,
    has_scored_verdict,
    latest_verdict,
    register_ensemble,
    save_verdict,
    with_verdicts,
)

__all__ = [
    "CaseVerdicts",
    "DetectionRecord",
    "EnsembleRecord",
    "EnsembleVersionClash",
    "ImageFacts",
    "SourceRef",
    "StoredObject",
    "TokenRecord",
    "VerdictRecord",
    "add_idempotency_key",
    "add_scan",
    "add_token",
    "append_audit",
    "attach_image",
    "attempts_so_far",
    "audit_trail",
    "case_for_image",
    "count_attempt",
    "count_rows",
    "current_verdict",
    "current_versions",
    "detections_by_version",
    "detections_for_image",
    "follow_verdict",
    "get_image",
    "get_or_create_image",
    "get_source",
    "has_scored_verdict",
    "idempotency_key",
    "image_by_sha256",
    "latest_detections",
    "latest_verdict",
    "list_tokens",
    "lock_image",
    "lock_images",
    "mark_pending_sources_scored",
    "mark_resent",
    "mark_source_rejected",
    "mark_source_scored",
    "objects_of_image",
    "record_dead_letter",
    "record_source",
    "register_ensemble",
    "reusable_detections",
    "revoke_token",
    "save_detection",
    "save_verdict",
    "scan_by_public_id",
    "scans_by_external_id",
    "scans_by_public_ids",
    "scans_of_image",
    "scans_of_object",
    "source_by_ref",
    "sources_by_object",
    "sources_for_image",
    "stalled_sources",
    "stored_object",
    "token_by_public_id",
    "with_verdicts",
]

# Batch re-scans: the request, its listing's cursor, its items and their outcomes.
from db.repository.rescans import (
    ItemCounts,
    RescanItem,
    RescanRecord,
    add_rescan,
    add_to_progress,
    cancel_pending_items,
    claim_active_rescan,
    current_answers,
    image_page,
    item_counts,
    items_in_flight,
    list_rescans,
    postpone_checks,
    record_rescan_items,
    rescan_by_public_id,
    set_rescan_state,
)

__all__ += [
    "ItemCounts",
    "RescanItem",
    "RescanRecord",
    "add_rescan",
    "add_to_progress",
    "cancel_pending_items",
    "claim_active_rescan",
    "current_answers",
    "image_page",
    "item_counts",
    "items_in_flight",
    "list_rescans",
    "postpone_checks",
    "record_rescan_items",
    "rescan_by_public_id",
    "set_rescan_state",
]

# Callbacks: signing secrets, allowed hosts, endpoints, the delivery outbox, its attempts.
from db.repository.callbacks import (  # noqa: E402  (appended per aggregate)
    DeliveryRecord,
    DeliveryView,
    add_callback_attempt,
    add_callback_delivery,
    add_callback_secret,
    callback_attempts,
    callback_endpoint,
    callback_hosts,
    callback_scans_of_image,
    callback_scans_of_sources,
    claim_due_deliveries,
    delivery_view,
    disable_callback_endpoint,
    get_callback_endpoint,
    get_token,
    list_deliveries,
    live_callback_secrets,
    lock_delivery,
    lock_token,
    replace_callback_hosts,
)

__all__ += [
    "DeliveryRecord",
    "DeliveryView",
    "add_callback_attempt",
    "add_callback_delivery",
    "add_callback_secret",
    "callback_attempts",
    "callback_endpoint",
    "callback_hosts",
    "callback_scans_of_image",
    "callback_scans_of_sources",
    "claim_due_deliveries",
    "delivery_view",
    "disable_callback_endpoint",
    "get_callback_endpoint",
    "get_token",
    "list_deliveries",
    "live_callback_secrets",
    "lock_delivery",
    "lock_token",
    "replace_callback_hosts",
]
