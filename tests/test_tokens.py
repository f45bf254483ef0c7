"""API tokens on real Postgres (issue, check, revoke, audit) and through the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiToken, AuditEvent, CallbackSecret, TokenRole
from workers import tokens
from workers.callbacks import SecretBox


def test_a_token_is_shown_once_stored_as_a_hash_and_checked(db_session: Session) -> None:
    issued = tokens.issue_token(
        db_session, role=TokenRole.PLATFORM, name="acme uploads", actor="test"
    )
    prefix, public_id, secret = issued.token.split("_", 2)
    assert (prefix, public_id) == ("sst", issued.public_id) and len(secret) >= 43
    (row,) = db_session.execute(select(ApiToken)).scalars().all()
    assert secret not in row.secret_sha256 and issued.token not in repr(vars(row))
    assert tokens.authenticate(db_session, issued.token) == row
    # Wrong secret, unknown id, another prefix, garbage: all refused alike.
    for presented in (
        issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B"),
        f"sst_unknownid0_{secret}",
        f"xyz_{public_id}_{secret}",
        "",
        "sst__",
        f"sst_{public_id}_{secret}\u00e9",
    ):
        assert tokens.authenticate(db_session, presented) is None, presented


def test_a_revoked_token_no_longer_works_and_every_action_is_audited(
    db_session: Session,
) -> None:
    issued = tokens.issue_token(db_session, role=TokenRole.MODERATOR, name="alice", actor="ops")
    assert tokens.revoke(db_session, issued.public_id, actor="ops") is True
    assert tokens.revoke(db_session, issued.public_id, actor="ops") is False  # once
    assert tokens.authenticate(db_session, issued.token) is None
    with pytest.raises(tokens.TokenError, match="no token"):
        tokens.revoke(db_session, "nosuchtoken0", actor="ops")
    actions = db_session.execute(
        select(AuditEvent.action, AuditEvent.actor).order_by(AuditEvent.id)
    ).all()
    assert [tuple(a) for a in actions] == [("token.created", "ops"), ("token.revoked", "ops")]
    (info,) = tokens.list_tokens(db_session)
    assert info.public_id == issued.public_id and info.revoked_at is not None
    assert not hasattr(info, "secret_sha256")


@pytest.mark.parametrize("name", ["", "   ", "x" * 256, "tab\there"])
def test_a_token_needs_a_printable_name(db_session: Session, name: str) -> None:
    with pytest.raises(tokens.TokenError, match="printable"):
        tokens.issue_token(db_session, role=TokenRole.ADMIN, name=name, actor="test")


def test_tokens_through_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env["SYNTHSENTRY_DATA_DIR"] = str(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "synthsentry.cli", "tokens", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    created = cli("create", "--role", "moderator", "--name", "alice", "--json")
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    assert issued["role"] == "moderator" and issued["token"].startswith("sst_")
    listed = cli("list", "--json")
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["public_id"] == issued["public_id"] and issued["token"] not in listed.stdout
    revoked = cli("revoke", issued["public_id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    unknown = cli("revoke", "nosuchtoken0")
    assert unknown.returncode == 2 and "no token" in unknown.stderr
    bad_role = cli("create", "--role", "root", "--name", "x")
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr
    assert issued["callback_secret"] is None and issued["callback_hosts"] == []
    # A platform token comes with its callback signing secret (shown once, like the token)
    # and the hosts its callbacks may go to; without a configured secret key, development
    # keeps one in the data folder, readable by this user only.
    platform = cli(
        "create", "--role", "platform", "--name", "acme",
        "--callback-host", "Hooks.Example.com", "--callback-host", "127.0.0.1",
    )  # fmt: skip
    assert platform.returncode == 0, platform.stderr
    token, secret, notice, hosts = platform.stdout.splitlines()
    assert token.startswith("sst_") and secret.startswith("callback signing secret: whsec_")
    assert "they are shown this once" in notice
    assert hosts == "callbacks may go to: 127.0.0.1, hooks.example.com"
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    listed = cli("list", "--json")
    assert secret.split(": ")[1] not in listed.stdout
    misplaced = cli("create", "--role", "moderator", "--name", "x", "--callback-host", "a.example")
    assert misplaced.returncode == 2 and "for platform tokens" in misplaced.stderr


def test_a_platform_token_gets_its_callback_secret_encrypted(db_session: Session) -> None:
    box = SecretBox("a secret key for the token tests")
    issued = tokens.issue_token(
        db_session,
        role=TokenRole.PLATFORM,
        name="acme",
        actor="test",
        secret_box=box,
        callback_hosts=["hooks.example.com"],
    )
    assert issued.callback_secret is not None and issued.callback_hosts == ("hooks.example.com",)
    (stored,) = db_session.execute(select(CallbackSecret)).scalars().all()
    assert issued.callback_secret not in stored.secret_encrypted
    assert box.decrypt(stored.secret_encrypted) == issued.callback_secret
    # Other roles get no secret; a bad host refuses the whole token.
    moderator = tokens.issue_token(
        db_session, role=TokenRole.MODERATOR, name="alice", actor="test", secret_box=box
    )
    assert moderator.callback_secret is None
    with pytest.raises(tokens.TokenError, match="not a host name"):
        tokens.issue_token(
            db_session,
            role=TokenRole.PLATFORM,
            name="x",
            actor="test",
            secret_box=box,
            callback_hosts=["not a host"],
        )
