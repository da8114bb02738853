"""The single-statement writers for PostgreSQL (data-modifying CTEs).

Notes that apply to all of them:
- Bind parameters are ``:name``, compiled once to ``$n`` by ``persistence._sql``
  (which skips quoted strings and comments); casts of parameters are spelled
  ``CAST(:x AS jsonb)``, the habit from SQLAlchemy's ``text()``, which did not
  recognise ``:x::jsonb`` as a parameter.
- A CTE's plain SELECT sees the snapshot from before the statement, so rows
  inserted by a concurrent winner are invisible here: the caller resolves a lost
  race with one extra lookup.
- Sub-statements of one WITH run in an unspecified order; where order matters a
  CTE references the one that must run first (``(SELECT count(*) FROM x) >= 0``).
- No literal percent sign anywhere: `databases`' SQLite backend reads one as a
  parameter marker, and one habit for both dialects is simpler to keep.
"""

from __future__ import annotations

# The arbiter of a turn's rows: the partial unique index over the rows that are not
# superseded (a regenerated reply keeps its old row, outside the index).
ON_TURN_CONFLICT = (
    "ON CONFLICT (thread_id, turn_id, role) "
    "WHERE turn_id IS NOT NULL AND status <> 'superseded' DO NOTHING"
)

# Estimated usage of rows in CTE ``expired(id, thread_id, content, owner_id)``:
# completion tokens = ceil(chars / 4) of every part's text.
_ESTIMATED_USAGE = """
    INSERT INTO token_usage (usage_type, prompt_tokens, completion_tokens, total_tokens,
        cost_micros, model_breakdown, call_details, estimated, thread_id, message_id,
        user_id, created_at)
    SELECT 'chat', 0, est.tokens, est.tokens, 0, '{}'::jsonb, '[]'::jsonb, true,
        e.thread_id, e.id, e.owner_id, now()
    FROM expired e CROSS JOIN LATERAL (
        SELECT (coalesce(sum(length(p ->> 'text')), 0) + 3) / 4 AS tokens
        FROM jsonb_array_elements(e.content) AS p
    ) AS est
    ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO NOTHING
    RETURNING 1
"""

OPEN_TURN = f"""
WITH th AS (
    SELECT id, owner_id FROM threads WHERE id = :thread_id AND owner_id = :owner_id
),
mine AS (
    SELECT m.id, m.role, m.status FROM messages m JOIN th ON m.thread_id = th.id
    WHERE m.turn_id = :turn_id AND m.status <> 'superseded'
),
holder AS (
    SELECT m.id, m.turn_id, coalesce(m.lease_expires_at < now(), false) AS expired
    FROM messages m JOIN th ON m.thread_id = th.id
    WHERE m.status = 'streaming' AND m.turn_id IS DISTINCT FROM :turn_id
),
blocked AS (
    SELECT turn_id FROM holder
    WHERE NOT expired AND NOT EXISTS (SELECT 1 FROM mine WHERE role = 'assistant')
),
expired AS (
    UPDATE messages m SET status = 'interrupted', lease_owner = NULL,
        lease_expires_at = NULL, updated_at = now()
    FROM holder h, th
    WHERE m.id = h.id AND h.expired AND m.status = 'streaming'
    RETURNING m.id, m.thread_id, m.content, th.owner_id
),
expired_usage AS ({_ESTIMATED_USAGE}),
go AS (
    SELECT th.id FROM th
    WHERE NOT EXISTS (SELECT 1 FROM blocked)
      AND (SELECT count(*) FROM expired_usage) >= 0
),
ins_user AS (
    INSERT INTO messages (thread_id, role, content, status, author_id, turn_id,
        created_at, updated_at)
    SELECT go.id, 'user', CAST(:user_content AS jsonb), 'complete', :owner_id, :turn_id,
        now(), now()
    FROM go
    {ON_TURN_CONFLICT}
    RETURNING id
),
ins_assistant AS (
    INSERT INTO messages (thread_id, role, content, status, turn_id, lease_owner,
        lease_expires_at, created_at, updated_at)
    SELECT go.id, 'assistant', CAST(:shell AS jsonb), 'streaming', :turn_id,
        CAST(:lease_owner AS text),
        now() + make_interval(secs => CAST(:lease_seconds AS double precision)), now(), now()
    FROM go
    WHERE (SELECT count(*) FROM ins_user) >= 0  -- user row first: its id is the smaller
    {ON_TURN_CONFLICT}
    RETURNING id
),
titling AS (  -- a first turn's title (:title) for an untitled thread
    SELECT CAST(:title AS text) AS title FROM threads t JOIN go ON t.id = go.id
    WHERE t.title IS NULL AND CAST(:title AS text) IS NOT NULL
      AND EXISTS (SELECT 1 FROM ins_assistant)
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = go.id
                      AND m.turn_id IS DISTINCT FROM :turn_id)
),
bump AS (
    UPDATE threads SET updated_at = now(), title = coalesce(title, (SELECT title FROM titling))
    WHERE id = (SELECT id FROM go)
      AND EXISTS (SELECT 1 FROM ins_user UNION ALL SELECT 1 FROM ins_assistant)
    RETURNING title
)
SELECT
    EXISTS (SELECT 1 FROM th) AS thread_found,
    (SELECT turn_id FROM blocked LIMIT 1) AS busy_turn_id,
    (SELECT id FROM ins_user) AS user_new,
    (SELECT id FROM ins_assistant) AS assistant_new,
    (SELECT id FROM mine WHERE role = 'user') AS user_old,
    (SELECT id FROM mine WHERE role = 'assistant') AS assistant_old,
    (SELECT status FROM mine WHERE role = 'assistant') AS assistant_old_status,
    EXISTS (SELECT 1 FROM titling JOIN bump ON bump.title = titling.title) AS titled,
    (SELECT count(*) FROM bump) AS bumped
"""

