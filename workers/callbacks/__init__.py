"""Signed callbacks to platforms (Standard Webhooks), delivered from a durable outbox.

guard      where a callback may go: the URL, the token's allow-list, the addresses
secrets    signing secrets (encrypted at rest, readable under earlier secret keys),
           signatures, the development key file
policy     the deployment's choices as plain values (``CallbackPolicy``)
outbox     events queued in the transaction that makes them happen
transport  one POST through the guard, to a checked address
sender     claim, send, record; the loop the CLI and the embedded API run
service    what platforms and operators do: secrets (and their re-encryption under a new
           secret key), hosts, deliveries, redelivery
"""

from workers.callbacks.guard import CallbackRefused, Resolver, system_resolver
from workers.callbacks.outbox import (
    REVIEW_DECIDED,
    SCAN_COMPLETED,
    enqueue_review_decided,
    enqueue_scan_completed,
)
from workers.callbacks.policy import ROTATION_OVERLAP, CallbackPolicy
from workers.callbacks.secrets import SecretBox, SecretUnreadable, load_or_create_key
from workers.callbacks.sender import backoff, deliver_due, run_sender
from workers.callbacks.service import (
    AttemptInfo,
    CallbackNotFound,
    CallbacksUnavailable,
    DeliveryDetail,
    DeliveryInfo,
    KeyRotation,
    RotatedSecret,
    check_callback_url,
    create_secret,
    delivery_detail,
    find_token,
    list_deliveries,
    list_hosts,
    normalize_hosts,
    redeliver,
    reencrypt_secrets,
    replace_hosts,
    rotate_secret,
)
from workers.callbacks.transport import Answer, CallbackSender

__all__ = [
    "REVIEW_DECIDED",
    "ROTATION_OVERLAP",
    "SCAN_COMPLETED",
    "Answer",
    "AttemptInfo",
    "CallbackNotFound",
    "CallbackPolicy",
    "CallbackRefused",
    "CallbackSender",
    "CallbacksUnavailable",
    "DeliveryDetail",
    "DeliveryInfo",
    "KeyRotation",
    "Resolver",
    "RotatedSecret",
    "SecretBox",
    "SecretUnreadable",
    "backoff",
    "check_callback_url",
    "create_secret",
    "deliver_due",
    "delivery_detail",
    "enqueue_review_decided",
    "enqueue_scan_completed",
    "find_token",
    "list_deliveries",
    "list_hosts",
    "load_or_create_key",
    "normalize_hosts",
    "redeliver",
    "reencrypt_secrets",
    "replace_hosts",
    "rotate_secret",
    "run_sender",
    "system_resolver",
]
