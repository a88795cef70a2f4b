"""The client's reads of persisted counters (``IncrementClient.get``, ``get_many``,
``counters``): what they ask and what they answer. Sending, retries and the deadline are the
client's (``IncrementClient._read``, client.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

#: The most keys one lookup may name (the service's limit): get_many sends more in several.
LOOKUP_KEYS = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Counter:
    """A persisted counter, as a read answers it."""

    key: str
    value: int
    updated_at: datetime


class ReadFailed(Exception):
    """A read without a value: an answer that is neither a 200 nor retried (``status`` and
    its ``problem``: a 401 without a logged-in session, say), or the deadline ran out
    (``status`` the last attempt's, None if it got no answer)."""

    def __init__(
        self,
        message: str,
        attempts: int,
        *,
        status: int | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.problem = dict(problem or {})


class CounterReads:
    """The reads of IncrementClient, on the ``/api/counters`` routes: give the client a
    ``session`` that is logged in."""

    #: IncrementClient's: ``method`` on ``/api/counters`` + ``path`` (``body``, ``params``),
    #: retried until the deadline; the JSON object of its 200.
    _read: Callable[..., Awaitable[dict[str, Any]]]

    async def get(self, key: str) -> Counter | None:
        """The persisted counter ``key``, None if it was never persisted. Asked of the lookup
        route, which takes any key as it is (nothing to escape in a path)."""
        found, _ = await self.get_many([key])
        return found.get(key)

    async def get_many(self, keys: Iterable[str]) -> tuple[dict[str, Counter], list[str]]:
        """The persisted counters of ``keys``, by key, and the keys never persisted (each
        once, in the order first given), in lookups of up to LOOKUP_KEYS keys."""
        ordered = list(dict.fromkeys(keys))
        found: dict[str, Counter] = {}
        missing: list[str] = []
        for start in range(0, len(ordered), LOOKUP_KEYS):
            body = {"keys": ordered[start : start + LOOKUP_KEYS]}
            answer = await self._read("POST", "/lookup", body=body)
            found.update((item["key"], _counter(item)) for item in answer["counters"])
            missing.extend(answer["missing"])
        return found, missing

    async def counters(self, prefix: str = "", *, page_size: int = 100) -> AsyncIterator[Counter]:
        """Every persisted counter whose key starts with ``prefix`` (every one: ""), in byte
        order, fetched ``page_size`` (1 to 1000) at a time by following each page's ``next``.
        A key written meanwhile may or may not be seen; none is seen twice."""
        params = {"prefix": prefix, "limit": str(page_size)}
        while True:
            page = await self._read("GET", "", params=params)
            for item in page["counters"]:
                yield _counter(item)
            if page["next"] is None:
                return
            params["after"] = page["next"]


def _counter(item: Mapping[str, Any]) -> Counter:
    return Counter(item["key"], item["value"], datetime.fromisoformat(item["updatedAt"]))
