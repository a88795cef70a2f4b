"""Requests made in memory for the readers of validation/: the headers and body a test gives,
read by aiohttp's own Request, with no server and no socket."""

from __future__ import annotations

import asyncio
from unittest import mock

from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict


def request(
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    content_type: str | None = "application/json",
    length: bool = True,
) -> web.Request:
    """A POST with ``body``; ``Content-Length`` unless ``length`` is False (as if chunked)."""
    fields: CIMultiDict[str] = CIMultiDict()
    if content_type is not None:
        fields["Content-Type"] = content_type
    if length:
        fields["Content-Length"] = str(len(body))
    for name, value in headers or []:
        fields.add(name, value)
    protocol = mock.Mock(_reading_paused=False)
    payload = streams.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    return make_mocked_request("POST", "/", headers=fields, payload=payload)


def streaming(
    headers: list[tuple[str, str]] | None = None,
) -> tuple[web.Request, streams.StreamReader]:
    """A POST without Content-Length (as if chunked) whose body the test feeds as it likes
    (``feed_data``, ``feed_eof``) while the request is read."""
    fields: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    for name, value in headers or []:
        fields.add(name, value)
    protocol = mock.Mock(_reading_paused=False)
    payload = streams.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    return make_mocked_request("POST", "/", headers=fields, payload=payload), payload