# ``open_turn(with_history=True)``: the same statement, plus the thread's earlier
# messages as one json array (oldest first, the ``:history_limit`` most recent), only
# when this statement inserted the assistant row (a generation starts). The CTE
# snapshot predates the statement, so this turn's new rows are not in it; rows of this
# turn that existed already (a legacy user row) are excluded by turn_id. A holder that
# this statement marked interrupted shows its new status. Timestamps in ``_iso`` form.
_HISTORY = """,
    CASE WHEN EXISTS (SELECT 1 FROM ins_assistant) THEN (
        SELECT coalesce(json_agg(json_build_object(
            'id', h.id, 'thread_id', h.thread_id, 'role', h.role, 'content', h.content,
            'status', h.status, 'turn_id', h.turn_id,
            'created_at', to_char(h.created_at AT TIME ZONE 'UTC',
                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'updated_at', to_char(h.updated_at AT TIME ZONE 'UTC',
                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        ) ORDER BY h.id), '[]'::json)
        FROM (
            SELECT m.id, m.thread_id, m.role, m.content, m.turn_id, m.created_at,
                CASE WHEN e.id IS NULL THEN m.status ELSE 'interrupted' END AS status,
                CASE WHEN e.id IS NULL THEN m.updated_at ELSE now() END AS updated_at
            FROM messages m JOIN th ON m.thread_id = th.id
            LEFT JOIN expired e ON e.id = m.id
            WHERE m.turn_id IS DISTINCT FROM :turn_id AND m.status <> 'superseded'
            ORDER BY m.id DESC
            LIMIT CAST(:history_limit AS bigint)
        ) AS h
    ) END AS history
"""

OPEN_TURN_WITH_HISTORY = OPEN_TURN.rstrip().removesuffix("AS bumped") + "AS bumped" + _HISTORY

# ``open_turn(key_prefix=..., key_hash=...)``: the same statements, gated on the caller's
# API key still being valid (a cached key skips the authenticate round trip, so the
# open itself re-checks revocation). ``th`` is empty for a revoked or unknown key,
# so nothing is written; ``key_ok`` tells that apart from a missing thread.
_KEY_OK = """WITH key_ok AS (
    SELECT EXISTS (
        SELECT 1 FROM api_keys
        WHERE prefix = CAST(:key_prefix AS text) AND secret_hash = CAST(:key_hash AS text)
          AND revoked_at IS NULL AND user_id = :owner_id
    ) AS ok
),
th AS (
    SELECT id, owner_id FROM threads WHERE id = :thread_id AND owner_id = :owner_id
      AND (SELECT ok FROM key_ok)
),"""


def _keyed(sql: str) -> str:
    head = """WITH th AS (
    SELECT id, owner_id FROM threads WHERE id = :thread_id AND owner_id = :owner_id
),"""
    select = "\nSELECT\n"
    assert sql.count(head) == 1 and sql.count(select) == 1
    sql = sql.replace(head, _KEY_OK)
    return sql.replace(select, select + "    (SELECT ok FROM key_ok) AS key_ok,\n")


OPEN_TURN_KEYED = _keyed(OPEN_TURN)
OPEN_TURN_WITH_HISTORY_KEYED = _keyed(OPEN_TURN_WITH_HISTORY)

