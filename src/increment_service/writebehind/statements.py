"""The SQL of the write-behind, built once from shared fragments (store.py runs it).

Every batch statement records the batch id first (``fresh``: empty when a retry finds it
recorded, and then nothing below adds anything), then adds the deltas to ``counters`` with an
additive UPSERT. Replicas never conflict: every UPSERT is additive, and every statement takes
the counters' row locks in one order (``ORDER BY key COLLATE "C"``: byte order, no collation to
look up), so concurrent batches cannot deadlock.

The keys and deltas travel as two strings (keys joined by ``KEY_SEPARATOR``, deltas by commas)
rather than two arrays of 100,000 elements each: asyncpg encodes arrays element by element on
the event loop (0.2 s at 100k keys; the strings cost about 0.03 s).
"""

from __future__ import annotations

# KEY_SEPARATOR (items.py), as the statements spell it.
_SEPARATOR = "E'\\x1f'"


def _unnest_joined(keys: str, values: str, first: str = "") -> str:
    """The rows of a joined key string and a joined value string (``first``: a column before
    them, e.g. which request each item belongs to)."""
    return (
        f"unnest(\n        {first}string_to_array({keys}::text, {_SEPARATOR}),"
        f" string_to_array({values}::text, ',')::bigint[]\n    )"
    )


_RECORD_BATCH = """
WITH fresh AS (
    INSERT INTO applied_batches (replica_id, seq, applied_at)
    VALUES ($1, $2, now())
    ON CONFLICT DO NOTHING
    RETURNING 1
)"""

_ADD_TO_COUNTER = """ON CONFLICT (key) DO UPDATE
        SET value = c.value + excluded.value, updated_at = excluded.updated_at"""

# The default path, as a batch almost always is (summed deltas that fit a bigint, no keyed
# requests): the batch id and one additive UPSERT, nothing returned but the row count ("INSERT
# 0 n": n is the number of keys, or 0 if a retry found the id recorded). A total that would
# leave bigint makes it fail whole (numeric_value_out_of_range), and the batch goes again as
# APPLY_BATCH_SQL, which says which keys were refused. Returning nothing saves the UPSERT a
# row per key to hand back: 13 % of a 100k-key batch, measured.
APPLY_PLAIN_BATCH_SQL = f"""{_RECORD_BATCH}
INSERT INTO counters AS c (key, value, updated_at)
SELECT d.key, d.delta, now()
FROM {_unnest_joined("$3", "$4")} AS d (key, delta)
WHERE EXISTS (SELECT FROM fresh)
ORDER BY d.key COLLATE "C"
{_ADD_TO_COUNTER}
"""

# Applies `delta` (keys whose sum fits a bigint) and `wide` (the rare sums that do not), which
# the statement defines before it. A key whose new total would leave bigint is not updated
# (the WHERE of DO UPDATE) and is reported back as rejected (and recorded in
# batch_rejections, where a retry of the batch finds it); every other key is still applied.
# A wide delta can only update an existing row whose total then still fits, since a new row
# would hold the delta itself.
_APPLY = f"""
upserted AS (
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, delta, now() FROM delta ORDER BY key COLLATE "C"
    {_ADD_TO_COUNTER}
        -- The sum stays inside bigint, tested without computing it (which would overflow).
        WHERE CASE WHEN excluded.value >= 0
                   THEN c.value <= 9223372036854775807 - excluded.value
                   ELSE c.value >= -9223372036854775808 - excluded.value END
    RETURNING c.key
), widened AS (
    UPDATE counters AS c
    SET value = (c.value + w.delta)::bigint, updated_at = now()
    FROM wide AS w
    WHERE c.key = w.key
      AND c.value + w.delta BETWEEN -9223372036854775808 AND 9223372036854775807
    RETURNING c.key
), rejected AS (
    -- Which keys were rejected is only worked out when some were: the counts are cheap, the
    -- anti-join over a large batch is not, and a CASE runs its subquery only when needed.
    SELECT CASE WHEN (SELECT count(*) FROM upserted) + (SELECT count(*) FROM widened)
                     < (SELECT count(*) FROM delta) + (SELECT count(*) FROM wide)
                THEN ARRAY (
                    (SELECT key FROM delta EXCEPT ALL SELECT key FROM upserted)
                    UNION ALL
                    (SELECT key FROM wide EXCEPT ALL SELECT key FROM widened))
                ELSE '{{}}'::text[] END AS keys
), recorded AS (
    INSERT INTO batch_rejections (replica_id, seq, keys, recorded_at)
    SELECT $1, $2, keys, now() FROM rejected WHERE cardinality(keys) > 0
)
SELECT EXISTS (SELECT FROM fresh) AS fresh, (SELECT keys FROM rejected) AS rejected"""

_WIDE_ROWS = "unnest($5::text[], $6::numeric[])"

# Summed deltas, with which keys were rejected ($3 keys joined, $4 deltas joined; $5/$6 the
# wide ones as arrays).
APPLY_BATCH_SQL = f"""{_RECORD_BATCH}, delta AS (
    SELECT d.key, d.delta
    FROM {_unnest_joined("$3", "$4")} AS d (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), wide AS (
    SELECT w.key, w.delta
    FROM {_WIDE_ROWS} AS w (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), {_APPLY}"""


