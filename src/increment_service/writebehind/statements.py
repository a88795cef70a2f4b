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


# A batch of requests without Idempotency-Keys (a durable group, as a rule) whose every
# running total was found to fit (inorder.running_bounds): the plain statement, which fails
# whole if a counter's new total leaves bigint, and which also fails whole if, for a counter
# several requests change, the lowest or highest running total ($6, $7: relative to the new
# total, for the counters $5) would: the casts to bigint raise numeric_value_out_of_range.
# Then nothing was applied and the batch goes the in-order way. So the order of the requests
# costs nothing unless a total is near the edge. With $8 true (a request asked for
# return=representation), the counters' new totals and the commit's time come back too.
APPLY_BOUNDED_SQL = f"""{_RECORD_BATCH}, upserted AS (
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT d.key, d.delta, now()
    FROM {_unnest_joined("$3", "$4")} AS d (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
    ORDER BY d.key COLLATE "C"
    {_ADD_TO_COUNTER}
    RETURNING c.key, c.value
), bound AS (
    SELECT b.key, b.low, b.high
    FROM unnest(
        string_to_array($5::text, {_SEPARATOR}),
        string_to_array($6::text, ',')::numeric[],
        string_to_array($7::text, ',')::numeric[]
    ) AS b (key, low, high)
)
SELECT EXISTS (SELECT FROM fresh) AS fresh,
       (SELECT count((u.value + b.low)::bigint) + count((u.value + b.high)::bigint)
        FROM upserted AS u JOIN bound AS b ON b.key = u.key) AS checked,
       t.keys, t.totals, now() AS at
FROM (SELECT array_agg(u.key) AS keys, array_agg(u.value) AS totals
      FROM upserted AS u WHERE $8) AS t
"""


# Applies `delta` (key, delta, at: keys whose sum fits a bigint) and `wide` (the rare sums that
# do not), which the statement defines before it. A key whose new total would leave bigint is
# not updated (the WHERE of DO UPDATE) and is reported back as rejected; every other key is
# still applied. A wide delta can only update an existing row whose total then still fits,
# since a new row would hold the delta itself. `at` is the new updated_at: now(), or
# -infinity to lock a row without touching it (greatest() keeps the stored time).
def _apply(record_rejections: str) -> str:
    """The apply fragment; ``record_rejections``: CTEs after it that record what was rejected,
    where a retry of the batch finds it."""
    recorded = record_rejections
    return f"""
upserted AS (
    INSERT INTO counters AS c (key, value, updated_at)
    SELECT key, delta, at FROM delta ORDER BY key COLLATE "C"
    ON CONFLICT (key) DO UPDATE
        SET value = c.value + excluded.value,
            updated_at = greatest(c.updated_at, excluded.updated_at)
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
){recorded}
SELECT EXISTS (SELECT FROM fresh) AS fresh, (SELECT keys FROM rejected) AS rejected"""


_WIDE_ROWS = "unnest($5::text[], $6::numeric[])"

_RECORD_REJECTED_KEYS = """, recorded AS (
    INSERT INTO batch_rejections (replica_id, seq, keys, recorded_at)
    SELECT $1, $2, keys, now() FROM rejected WHERE cardinality(keys) > 0
)"""

# A batch of requests none of which has a key and none of which shares a counter with another
# ($16 true; $17 the index of each item in its request): the requests whose counter was
# refused are known here, each counter having one request, and are recorded at once. Then the
# statement needs no second one, and no transaction of its own.
_RECORD_REJECTED_REQUESTS = f""", recorded AS (
    INSERT INTO request_rejections (replica_id, seq, request, items, recorded_at)
    SELECT $1, $2, i.n, array_agg(i.item ORDER BY i.item), now()
    FROM unnest(
        $11::bigint[], $17::integer[], string_to_array($12::text, {_SEPARATOR})
    ) AS i (n, item, key)
    WHERE $16 AND i.key = ANY ((SELECT keys FROM rejected)::text[])
    GROUP BY i.n
)"""

