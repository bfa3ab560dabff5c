"""Cursor pages in OpenAI's shape: `after` an object id, `limit`, newest first by default."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Connection, Select, tuple_

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


@dataclass(frozen=True)
class PageParams:
    after: str | None
    limit: int
    order: Order


def page_params(default_limit: int, max_limit: int) -> Any:
    """A dependency reading `after`, `limit` and `order` from the query string."""

    async def params(
        after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=max_limit)] = default_limit,
        order: Order = "desc",
    ) -> PageParams:
        return PageParams(after, limit, order)

    return params


def list_page(
    db: Connection, query: Select[Any], entity: Any, page: PageParams, to_object: Callable[[Any], T]
) -> ListPage[T]:
    """One page of `query` (`records` of `entity`, already filtered to the caller's
    objects) past the `after` cursor, ordered by (created_at, id) so that equal timestamps
    still page stably, each row turned into its API object."""
    key = tuple_(entity.created_at, entity.id)
    if page.after is not None:
        anchor = db.execute(
            query.with_only_columns(entity.created_at, entity.id).where(entity.id == page.after)
        ).first()
        if anchor is None:
            raise APIError(400, f"No object with id {page.after!r} to page after", param="after")
        query = query.where(key > tuple(anchor) if page.order == "asc" else key < tuple(anchor))
    direction = (entity.created_at, entity.id)
    if page.order == "desc":
        direction = (entity.created_at.desc(), entity.id.desc())
    rows = db.execute(query.order_by(*direction).limit(page.limit + 1)).all()
    data = [to_object(row) for row in rows[: page.limit]]
    return ListPage(
        data=data,
        has_more=len(rows) > page.limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
