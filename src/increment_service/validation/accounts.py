"""Account bodies: a new user (sign-up) and credentials (login)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import emails
from ..errors import ValidationFailed
from .bodies import Errors, check_object, read_json

#: bcrypt reads at most 72 bytes; longer passwords are refused, never silently truncated.
MIN_PASSWORD_BYTES, MAX_PASSWORD_BYTES = 8, 72


def password_bytes(password: str) -> bytes | None:
    """The UTF-8 bytes bcrypt sees, or None if the text cannot be encoded (lone surrogates)."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


def check_email(data: dict[str, Any], errors: Errors) -> tuple[str, str]:
    """The email as given and its key (emails.email_key)."""
    email = data.get("email")
    if "email" not in data:
        return "", ""
    if not isinstance(email, str):
        errors.append({"pointer": "/email", "detail": "must be a string"})
        return "", ""
    try:
        return email, emails.email_key(email)
    except emails.InvalidEmail as exc:
        errors.append({"pointer": "/email", "detail": str(exc)})
        return "", ""


def check_password(data: dict[str, Any], errors: Errors) -> bytes:
    password = data.get("password")
    if "password" not in data:
        return b""
    if not isinstance(password, str):
        errors.append({"pointer": "/password", "detail": "must be a string"})
        return b""
    encoded = password_bytes(password)
    if encoded is None:
        errors.append({"pointer": "/password", "detail": "must be valid Unicode"})
    elif not MIN_PASSWORD_BYTES <= len(encoded) <= MAX_PASSWORD_BYTES:
        errors.append(
            {
                "pointer": "/password",
                "detail": f"must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes in UTF-8",
            }
        )
    else:
        return encoded
    return b""


async def read_new_user(request: web.Request) -> tuple[str, str, bytes]:
    """Email, email key and password bytes of a valid body; ValidationFailed otherwise."""
    errors: Errors = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    email, email_key = check_email(data, errors)
    password = check_password(data, errors)
    if errors:
        raise ValidationFailed("the user body is invalid", errors=errors)
    return email, email_key, password


async def read_credentials(request: web.Request) -> tuple[str | None, bytes | None]:
    """The email key and password bytes of a login body. Either is None when it could never
    match (an email no account may have, a password bcrypt never took): the login still runs
    its one bcrypt check, so such credentials look like any wrong ones, never like a 422."""
    errors: Errors = []
    data = check_object(await read_json(request), ("email", "password"), errors)
    for name in ("email", "password"):
        if name in data and not isinstance(data[name], str):
            errors.append({"pointer": f"/{name}", "detail": "must be a string"})
    if errors:
        raise ValidationFailed("the login body is invalid", errors=errors)
    try:
        email_key: str | None = emails.email_key(data["email"][: emails.MAX_EMAIL_CHARS + 1])
    except emails.InvalidEmail:
        email_key = None
    password = password_bytes(data["password"])
    if password is not None and len(password) > MAX_PASSWORD_BYTES:
        password = None
    return email_key, password