# Summed deltas, with which keys were rejected ($3 keys joined, $4 deltas joined; $5/$6 the
# wide ones as arrays).
APPLY_BATCH_SQL = f"""{_RECORD_BATCH}, delta AS (
    SELECT d.key, d.delta, now() AS at
    FROM {_unnest_joined("$3", "$4")} AS d (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), wide AS (
    SELECT w.key, w.delta
    FROM {_WIDE_ROWS} AS w (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), {_apply(_RECORD_REJECTED_KEYS)}"""

#: The bucket of a key's record and the live window: a record is live for
#: IDEMPOTENCY_TTL_SECONDS ($ttl) after it was recorded (Postgres's clock), and so lies in the
#: current bucket's partition or the one before.
_BUCKET = "floor(extract(epoch FROM now()) / {ttl})::bigint"


def _live(ttl: str, slots: str) -> str:
    """The condition on a record ``k`` of idempotency_keys to be live."""
    bucket = _BUCKET.format(ttl=ttl)
    return f"""k.slot IN (({bucket} % {slots}::bigint)::smallint,
                  (({bucket} - 1) % {slots}::bigint)::smallint)
          AND k.recorded_at > now() - make_interval(secs => {ttl}::double precision)"""


# Before a batch claims its keys near a bucket boundary ($4 seconds on either side of one, by
# Postgres's clock; $3 IDEMPOTENCY_TTL_SECONDS): transaction-level advisory locks, taken in one
# order, so that two statements claiming one key in two partitions (one on each side of the
# boundary) run one after the other, and the second, whose snapshot starts after the first
# committed, sees its record. Away from a boundary no lock is needed (statements claiming one
# key meet on the one partition's unique index) and none is taken. The locks are 64 stripes
# of the keys (one int4 namespace of two-key advisory locks): a bounded number per transaction
# whatever the batch, at the price of unrelated keys that share a stripe waiting on each other
# there. ($1 scopes, $2 keys.)
LOCK_KEYS_SQL = """
SELECT count(pg_advisory_xact_lock(1229870927, stripe)) FROM (
    SELECT DISTINCT (hashtextextended(s || E'\\x1f' || k, 0) & 63)::integer AS stripe
    FROM unnest($1::text[], $2::text[]) AS t (s, k)
    WHERE extract(epoch FROM now())::numeric % $3 < $4
       OR $3 - extract(epoch FROM now())::numeric % $3 < $4
    ORDER BY stripe
) AS locks
"""

