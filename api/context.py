"""What the API's handlers work with, made once per process by ``synthsentry serve`` (or
a test) and handed to every handler as ``ContextDep``: the database, where work is sent,
the object store, and the limits and policies read from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from workers.callbacks import CallbackPolicy
from workers.dispatch import Dispatcher
from workers.events import BucketPolicy
from workers.intake import IntakeLimits
from workers.objects import ObjectStore
from workers.review import ReviewPolicy
from workers.review_media import ReviewMedia


@dataclass(frozen=True)
class ApiContext:
    session_factory: sessionmaker[Session]
    dispatcher: Dispatcher  # the fleet's queues, or the embedded worker
    store: ObjectStore  # S3, or the embedded mode's local folder
    embedded: bool  # scans run in this process (no broker)
    bucket_policy: BucketPolicy | None  # buckets scans may name; None: none
    limits: IntakeLimits
    upload_bucket: str
    upload_prefix: str
    max_body_bytes: int  # JSON bodies; multipart uploads: limits.max_bytes + 64 KiB
    active_ensemble: str  # the version whose verdicts a reader is shown
    detectors: tuple[str, ...]  # the detectors an uploaded image is scored by
    webhook_secret: str  # the S3 event webhook's shared secret ("": the endpoint refuses all)
    webhook_max_records: int
    rescan_page_size: int
    rescan_max_in_flight: int
    body_read_timeout_s: float = 30.0  # a request body that stops arriving this long: 408
    broker_url: str | None = None  # /readyz checks it; None in the embedded mode
    # Signing, timeouts and the address guard of callbacks (default: signing not configured).
    callbacks: CallbackPolicy = field(default_factory=CallbackPolicy)
    # Human review: how long a claim lasts, the share sent to a blind second review.
    review_lease: timedelta = timedelta(minutes=10)
    second_review_share: float = 0.0
    # The dashboard: sign-ins last this long; cookies are Secure outside development.
    session_hours: float = 12.0
    secure_cookies: bool = True
    # The pictures the review pages show (None: the pages show none).
    media: ReviewMedia | None = None

    @property
    def review_policy(self) -> ReviewPolicy:
        return ReviewPolicy(
            active_ensemble=self.active_ensemble,
            lease=self.review_lease,
            second_review_share=self.second_review_share,
        )


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


ContextDep = Annotated[ApiContext, Depends(get_context)]
