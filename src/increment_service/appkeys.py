"""Typed application keys: every shared resource of an app (and what the guard leaves on a
request), in one place. lifecycle.py sets them; views read them. (Named for aiohttp's AppKey,
not for counter keys or idempotency keys.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import redis.asyncio
from aiohttp import web

from .logs import AccessLog
from .metrics import Metrics
from .sessions import SessionInfo, SessionStore
from .settings import Settings
from .shutdown import Deadline
from .tokens import Tokens
from .users import Passwords
from .writebehind import WriteBehind

if TYPE_CHECKING:  # the tracing extra may not be installed; only annotations name it
    from opentelemetry.sdk.trace import TracerProvider

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
REDIS = web.AppKey("redis", redis.asyncio.Redis)
WRITE_BEHIND = web.AppKey("write_behind", WriteBehind)
SESSIONS = web.AppKey("sessions", SessionStore)
PASSWORDS = web.AppKey("passwords", Passwords)
TOKENS = web.AppKey("tokens", Tokens)
#: Only set when tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT).
TRACER_PROVIDER: web.AppKey[TracerProvider] = web.AppKey("tracer_provider")
#: Only set when requests are logged (ACCESS_LOG, and LOG_LEVEL at INFO or below).
ACCESS_LOG = web.AppKey("access_log", AccessLog)

#: The shutdown's deadline (the worker's budget, fixed at SIGTERM): every cleanup context
#: consults it. The command sets it; an app run otherwise (a test's) gets the whole budget,
#: fixed when its shutdown begins.
SHUTDOWN = web.AppKey("shutdown", Deadline)

#: Set by the command for each of WORKERS workers (worker n of N: n/N of an interval): workers
#: that flush at the same moment wait on each other's row locks (their keys overlap); staggered,
#: each flush runs alone.
FLUSH_OFFSET = web.AppKey("flush_offset", float)

#: Set by the guard on the requests it let through with a session: whose session it is.
SESSION = web.RequestKey("session", SessionInfo)
#: Set by the guard on every request it let through (a session's or a token's): the user.
USER_ID = web.RequestKey("user_id", str)