# A batch with requests ($7-$10 one per request: scope, key, fingerprint (NULL for a request
# without an Idempotency-Key) and whether its first answer is durable; $11 the request
# (1-based) of each item, $12 the items' counter keys (joined), $13 their values (joined);
# $14 IDEMPOTENCY_TTL_SECONDS, $15 the number of partitions (tables.IDEMPOTENCY_SLOTS)),
# besides the summed deltas ($3-$6). A keyed request counts only if its key is claimed:
# inserted into the current bucket's partition, where no live record of it exists. Each
# request applies its items per counter as if it had committed alone, in order: a counter
# that only one request (or only the summed deltas) changes is applied or refused here; a
# counter that several change is only locked here (in the same order as every other row, so
# that statements cannot deadlock), and store.py settles it, request by request, on the
# locked row.
APPLY_REQUESTS_SQL = f"""{_RECORD_BATCH}, request AS (
    SELECT r.n, r.scope, r.key, r.fingerprint, r.durable
    FROM unnest($7::text[], $8::text[], $9::bytea[], $10::boolean[])
        WITH ORDINALITY AS r (scope, key, fingerprint, durable, n)
    WHERE EXISTS (SELECT FROM fresh)
), live AS (
    SELECT r.n, k.fingerprint, coalesce(k.durable, false) AS durable, k.not_applied,
           extract(epoch FROM now() - k.recorded_at)::double precision AS age, k.totals,
           k.recorded_at
    FROM request AS r
    JOIN idempotency_keys AS k ON k.scope = r.scope AND k.key = r.key
    WHERE {_live("$14", "$15")}
), claim AS (
    INSERT INTO idempotency_keys AS k
        (slot, scope, key, bucket, fingerprint, recorded_at, durable)
    SELECT ({_BUCKET.format(ttl="$14")} % $15::bigint)::smallint, r.scope, r.key,
           {_BUCKET.format(ttl="$14")}, r.fingerprint, now(), r.durable
    FROM request AS r
    WHERE r.key IS NOT NULL AND r.n NOT IN (SELECT n FROM live)
    ORDER BY r.scope COLLATE "C", r.key COLLATE "C"
    ON CONFLICT (slot, scope, key) DO UPDATE
        SET bucket = excluded.bucket, fingerprint = excluded.fingerprint,
            recorded_at = excluded.recorded_at, durable = excluded.durable, not_applied = NULL
        -- A record past its TTL, in a partition not emptied yet, is taken over.
        WHERE k.recorded_at <= now() - make_interval(secs => $14::double precision)
    RETURNING k.scope, k.key
), applied_request AS (
    SELECT r.n FROM request AS r WHERE r.key IS NULL
    UNION ALL
    SELECT r.n FROM request AS r JOIN claim AS c ON c.scope = r.scope AND c.key = r.key
), contribution AS (
    SELECT i.key, sum(i.value)::numeric AS delta
    FROM {_unnest_joined("$12", "$13", first="$11::bigint[], ")} AS i (n, key, value)
    WHERE i.n IN (SELECT n FROM applied_request)
    GROUP BY i.n, i.key
    UNION ALL
    SELECT u.key, u.delta::numeric
    FROM {_unnest_joined("$3", "$4")} AS u (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
    UNION ALL
    SELECT w.key, w.delta
    FROM {_WIDE_ROWS} AS w (key, delta)
    WHERE EXISTS (SELECT FROM fresh)
), every_delta AS (
    SELECT key, sum(delta) AS delta, count(*) AS parts FROM contribution GROUP BY key
), delta AS (
    SELECT key, CASE WHEN parts = 1 THEN delta::bigint ELSE 0 END AS delta,
           CASE WHEN parts = 1 THEN now() ELSE '-infinity'::timestamptz END AS at
    FROM every_delta
    WHERE parts > 1 OR delta BETWEEN -9223372036854775808 AND 9223372036854775807
), wide AS (
    SELECT key, delta FROM every_delta
    WHERE parts = 1 AND NOT delta BETWEEN -9223372036854775808 AND 9223372036854775807
), {_apply(_RECORD_REJECTED_REQUESTS)},
    ARRAY (SELECT n FROM applied_request ORDER BY n) AS applied,
    ARRAY (SELECT key FROM every_delta WHERE parts > 1) AS shared,
    -- The live records of the keys that were not claimed, as far as this statement can see,
    -- as parallel arrays (not_applied joined by commas).
    ARRAY (SELECT n FROM live ORDER BY n) AS recorded_n,
    ARRAY (SELECT fingerprint FROM live ORDER BY n) AS recorded_fingerprint,
    ARRAY (SELECT durable FROM live ORDER BY n) AS recorded_durable,
    ARRAY (SELECT coalesce(array_to_string(not_applied, ','), '') FROM live ORDER BY n)
        AS recorded_not_applied,
    ARRAY (SELECT age FROM live ORDER BY n) AS recorded_age,
    ARRAY (SELECT coalesce(totals::text, '') FROM live ORDER BY n) AS recorded_totals,
    ARRAY (SELECT recorded_at FROM live ORDER BY n) AS recorded_at,
    extract(epoch FROM now())::double precision AS postgres_now"""

# The counters several requests of a batch change, locked by the statement above: their
# values, and which rows it inserted as placeholders (nothing applied yet).
LOCKED_COUNTERS_SQL = """
SELECT key, value, updated_at = '-infinity' AS placeholder
FROM counters WHERE key = ANY($1::text[])
ORDER BY key COLLATE "C"
FOR UPDATE
"""
SET_COUNTERS_SQL = """
UPDATE counters AS c SET value = u.value, updated_at = now()
FROM unnest($1::text[], $2::bigint[]) AS u (key, value)
WHERE c.key = u.key
"""
DROP_PLACEHOLDERS_SQL = (
    "DELETE FROM counters WHERE key = ANY($1::text[]) AND updated_at = '-infinity'"
)

