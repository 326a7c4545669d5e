"""Which driver and OS errors are transient: the one table the storage seam consults.

Transient (``StoreUnavailable``: retrying later can succeed, nothing needs fixing by hand):

- the connection is gone or could not be made: ``OSError`` (refused, reset, unreachable), ``TimeoutError``,
  an ``EOFError`` such as asyncio's ``IncompleteReadError``, asyncio's ``InvalidStateError``;
- asyncpg's own client side: every ``InterfaceError`` ("connection is closed", "pool is closing", ...) and
  every ``InternalClientError`` ("cannot switch to state 12; another operation is in progress", seen when
  the server's FATAL message races the next statement on a terminated connection), and any other
  exception raised from inside asyncpg's code;
- server errors whose SQLSTATE is in ``_TRANSIENT_SQLSTATES`` below (connection exceptions, operator
  intervention, insufficient resources, serialization failure, deadlock, statement timeout, ...), and
  asyncpg's ``InvalidCachedStatementError`` (a schema change; asyncpg dropped the stale statement).

Permanent (``StoreError``): every other server error (an undefined table, a permission denied, ...) and
asyncpg's ``DataError`` (a value the driver cannot encode: retrying sends the same value again).
Client configuration (``ClientConfigurationError``: bad connect options, found before any I/O) is
``InvalidOperation``. Anything else (a bug in our code or in a service's ``loader``) is not a driver
error: ``classify`` returns None and it propagates unchanged.
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType

import asyncpg

from ._errors import InvalidOperation, StoreError, StoreUnavailable

__all__ = ("breaks_connection", "classify")

_TRANSIENT_SQLSTATES: dict[str, bool] = {
    # SQLSTATE code, or class (its first two characters) -> whether the session survives it
    "08": False,  # connection exception: does not exist, failure, rejected, cannot connect, ...
    "53": True,  # insufficient resources: disk full, out of memory, too many connections (at connect)
    "57000": False,  # operator intervention
    "57014": True,  # query canceled (statement_timeout or a cancel request)
    "57P01": False,  # admin shutdown (pg_terminate_backend, pg_ctl stop -m fast)
    "57P02": False,  # crash shutdown
    "57P03": False,  # cannot connect now (starting up, shutting down, in recovery)
    "57P05": False,  # idle session timeout
    "40001": True,  # serialization failure
    "40003": True,  # statement completion unknown
    "40P01": True,  # deadlock detected
    "25P03": False,  # idle in transaction session timeout
    "25006": True,  # read-only transaction (a connection that landed on a standby in a failover)
    "55P03": True,  # lock not available (lock_timeout)
}

_TRANSIENT_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable (ConnectionError is an OSError)
    TimeoutError,  # asyncpg's own timeouts (asyncio.TimeoutError is TimeoutError)
    EOFError,  # asyncio.IncompleteReadError: the server hung up mid-message
    asyncio.InvalidStateError,  # a future completed twice in a connection's teardown
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    asyncpg.exceptions.InternalClientError,  # protocol-state errors after a killed connection
)
_ASYNCPG_DIR = os.path.dirname(asyncpg.__file__) + os.sep


def classify(exc: BaseException) -> type[StoreError] | None:
    """The storage error ``exc`` becomes, or None if it is not a driver or OS error."""
    if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, ...: never ours to map
        return None
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return InvalidOperation
    if isinstance(exc, asyncpg.exceptions.DataError):
        return StoreError
    if isinstance(exc, _TRANSIENT_CLIENT_ERRORS):
        return StoreUnavailable
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError if _session_survives(exc) is None else StoreUnavailable
    if _raised_in_asyncpg(exc.__traceback__):
        return StoreUnavailable
    return None


def breaks_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is transient and may have left its connection unusable or in an unknown protocol
    state (a lost socket, a protocol-state error, a timeout mid-statement, an admin shutdown), so the
    connection must be dropped rather than used again. A deadlock or a statement timeout leaves it usable.
    """
    if classify(exc) is not StoreUnavailable:
        return False
    return not isinstance(exc, asyncpg.PostgresError) or _session_survives(exc) is False


def _session_survives(exc: asyncpg.PostgresError) -> bool | None:
    """For a transient server error, whether the session survives it; None for a permanent one."""
    state = str(exc.sqlstate or "")
    survives = _TRANSIENT_SQLSTATES.get(state, _TRANSIENT_SQLSTATES.get(state[:2]))
    if survives is None and isinstance(exc, asyncpg.exceptions.InvalidCachedStatementError):
        return True
    return survives


def _raised_in_asyncpg(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` is asyncpg's code (its Python modules or its Cython ones)."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return filename.startswith((_ASYNCPG_DIR, "asyncpg/"))