APPEND_MESSAGE = f"""
WITH th AS (
    SELECT id FROM threads WHERE id = :thread_id AND owner_id = :owner_id
),
ins AS (
    INSERT INTO messages (thread_id, role, content, status, author_id, turn_id,
        created_at, updated_at)
    SELECT th.id, CAST(:role AS text), CAST(:content AS jsonb), 'complete',
        CAST(:author_id AS bigint), CAST(:turn_id AS text), now(), now()
    FROM th
    {ON_TURN_CONFLICT}
    RETURNING id
),
bump AS (
    UPDATE threads SET updated_at = now()
    WHERE id = (SELECT id FROM th) AND EXISTS (SELECT 1 FROM ins)
    RETURNING 1
)
SELECT
    EXISTS (SELECT 1 FROM th) AS thread_found,
    (SELECT id FROM ins) AS new_id,
    (SELECT m.id FROM messages m JOIN th ON m.thread_id = th.id
     WHERE m.turn_id = CAST(:turn_id AS text) AND m.role = CAST(:role AS text)
       AND m.status <> 'superseded') AS old_id,
    (SELECT count(*) FROM bump) AS bumped
"""

# The final write wins over a reaper's ``interrupted`` (the owner outlived its lease, e.g.
# a database outage longer than it): the row is overwritten, and the reaper's estimated
# usage row is replaced by the real one (``DO UPDATE`` only when ``upd`` wrote the row, so
# a late finalize of a row that is final for good still leaves its one usage row alone).
# Only the owning process finalizes a turn, once, so an ``interrupted`` row it finalizes
# was marked so by a reaper, or by an earlier attempt of its own whose answer was lost.
FINALIZE_TURN = """
WITH upd AS (
    UPDATE messages SET content = CAST(:content AS jsonb), status = CAST(:status AS text),
        event_map = CAST(:event_map AS text),
        updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
    WHERE id = :message_id AND status IN ('streaming', 'interrupted')
    RETURNING id
),
usage AS (
    INSERT INTO token_usage (usage_type, prompt_tokens, completion_tokens, total_tokens,
        cost_micros, model_breakdown, call_details, estimated, thread_id, message_id,
        user_id, created_at)
    VALUES (:usage_type, :prompt_tokens, :completion_tokens, :total_tokens, :cost_micros,
        CAST(:model_breakdown AS jsonb), CAST(:call_details AS jsonb), :estimated,
        :thread_id, :message_id, :user_id, now())
    ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO UPDATE SET
        usage_type = EXCLUDED.usage_type, prompt_tokens = EXCLUDED.prompt_tokens,
        completion_tokens = EXCLUDED.completion_tokens, total_tokens = EXCLUDED.total_tokens,
        cost_micros = EXCLUDED.cost_micros, model_breakdown = EXCLUDED.model_breakdown,
        call_details = EXCLUDED.call_details, estimated = EXCLUDED.estimated
    WHERE EXISTS (SELECT 1 FROM upd)
    RETURNING id
)
SELECT (SELECT count(*) FROM upd) AS updated, (SELECT count(*) FROM usage) AS usage_inserted
"""

# Leases run from the statement's own clock (``clock_timestamp()``), not the start of its
# transaction: a renewal that waited behind a lock (LOCK TABLE, 20 s) must not write a
# lease that has already run out by the time it commits.
_LEASE_END = "clock_timestamp() + make_interval(secs => CAST(:lease_seconds AS double precision))"

CHECKPOINT = f"""
UPDATE messages SET content = CAST(:content AS jsonb), updated_at = now(),
    event_map = CAST(:event_map AS text), lease_expires_at = {_LEASE_END}
WHERE id = :message_id AND status = 'streaming' AND lease_owner = :lease_owner
RETURNING id
"""

# ``checkpoint_many``: the rows named, each with its own content, in one statement; only
# those still ``streaming`` under our lease are written (RETURNING says which).
CHECKPOINT_MANY = f"""
UPDATE messages m SET content = CAST(v.content AS jsonb), updated_at = now(),
    event_map = v.event_map, lease_expires_at = {_LEASE_END}
FROM unnest(CAST(:ids AS bigint[]), CAST(:contents AS text[]), CAST(:event_maps AS text[]))
    AS v(id, content, event_map)
WHERE m.id = v.id AND m.status = 'streaming' AND m.lease_owner = CAST(:lease_owner AS text)
RETURNING m.id
"""

