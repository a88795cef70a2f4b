"""Validation at the edge: every request becomes typed values or a problem, nothing between.
A module per thing read:

* ``bodies``: size, content coding, media type, strict JSON, the members of an object;
* ``increments``: the counter-key rule and the value rule (each once), single and batch bodies;
* ``headers``: ``Idempotency-Key`` and ``Prefer``;
* ``accounts``: sign-up and login bodies.
"""
