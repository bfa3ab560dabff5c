"""API keys: the bootstrap keys of `AFINA_API_KEYS`, and the keys `afina keys` keeps in the
database, hashed.

A stored key is 256 random bits, so its SHA-256 is enough to keep it safe (a slow password
hash protects guessable secrets, which these are not) and lets a request find its key with
one indexed lookup. The key itself is shown once, when it is made.
"""

import hashlib
import hmac
import secrets
import time
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
    """Which project a key belongs to, and whether callers need a key at all.

    A key found valid is remembered for `cache_seconds`, so that a busy client's requests
    do not each cost a database query and a thread; a revoked key therefore stops within
    that time. That keys exist is remembered for good once one does; that none does is
    never remembered, so the first key closes the service at once.
    """

    MAX_REMEMBERED = 4096

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        bootstrap: dict[str, str],
        cache_seconds: float = 0.0,
    ) -> None:
        self.session_factory = session_factory
        self.bootstrap = bootstrap
        self.cache_seconds = cache_seconds
        self._keys_exist = bool(bootstrap)
        self._valid: dict[str, tuple[str, float]] = {}  # key digest -> (project, until)

    def known_required(self) -> bool:
        """Whether `required()` is known to be true without asking the database."""
        return self._keys_exist

    def required(self) -> bool:
        """True once any key exists, set or stored (a revoked one too): from then on, a caller
        without a valid key is refused. Only a service that never had a key is open."""
        if not self._keys_exist:
            self._keys_exist = any_stored_key(self.session_factory)
        return self._keys_exist

    def remembered_project(self, token: str) -> str | None:
        """The project of a bootstrap key, or of a stored key found valid lately; no I/O."""
        project = find_bootstrap_project(self.bootstrap, token)
        if project is not None:
            return project
        found = self._valid.get(digest(token))
        return found[0] if found is not None and time.monotonic() < found[1] else None

    def project_for(self, token: str) -> str | None:
        project = self.remembered_project(token)
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
        if self.cache_seconds > 0:
            if len(self._valid) >= self.MAX_REMEMBERED:
                self._valid.clear()
            self._valid[hashed] = (row.project, time.monotonic() + self.cache_seconds)
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
