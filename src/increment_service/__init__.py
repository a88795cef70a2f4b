"""increment-service: counters behind an HTTP API, written behind to Postgres."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
