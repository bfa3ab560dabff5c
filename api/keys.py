"""API keys: the bootstrap keys of `AFINA_API_KEYS`, and the keys `afina keys` keeps in the
database, hashed.

A stored key is 256 random bits, so its SHA-256 is enough to keep it safe (a slow password
hash protects guessable secrets, which these are not) and lets a request find its key with
one indexed lookup. The key itself is shown once, when it is made.
"""

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from afina.core.ids import new_id
from afina.models import ApiKey
from afina.models.base import utcnow

KEY_PREFIX = "sk-afina-"
SHOWN_CHARACTERS = len(KEY_PREFIX) + 4


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def find_bootstrap_project(keys: dict[str, str], token: str) -> str | None:
    """Compare the token with every bootstrap key, so the time taken says nothing about any."""
    found = None
    for key, project in keys.items():
        if hmac.compare_digest(key.encode(), token.encode("utf-8", "surrogateescape")):
            found = project
    return found


class KeyStore:
    """Which project a key belongs to, and whether callers need a key at all."""

    def __init__(self, session_factory: sessionmaker[Session], bootstrap: dict[str, str]) -> None:
        self.session_factory = session_factory
        self.bootstrap = bootstrap
        self._keys_exist = bool(bootstrap)

    def required(self) -> bool:
        """True once any key exists, set or stored (a revoked one too): from then on, a caller
        without a valid key is refused. Only a service that never had a key is open."""
        if not self._keys_exist:
            self._keys_exist = any_stored_key(self.session_factory)
        return self._keys_exist

    def project_for(self, token: str) -> str | None:
        project = find_bootstrap_project(self.bootstrap, token)
        if project is not None:
            return project
        hashed = digest(token)
        with self.session_factory() as session:
            row = session.execute(
                select(ApiKey.project, ApiKey.key_hash).where(
                    ApiKey.key_hash == hashed, ApiKey.revoked_at.is_(None)
                )
            ).first()
        if row is None or not hmac.compare_digest(row.key_hash, hashed):
            return None
        return row.project


class NewKey(NamedTuple):
    row: ApiKey
    key: str


def create_key(session_factory: sessionmaker[Session], project: str, name: str | None) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        project=project,
        name=name,
        prefix=key[:SHOWN_CHARACTERS],
        key_hash=digest(key),
    )
    with session_factory.begin() as session:
        session.add(row)
    return NewKey(row, key)


def list_keys(
    session_factory: sessionmaker[Session], project: str | None, *, revoked: bool
) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.project, ApiKey.created_at)
    if project is not None:
        query = query.where(ApiKey.project == project)
    if not revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with session_factory() as session:
        return session.scalars(query).all()


def revoke_keys(
    session_factory: sessionmaker[Session], key: str | None, project: str | None
) -> Sequence[ApiKey]:
    """Revoke the stored keys that `key` (a key's id, or the key itself) and `project` name;
    they stop working at their next request. Returns every key named, revoked before or
    now; revoking a revoked key changes nothing."""
    named = []
    if key is not None:
        named.append(or_(ApiKey.id == key, ApiKey.key_hash == digest(key)))
    if project is not None:
        named.append(ApiKey.project == project)
    assert named, "name a key, a project, or both"
    with session_factory.begin() as session:
        session.execute(
            update(ApiKey).where(*named, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
        return session.scalars(select(ApiKey).where(*named).order_by(ApiKey.created_at)).all()


def any_stored_key(session_factory: sessionmaker[Session]) -> bool:
    """Whether a key was ever stored, revoked or not: revoking the last key closes the
    service to everyone, it never opens it."""
    with session_factory() as session:
        return session.scalar(select(ApiKey.id).limit(1)) is not None
