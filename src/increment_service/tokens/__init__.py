"""API tokens (RFC 6750 bearer tokens), split by role like the write-behind:

* ``format``: what a token looks like; made, checked (prefix, checksum), digested (pure);
* ``store``: the storage functions (each takes a connection), ``api_tokens``;
* ``verifier``: the per-process check: cache, single-flighted and batched lookups, bounds;
* ``listener``: revocations pushed by Postgres (LISTEN/NOTIFY);
* ``usage``: ``lastUsedAt``, written in batches;
* ``service``: the three of one app, started and closed together.
"""

from __future__ import annotations

from .format import new_token, well_formed
from .service import Tokens
from .store import Grant, NoSuchUser, TokenRow, TooMany
from .verifier import TokenVerifier

#: Live (unexpired) tokens a user may hold; one more is refused with 409.
MAX_LIVE_TOKENS = 100

__all__ = [
    "MAX_LIVE_TOKENS",
    "Grant",
    "NoSuchUser",
    "TokenRow",
    "TokenVerifier",
    "Tokens",
    "TooMany",
    "new_token",
    "well_formed",
]
