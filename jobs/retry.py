"""The retry policy of a run's database writes.

A write that fails because the database is briefly away (restarting, a dropped connection,
SQLite's lock held too long) is tried again, with backoff, for up to `RETRY_SECONDS`: a
running job does not fail for it; only a longer outage fails the run. One that fails because
the database's disk is full is tried again for as long as the run waits for space (its first
argument's `disk_full_wait`, from `AFINA_DISK_FULL_WAIT_SECONDS`), if that is longer.
"""

import logging

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import RetryCallState, before_sleep_log, retry, retry_if_exception, wait_exponential

from afina.core.disk import is_disk_full

logger = logging.getLogger(__name__)

# How long a write is tried again while the database is away, in all, and the first and
# longest waits between tries (read at each try: tests shorten them).
RETRY_SECONDS = 180.0
RETRY_FIRST_WAIT_SECONDS = 0.5
RETRY_LONGEST_WAIT_SECONDS = 15.0


def _transient(error: BaseException) -> bool:
    """A database error that a later try may not meet: the database was away, not the SQL."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def _given_up(state: RetryCallState) -> bool:
    limit = RETRY_SECONDS
    error = state.outcome.exception() if state.outcome is not None else None
    if error is not None and is_disk_full(error) and state.args:
        limit = max(limit, getattr(state.args[0], "disk_full_wait", 0.0))
    return (state.seconds_since_start or 0.0) >= limit


def _backoff(state: RetryCallState) -> float:
    wait = wait_exponential(
        multiplier=RETRY_FIRST_WAIT_SECONDS,
        min=RETRY_FIRST_WAIT_SECONDS,
        max=RETRY_LONGEST_WAIT_SECONDS,
    )
    return wait(state)


retried = retry(
    retry=retry_if_exception(_transient),
    stop=_given_up,
    wait=_backoff,
    before_sleep=before_sleep_log(logger, logging.WARNING),
    reraise=True,
)
