"""Cursor pages in OpenAI's shape: `after` an object id, `limit`, newest first by default."""

from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from afina.api.errors import APIError
from afina.core.ids import ID_PATTERN

Order = Literal["asc", "desc"]
T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> "ListPage[Any]":
        """A page of objects that have an `id`."""
        return cls(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )


def page_params(default_limit: int, max_limit: int) -> Any:
    """A dependency reading `after`, `limit` and `order` from the query string."""

    def params(
        after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=max_limit)] = default_limit,
        order: Order = "desc",
    ) -> tuple[str | None, int, Order]:
        return after, limit, order

    return params


def paginate(
    db: Session,
    query: Select[Any],
    entity: Any,
    *,
    after: str | None,
    limit: int,
    order: Order,
) -> tuple[list[Any], bool]:
    """Rows of `query` (already filtered to the caller's objects) past the `after` cursor,
    ordered by (created_at, id) so that equal timestamps still page stably."""
    key = tuple_(entity.created_at, entity.id)
    if after is not None:
        anchor = db.execute(
            query.with_only_columns(entity.created_at, entity.id).where(entity.id == after)
        ).first()
        if anchor is None:
            raise APIError(400, f"No object with id {after!r} to page after", param="after")
        query = query.where(key > tuple(anchor) if order == "asc" else key < tuple(anchor))
    direction = (entity.created_at, entity.id)
    if order == "desc":
        direction = (entity.created_at.desc(), entity.id.desc())
    rows = list(db.scalars(query.order_by(*direction).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
