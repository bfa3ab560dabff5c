"""Helpers the API tests share: uploads, error-body checks, reading rows back."""

import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from afina.core.settings import Settings
from afina.models.session import make_engine, make_session_factory


def jsonl(*examples: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(example).encode() + b"\n" for example in examples)


def upload(
    client: TestClient,
    content: bytes,
    name: str = "train.jsonl",
    headers: dict[str, str] | None = None,
    **form: str,
):
    return client.post(
        "/v1/files",
        data={"purpose": "fine-tune", **form},
        files={"file": (name, content, "application/jsonl")},
        headers=headers,
    )


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    return error


def rows(settings: Settings, table: Any) -> list[Any]:
    """Every row of an ORM class, read in a session of its own."""
    engine = make_engine(settings.database_url or "")
    with make_session_factory(engine)() as session:
        found = list(session.scalars(select(table)))
    engine.dispose()
    return found