# ``checkpoint(reclaim=True)``: the owner found its lease lost (a checkpoint or renewal
# missed its row). A row a reaper marked ``interrupted`` (lease_owner NULL) goes back to
# ``streaming`` under our lease with our content, if no other turn streams on its thread
# meanwhile (the one-streaming-row index would refuse it anyway); the reaper's estimated
# usage row goes with it, so the turn again has no usage row until it is finalized (or
# reaped once more). A row still ours is simply checkpointed.
RECLAIM = f"""
WITH upd AS (
    UPDATE messages m SET content = CAST(:content AS jsonb), updated_at = now(),
        event_map = CAST(:event_map AS text),
        status = 'streaming', lease_owner = CAST(:lease_owner AS text),
        lease_expires_at = {_LEASE_END}
    WHERE m.id = :message_id AND (
        (m.status = 'streaming' AND m.lease_owner = CAST(:lease_owner AS text))
        OR (m.status = 'interrupted' AND m.lease_owner IS NULL AND NOT EXISTS (
            SELECT 1 FROM messages o
            WHERE o.thread_id = m.thread_id AND o.status = 'streaming' AND o.id <> m.id)))
    RETURNING m.id
),
dropped AS (
    DELETE FROM token_usage
    WHERE message_id IN (SELECT id FROM upd) AND estimated
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd) AS updated, (SELECT count(*) FROM dropped) AS dropped
"""

# Only the rows named (the turns this process still generates or still tries to
# finalize), and only while they are ours: a row whose finalize failed, or that another
# replica took, is no longer renewed by a process that merely has it on record.
RENEW_LEASES = f"""
UPDATE messages SET lease_expires_at = {_LEASE_END}
WHERE id = ANY(CAST(:ids AS bigint[])) AND lease_owner = CAST(:lease_owner AS text)
    AND status = 'streaming'
RETURNING id
"""

RECOVER_EXPIRED = f"""
WITH expired AS (
    UPDATE messages m SET status = 'interrupted', lease_owner = NULL,
        lease_expires_at = NULL, updated_at = now()
    FROM threads t
    WHERE t.id = m.thread_id AND m.status = 'streaming' AND m.lease_expires_at < now()
    RETURNING m.id, m.thread_id, m.content, t.owner_id
),
usage AS ({_ESTIMATED_USAGE})
SELECT e.id FROM expired e WHERE (SELECT count(*) FROM usage) >= 0 ORDER BY e.id
"""

STREAMING_TURN_OF_THREAD = """
SELECT turn_id FROM messages WHERE thread_id = :thread_id AND status = 'streaming'
"""

# ``finalize_turns``: ``FINALIZE_TURN`` for a whole batch in one statement (the same
# overwrite of a reaper's ``interrupted``). ``:batch`` is
# a json array of objects (the columns below, ``idx`` = position in the batch). A message
# that appears more than once is finalized by its first occurrence only (``firsts``),
# as if the items ran in order: the later ones find the row final (``row_missing``) and
# their usage row a conflict. Returns the ``idx`` of every item whose row it updated.
FINALIZE_TURNS = """
WITH batch AS (
    SELECT * FROM jsonb_to_recordset(CAST(:batch AS jsonb)) AS b(
        idx integer, message_id bigint, content jsonb, status text, usage_type text,
        prompt_tokens bigint, completion_tokens bigint, total_tokens bigint,
        cost_micros bigint, model_breakdown jsonb, call_details jsonb, estimated boolean,
        thread_id text, user_id bigint, event_map text)
),
firsts AS (
    SELECT DISTINCT ON (message_id) * FROM batch ORDER BY message_id, idx
),
upd AS (
    UPDATE messages m SET content = f.content, status = f.status, updated_at = now(),
        event_map = f.event_map, lease_owner = NULL, lease_expires_at = NULL
    FROM firsts f
    WHERE m.id = f.message_id AND m.status IN ('streaming', 'interrupted')
    RETURNING m.id
),
usage AS (
    INSERT INTO token_usage (usage_type, prompt_tokens, completion_tokens, total_tokens,
        cost_micros, model_breakdown, call_details, estimated, thread_id, message_id,
        user_id, created_at)
    SELECT usage_type, prompt_tokens, completion_tokens, total_tokens, cost_micros,
        model_breakdown, call_details, estimated, thread_id, message_id, user_id, now()
    FROM firsts ORDER BY message_id
    ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO UPDATE SET
        usage_type = EXCLUDED.usage_type, prompt_tokens = EXCLUDED.prompt_tokens,
        completion_tokens = EXCLUDED.completion_tokens, total_tokens = EXCLUDED.total_tokens,
        cost_micros = EXCLUDED.cost_micros, model_breakdown = EXCLUDED.model_breakdown,
        call_details = EXCLUDED.call_details, estimated = EXCLUDED.estimated
    WHERE EXCLUDED.message_id IN (SELECT id FROM upd)
    RETURNING id
)
SELECT f.idx FROM firsts f JOIN upd u ON u.id = f.message_id
"""
