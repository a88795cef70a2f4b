"""Users and sessions: sign-up, login, who am I, logout.

Login goes through aiohttp-session (``new_session``; its middleware, on this route only,
writes the session to Redis and sets the cookie); logout through the store's cookie handling.
"""

from __future__ import annotations

import time

import aiohttp_session
from aiohttp import web

from .. import db, throttle, users
from ..appkeys import METRICS, PASSWORDS, PG_POOL, REDIS, SESSIONS, SETTINGS
from ..errors import Conflict, TooManyRequests, Unauthorized
from ..redis_client import redis_call
from ..validation.accounts import read_credentials, read_new_user
from . import json_response
from .guard import require_session

BAD_CREDENTIALS = "the email or the password is wrong"


async def create_user(request: web.Request) -> web.Response:
    """POST /api/users."""
    email, email_key, password = await read_new_user(request)
    app = request.app
    client, signups = app[REDIS], app[METRICS].signups
    # Counted before the hash: a flood of valid bodies costs one Redis call each, not bcrypt.
    address = throttle.client_address(request, app[SETTINGS].trusted_proxies)
    try:
        await redis_call(client, lambda: throttle.count_signup(client, address))
    except TooManyRequests:
        signups.labels(outcome="throttled").inc()
        raise
    password_hash = await app[PASSWORDS].hash(password)
    async with db.connection(app[PG_POOL], "user database") as conn:
        try:
            user = await users.insert(conn, email, email_key, password_hash)
        except users.DuplicateEmail:
            signups.labels(outcome="duplicate").inc()
            raise Conflict("a user with that email exists") from None
    signups.labels(outcome="created").inc()
    return json_response({"id": str(user.id), "email": user.email}, 201)


async def login(request: web.Request) -> web.Response:
    """POST /api/sessions: check the credentials, start a session under a new id."""
    email_key, password = await read_credentials(request)
    app = request.app
    store, logins = app[SESSIONS], app[METRICS].logins
    # One normal form for the lookup and the account's throttle budget.
    subjects = throttle.Subjects.of(
        email_key, throttle.client_address(request, app[SETTINGS].trusted_proxies)
    )
    try:
        await redis_call(store.redis, lambda: throttle.count_attempt(store.redis, subjects))
    except TooManyRequests:
        logins.labels(outcome="throttled").inc()
        raise
    user = None
    if email_key is not None:
        async with db.connection(app[PG_POOL], "user database") as conn:
            user = await users.find_by_key(conn, email_key)
    # Unknown email and wrong password take the same path: one bcrypt check, one answer.
    if not await app[PASSWORDS].verify(password, user.password_hash if user else None):
        logins.labels(outcome="failure").inc()
        raise Unauthorized(BAD_CREDENTIALS)
    assert user is not None  # verify() is False without a stored hash
    # Rotation: whatever id the browser brought (a planted one included) ends here; the
    # session below gets a fresh id from new_session.
    previous = store.session_id(request)

    async def succeeded() -> None:
        await throttle.record_success(store.redis, subjects)
        if previous is not None:
            await store.revoke(previous)

    await redis_call(store.redis, succeeded)
    session = await aiohttp_session.new_session(request)
    session.update(store.initial_data(str(user.id), time.time()))
    session.max_age = store.initial_ttl_seconds()  # the Redis expiry (see SessionStore)
    logins.labels(outcome="success").inc()
    return json_response({"userId": str(user.id)}, 201)


async def whoami(request: web.Request) -> web.Response:
    """GET /api/sessions: who is logged in."""
    session = await require_session(request)
    return json_response({"userId": session.user_id})


async def logout(request: web.Request) -> web.Response:
    """DELETE /api/sessions: delete the session everywhere; 204 with or without one."""
    store = request.app[SESSIONS]
    session_id = store.session_id(request)
    if session_id is not None:
        await redis_call(store.redis, lambda: store.revoke(session_id))
    response = web.Response(status=204)
    store.save_cookie(response, "")  # aiohttp-session's way to delete the cookie
    return response
