"""The one retry policy of a node: capped exponential backoff with full jitter, on tenacity.

Every part of a node that talks to the store or the cache (the actors' rebuilds, the change feed, the
reconcile sweep, the checkpoint, the sidecar's start-up) retries through a ``RetryPolicy``, so one pair of
settings paces them all. Which failures may pass is decided here too (``is_transient``): a transient one
is retried quietly; a permanent one (a bug, a dropped table) is given up by an actor, but the node's own
loops (feed, sweep) keep retrying it at the capped pace, loudly, since an operator can still fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from ..cache import CacheUnavailable
from ..storage import StoreUnavailable
from ._validate import check_seconds

__all__ = ("TRANSIENT_ERRORS", "RetryPolicy", "is_transient")

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StoreUnavailable,
    CacheUnavailable,
    OSError,
    TimeoutError,
)
"""Failures worth retrying: the backend may come back."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass by itself (an outage, a timeout), rather than need a fix."""
    return isinstance(exc, TRANSIENT_ERRORS)


def _is_error(exc: BaseException) -> bool:
    """Any ``Exception`` (never a cancellation, KeyboardInterrupt or SystemExit)."""
    return isinstance(exc, Exception)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Waits ``initial`` seconds times a random factor, doubling per attempt, never more than ``maximum``."""

    initial: float = 0.05
    maximum: float = 5.0

    def __post_init__(self) -> None:
        check_seconds(self.initial, name="retry_initial")
        check_seconds(self.maximum, name="retry_max")

    def retrying(
        self,
        *,
        everything: bool = False,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """A tenacity controller: transient failures only, or (``everything``) any ``Exception``."""
        return AsyncRetrying(
            wait=wait_random_exponential(multiplier=self.initial, max=self.maximum),
            retry=retry_if_exception(_is_error if everything else is_transient),
            before_sleep=before_sleep,
            sleep=anyio.sleep,
            reraise=True,
        )

    async def persist(self, what: str, call: Callable[[], Awaitable[T]], logger: logging.Logger) -> T:
        """``await call()`` until it succeeds, logging each failure; only cancellation stops it."""

        def log(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            level = logging.WARNING if exc is not None and is_transient(exc) else logging.ERROR
            logger.log(level, "%s failed (attempt %d), retrying in %.2fs: %r", what,
                       state.attempt_number, state.upcoming_sleep, exc)  # fmt: skip

        async for attempt in self.retrying(everything=True, before_sleep=log):
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity retries until the call succeeds")  # pragma: no cover