def _claim(bucket: str, where: str) -> str:
    """Insert each request's key into the partition of ``bucket``; a row left there from an
    older bucket is stale and is taken over. Returns the keys it claimed."""
    return f"""
    INSERT INTO idempotency_keys AS k (slot, scope, key, bucket, fingerprint, recorded_at)
    SELECT (({bucket}) % $15::bigint)::smallint, r.scope, r.key, {bucket},
           r.fingerprint, now()
    FROM request AS r CROSS JOIN generation AS g
    WHERE {where}
    ORDER BY r.scope COLLATE "C", r.key COLLATE "C"
    ON CONFLICT (slot, scope, key) DO UPDATE
        SET bucket = excluded.bucket, fingerprint = excluded.fingerprint,
            recorded_at = excluded.recorded_at
        WHERE k.bucket < excluded.bucket
    RETURNING k.scope, k.key"""


# With keyed requests: $7 scopes, $8 keys, $9 fingerprints (one per request), $10 the request
# (1-based) of each item, $11 the items' counter keys (joined), $12 their values (joined), $13
# the bucket width (IDEMPOTENCY_TTL_SECONDS), $14 GRACE_SECONDS, $15 the number of partitions
# (tables.IDEMPOTENCY_SLOTS). A request's items count only if its key is claimed: inserted into
# the current bucket's partition (and, within GRACE_SECONDS of the bucket's start, into the
# previous bucket's one as well; see store.py). Keyed items and summed deltas meet in one sum
# per counter key (numeric: a sum of items may leave bigint; the `wide` path takes those).
APPLY_KEYED_BATCH_SQL = f"""{_RECORD_BATCH}, generation AS (
    SELECT b AS bucket, extract(epoch FROM now()) - b * $13 < $14 AS near
    FROM (SELECT floor(extract(epoch FROM now()) / $13)::bigint AS b) AS t
), request AS (
    SELECT r.n, r.scope, r.key, r.fingerprint
    FROM unnest($7::text[], $8::text[], $9::bytea[])
        WITH ORDINALITY AS r (scope, key, fingerprint, n)
    WHERE EXISTS (SELECT FROM fresh)
), earlier_claim AS ({_claim("g.bucket - 1", "g.near")}
), claim AS ({
    _claim(
        "g.bucket",
        '''CASE WHEN g.near
               THEN EXISTS (
                   SELECT FROM earlier_claim AS e WHERE e.scope = r.scope AND e.key = r.key)
               ELSE NOT EXISTS (
                   SELECT FROM idempotency_keys AS e
                   WHERE e.slot = ((g.bucket - 1) % $15::bigint)::smallint
                     AND e.scope = r.scope AND e.key = r.key AND e.bucket = g.bucket - 1)
          END''',
    )
}
), claimed AS (
    SELECT r.n FROM request AS r JOIN claim AS c ON c.scope = r.scope AND c.key = r.key
), every_delta AS (
    SELECT d.key, sum(d.delta) AS delta
    FROM (
        SELECT u.key, u.delta::numeric
        FROM {_unnest_joined("$3", "$4")} AS u (key, delta)
        WHERE EXISTS (SELECT FROM fresh)
        UNION ALL
        SELECT w.key, w.delta
        FROM {_WIDE_ROWS} AS w (key, delta)
        WHERE EXISTS (SELECT FROM fresh)
        UNION ALL
        SELECT i.key, i.value::numeric
        FROM {_unnest_joined("$11", "$12", first="$10::bigint[], ")} AS i (n, key, value)
        WHERE i.n IN (SELECT n FROM claimed)
    ) AS d
    GROUP BY d.key
), delta AS (
    SELECT key, delta::bigint AS delta FROM every_delta
    WHERE delta BETWEEN -9223372036854775808 AND 9223372036854775807
), wide AS (
    SELECT key, delta FROM every_delta
    WHERE NOT delta BETWEEN -9223372036854775808 AND 9223372036854775807
), {_APPLY},
    ARRAY (SELECT n FROM claimed ORDER BY n) AS claimed,
    -- What is recorded for the keys that were not claimed, as far as this statement can see
    -- (a claim committed by a concurrent statement after it began is not visible).
    ARRAY (
        SELECT ROW (r.n, k.fingerprint)
        FROM request AS r CROSS JOIN generation AS g
        JOIN idempotency_keys AS k
          ON k.scope = r.scope AND k.key = r.key AND k.bucket >= g.bucket - 1
         AND k.slot IN ((g.bucket % $15::bigint)::smallint,
                        ((g.bucket - 1) % $15::bigint)::smallint)
        WHERE r.n NOT IN (SELECT n FROM claimed)
        ORDER BY r.n
    ) AS recorded_before"""

PRUNE_SQL = (
    "WITH batches AS (DELETE FROM applied_batches WHERE applied_at < now() - interval '1 day')"
    " DELETE FROM batch_rejections WHERE recorded_at < now() - interval '1 day'"
)
BUCKET_SQL = """
SELECT b AS bucket, (b + 1) * $1 - extract(epoch FROM clock_timestamp()) AS left
FROM (SELECT floor(extract(epoch FROM clock_timestamp()) / $1)::bigint AS b) AS t
"""
# The newest record of each key (its fingerprint), whatever its bucket: only asked about keys a
# statement just failed to claim, so a record it finds is within the last two buckets.
RECORDED_SQL = """
SELECT DISTINCT ON (k.scope, k.key) k.scope, k.key, k.fingerprint
FROM unnest($1::text[], $2::text[]) AS r (scope, key)
JOIN idempotency_keys AS k ON k.scope = r.scope AND k.key = r.key
ORDER BY k.scope, k.key, k.bucket DESC
"""
REJECTED_BEFORE_SQL = "SELECT keys FROM batch_rejections WHERE replica_id = $1 AND seq = $2"