# What a batch with requests did not apply: per request ($3 the requests, 1-based; $4 the
# indexes of their items, joined by commas), per key of the summed deltas ($5), and with the
# keys it claimed ($6 scopes, $7 keys, $8 indexes joined; $9 IDEMPOTENCY_TTL_SECONDS, $10 the
# partitions). The claims were inserted by this transaction, at its now().
RECORD_REJECTIONS_SQL = f"""
WITH per_request AS (
    INSERT INTO request_rejections (replica_id, seq, request, items, recorded_at)
    SELECT $1, $2, r.n, string_to_array(r.items, ',')::integer[], now()
    FROM unnest($3::integer[], $4::text[]) AS r (n, items)
), per_key AS (
    INSERT INTO batch_rejections (replica_id, seq, keys, recorded_at)
    SELECT $1, $2, $5::text[], now() WHERE cardinality($5::text[]) > 0
)
UPDATE idempotency_keys AS k SET not_applied = string_to_array(u.items, ',')::integer[]
FROM unnest($6::text[], $7::text[], $8::text[]) AS u (scope, key, items)
WHERE k.slot = ({_BUCKET.format(ttl="$9")} % $10::bigint)::smallint
  AND k.scope = u.scope AND k.key = u.key AND k.recorded_at = now()
"""

# return=representation, after a batch applied in order (in its transaction, which holds the
# rows' locks): the counters' totals now ($1 their keys), and the commit's time.
READ_TOTALS_SQL = """
SELECT key, value, now() AS at FROM counters WHERE key = ANY($1::text[])
"""
# ...kept in the records of the keyed requests that asked ($1 scopes, $2 keys, $3 the totals as
# JSON ([[counter key, total], ...]); $4 IDEMPOTENCY_TTL_SECONDS, $5 the partitions), which
# this transaction claimed at its now().
RECORD_TOTALS_SQL = f"""
UPDATE idempotency_keys AS k SET totals = u.totals::jsonb
FROM unnest($1::text[], $2::text[], $3::text[]) AS u (scope, key, totals)
WHERE k.slot = ({_BUCKET.format(ttl="$4")} % $5::bigint)::smallint
  AND k.scope = u.scope AND k.key = u.key AND k.recorded_at = now()
"""

# A retry of a batch applied before: what it did not apply then.
REQUEST_REJECTIONS_SQL = (
    "SELECT request, items FROM request_rejections WHERE replica_id = $1 AND seq = $2"
)

PRUNE_SQL = """
WITH batches AS (DELETE FROM applied_batches WHERE applied_at < now() - interval '1 day'),
requests AS (DELETE FROM request_rejections WHERE recorded_at < now() - interval '1 day')
DELETE FROM batch_rejections WHERE recorded_at < now() - interval '1 day'
"""
BUCKET_SQL = """
SELECT b AS bucket, (b + 1) * $1 - extract(epoch FROM clock_timestamp()) AS left
FROM (SELECT floor(extract(epoch FROM clock_timestamp()) / $1)::bigint AS b) AS t
"""
# The live records of some keys ($1 scopes, $2 keys; $3 IDEMPOTENCY_TTL_SECONDS, $4 the
# partitions): a primary-key lookup in the two partitions a live record can be in.
RECORDED_SQL = f"""
SELECT k.scope, k.key, k.fingerprint, coalesce(k.durable, false) AS durable, k.not_applied,
       extract(epoch FROM now() - k.recorded_at)::double precision AS age, k.totals::text,
       k.recorded_at
FROM unnest($1::text[], $2::text[]) AS r (scope, key)
JOIN idempotency_keys AS k ON k.scope = r.scope AND k.key = r.key
WHERE {_live("$3", "$4")}
"""
REJECTED_BEFORE_SQL = "SELECT keys FROM batch_rejections WHERE replica_id = $1 AND seq = $2"
