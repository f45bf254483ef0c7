"""Changing the secret key that encrypts callback signing secrets at rest: the earlier keys
still decrypt (``SYNTHSENTRY_SECRET_KEY_PREVIOUS``), only the current one encrypts, and a
stored secret is re-encrypted under the current key. Without a database; the same through
the sender and ``callbacks rotate-key`` on Postgres is in tests/test_callbacks.py."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from synthsentry.runtime import Runtime
from workers.callbacks import SecretBox
from workers.callbacks.secrets import SecretUnreadable, new_signing_secret

from conftest import SettingsFactory

OLD = "the key this deployment used until today, long and random"
OLDER = "the key before that one, also long and random"
NEW = "the key this deployment uses from now on, long and random"


def test_the_new_key_encrypts_and_every_key_decrypts() -> None:
    secret = new_signing_secret()
    under_old, under_older = SecretBox(OLD).encrypt(secret), SecretBox(OLDER).encrypt(secret)
    box = SecretBox(NEW, [OLD, OLDER])
    assert box.decrypt(under_old) == secret and box.decrypt(under_older) == secret
    written = box.encrypt(secret)
    assert SecretBox(NEW).decrypt(written) == secret
    with pytest.raises(SecretUnreadable):
        SecretBox(OLD).decrypt(written)
    with pytest.raises(SecretUnreadable, match="cannot be decrypted"):
        SecretBox(NEW).decrypt(under_old)
    # The current key listed among the previous ones as well changes nothing.
    assert SecretBox(NEW, [NEW, OLD]).decrypt(under_old) == secret
    assert all(key not in repr(box) for key in (NEW, OLD, OLDER))
    with pytest.raises(ValueError, match="previous secret key is empty"):
        SecretBox(NEW, [OLD, ""])


def test_rotate_re_encrypts_under_the_new_key_once() -> None:
    secret = new_signing_secret()
    box = SecretBox(NEW, [OLD])
    rotated = box.rotate(SecretBox(OLD).encrypt(secret))
    assert rotated is not None
    assert SecretBox(NEW).decrypt(rotated) == secret
    with pytest.raises(SecretUnreadable):
        SecretBox(OLD).decrypt(rotated)
    assert box.rotate(rotated) is None  # already under the new key: nothing to rewrite
    for unknown in (SecretBox(OLDER).encrypt(secret), "not a Fernet token", "gâché"):
        with pytest.raises(SecretUnreadable, match="cannot be decrypted"):
            box.rotate(unknown)


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        (json.dumps([OLD, OLDER]), [OLD, OLDER]),
        (OLD, [OLD]),  # one key as it is
        (f" {json.dumps([OLD])}\n", [OLD]),
        ("[]", []),
        ("", []),
        (json.dumps([OLD, ""]), [OLD]),  # an empty entry never encrypted anything
    ],
)
def test_previous_keys_are_a_json_list_or_one_key(
    isolated_settings: SettingsFactory, value: str, keys: list[str]
) -> None:
    settings = isolated_settings(secret_key=NEW, secret_key_previous=value)
    assert [key.get_secret_value() for key in settings.secret_key_previous] == keys
    assert all(key not in repr(settings) for key in (NEW, OLD, OLDER))


def test_a_malformed_list_of_previous_keys_is_refused(isolated_settings: SettingsFactory) -> None:
    with pytest.raises(ValidationError, match="not a JSON list of keys"):
        isolated_settings(secret_key=NEW, secret_key_previous=f'["{OLD}"')


def test_production_refuses_a_placeholder_among_the_previous_keys(
    isolated_settings: SettingsFactory,
) -> None:
    production = {
        "environment": "production",
        "database_url": "postgresql+psycopg2://synthsentry@db:5432/synthsentry",
        "secret_key": NEW,
    }
    accepted = isolated_settings(**production, secret_key_previous=json.dumps([OLD]))
    assert [key.get_secret_value() for key in accepted.secret_key_previous] == [OLD]
    for placeholder in ("change-me", "REPLACE-with-the-old-secret-key", "short"):
        with pytest.raises(ValidationError, match="SYNTHSENTRY_SECRET_KEY_PREVIOUS"):
            isolated_settings(**production, secret_key_previous=json.dumps([OLD, placeholder]))


def test_the_runtimes_callback_box_reads_under_the_previous_keys(
    isolated_settings: SettingsFactory,
) -> None:
    secret = new_signing_secret()
    stored = SecretBox(OLD).encrypt(secret)
    runtime = Runtime.from_settings(isolated_settings(secret_key=NEW, secret_key_previous=OLD))
    assert all(key not in repr(runtime) for key in (NEW, OLD))
    box = runtime.callback_policy().box
    assert box is not None
    assert box.decrypt(stored) == secret
    assert SecretBox(NEW).decrypt(box.encrypt(secret)) == secret
    # The development key file takes the configured key's place, the previous keys stay.
    unset = Runtime.from_settings(isolated_settings(secret_key="", secret_key_previous=OLD))
    developed = unset.callback_policy().box
    assert developed is not None and developed.decrypt(stored) == secret
    assert (unset.data_dir / "secret.key").exists()
