"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, made to get over a
full disk.

A worker takes a message with a write (it marks the row delivered). On a full disk that
write fails, and kombu's channel leaves its session in the failed transaction: Celery takes
the error for a lost connection and opens another channel, whose session takes another pooled
connection, until the pool is spent and the worker dies. Here a failed take is rolled back
(the message stays in the queue, untaken) and, when the disk is full, is no message for now:
the worker keeps polling, and takes the message once there is room again.

`sqla+sqlite:` URLs are served by this transport (`create_celery` names it `afinasqla+`).
"""

import logging
import time
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from afina.core.disk import is_disk_full

logger = logging.getLogger(__name__)

SCHEME = "afinasqla"
# How long a poll that met a full disk waits before the next.
FULL_DISK_POLL_SECONDS = 2.0


class Channel(kombu_sqlalchemy.Channel):
    _disk_full = False  # whether the last take met a full disk (to log it once)

    def _get(self, queue: str) -> Any:
        try:
            message = super()._get(queue)
        except Empty:
            self._space_back()
            raise
        except SQLAlchemyError as error:
            self._roll_back()
            if not is_disk_full(error):
                raise
            if not self._disk_full:
                logger.warning(
                    "the broker's disk is full: no message can be taken until there is room"
                )
                Channel._disk_full = True
            time.sleep(FULL_DISK_POLL_SECONDS)
            raise Empty() from None
        self._space_back()
        return message

    def _space_back(self) -> None:
        if self._disk_full:
            logger.info("the broker's disk has room again: taking messages")
            Channel._disk_full = False

    def _roll_back(self) -> None:
        try:
            self.session.rollback()
        except SQLAlchemyError:  # the session is beyond use: the next poll opens another
            self._session = None


class Transport(kombu_sqlalchemy.Transport):
    Channel = Channel
    # kombu polls a database broker every second: half a second of a new job's wait, on
    # average. A tenth of a second costs an idle worker ten small queries a second. (Redis
    # delivers at once, without polling.)
    polling_interval = 0.1


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")


def embedded_broker_url(url: str) -> str:
    """The URL that serves a SQLite broker with this transport; any other URL unchanged."""
    if url.startswith("sqla+sqlite:"):
        return f"{SCHEME}+{url.removeprefix('sqla+')}"
    return url
