-- Named queries of the PostgreSQL store (spoolq/store/pg/sql.py loads them). Values are
-- always parameters; "now" is %(now)s when the caller gives one (tests' fake clocks), else
-- the database's clock, spoolq.now().

-- ---- the store as a whole --------------------------------------------------------------
-- name: setting_get
SELECT value FROM spoolq.settings WHERE key = %(key)s

-- name: setting_put
INSERT INTO spoolq.settings (key, value) VALUES (%(key)s, %(value)s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value WHERE settings.value IS DISTINCT FROM EXCLUDED.value

-- name: host_register
INSERT INTO spoolq.hosts (name) VALUES (%(name)s) RETURNING id

-- name: host_lock
SELECT pg_try_advisory_lock(%(lock)s::int, %(id)s::int) AS locked

-- name: host_unregister
-- The lock let go here, not by closing the session: a backend ends a little after its
-- client hangs up, and until then the host would still count as live.
WITH gone AS (DELETE FROM spoolq.hosts WHERE id = %(id)s)
SELECT pg_advisory_unlock(%(lock)s::int, %(id)s::int)

-- name: hosts_forget_dead
DELETE FROM spoolq.hosts h WHERE NOT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.classid = %(lock)s AND l.objid = h.id AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))

-- name: hosts_live
SELECT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.classid = %(lock)s AND l.objsubid = 2 AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS live

-- ---- queues -------------------------------------------------------------------------------
-- name: queue_get
SELECT config, paused, down, script_error FROM spoolq.queues WHERE name = %(queue)s

-- name: queue_insert
INSERT INTO spoolq.queues (name, config) VALUES (%(queue)s, %(config)s) ON CONFLICT DO NOTHING

-- name: queue_update
UPDATE spoolq.queues SET config = %(config)s WHERE name = %(queue)s

-- name: queue_lock
SELECT name FROM spoolq.queues WHERE name = %(queue)s FOR UPDATE

-- name: queue_delete
DELETE FROM spoolq.queues WHERE name = %(queue)s

-- name: queue_names
SELECT name FROM spoolq.queues ORDER BY name

-- name: queue_set_flag
UPDATE spoolq.queues SET paused = coalesce(%(paused)s, paused), down = coalesce(%(down)s, down)
WHERE name = %(queue)s

-- name: queue_set_script_error
UPDATE spoolq.queues SET script_error = %(why)s WHERE name = %(queue)s

-- name: queue_counts
-- The queue's deltas summed per key (NULL key: the queue exists, no deltas); rows: how many
-- deltas were summed, so the caller knows when to compact.
SELECT d.key, sum(d.n) AS n, count(d.id) AS rows FROM spoolq.queues q
LEFT JOIN spoolq.count_deltas d ON d.queue = q.name
WHERE q.name = %(queue)s GROUP BY d.key

-- name: counts_lock
SELECT pg_try_advisory_xact_lock(%(lock)s::int, hashtext(%(queue)s)) AS locked

-- name: counts_compact
-- Fold the queue's deltas into one row per key (under counts_lock, so compactions do not
-- meet; deltas committed meanwhile are not seen by the DELETE and stay as they are).
WITH gone AS (DELETE FROM spoolq.count_deltas WHERE queue = %(queue)s RETURNING key, n)
INSERT INTO spoolq.count_deltas (queue, key, n)
SELECT %(queue)s, key, sum(n) FROM gone GROUP BY key HAVING sum(n) <> 0

-- name: counts_forget
DELETE FROM spoolq.count_deltas WHERE queue = %(queue)s

-- name: counts_wait_lock
SELECT pg_advisory_xact_lock(%(lock)s::int, hashtext(%(queue)s))

-- name: counts_from_messages
-- recount (under counts_wait_lock): the deltas rebuilt from the messages. One statement, one
-- snapshot: a change committed before it is in both the DELETE and the count, one committed
-- after it in neither (its delta stays and applies).
WITH gone AS (DELETE FROM spoolq.count_deltas WHERE queue = %(queue)s)
INSERT INTO spoolq.count_deltas (queue, key, n)
SELECT queue, spoolq.count_key(state, acked), count(*) FROM spoolq.messages WHERE queue = %(queue)s GROUP BY 1, 2

-- ---- messages -------------------------------------------------------------------------------
-- name: new_ids
SELECT spoolq.now() AS now, nextval('spoolq.msg_seq') AS n FROM generate_series(1, %(count)s)

-- name: queue_new_id
-- A new message's id parts, and whether its queue takes it (no row: no such queue).
SELECT q.down, spoolq.now() AS now, nextval('spoolq.msg_seq') AS n FROM spoolq.queues q
WHERE q.name = %(queue)s

-- name: message_insert
INSERT INTO spoolq.messages (queue, msg_id, state, due, param1, param2, param3, param4, msg, history)
VALUES (%(queue)s, %(msg_id)s, %(state)s, %(due)s, %(param1)s, %(param2)s, %(param3)s, %(param4)s, %(msg)s,
        %(history)s)
ON CONFLICT (queue, msg_id) DO NOTHING RETURNING msg_id

-- name: message_get
SELECT m.state, m.acked, m.status, m.msg, m.history, m.runner,
       (SELECT coalesce(jsonb_agg(jsonb_build_array(a.name, a.size, a.md5, a.sha256)), '[]')
        FROM spoolq.attachments a WHERE a.queue = m.queue AND a.msg_id = m.msg_id) AS attachments
FROM spoolq.messages m WHERE m.queue = %(queue)s AND m.msg_id = %(msg_id)s

-- name: message_state
SELECT state FROM spoolq.messages WHERE queue = %(queue)s AND msg_id = %(msg_id)s

-- name: message_lock
SELECT state, msg, history FROM spoolq.messages WHERE queue = %(queue)s AND msg_id = %(msg_id)s FOR UPDATE

-- name: message_move
-- One atomic step along the state table. Leaving que frees a held duplicate; leaving run
-- ends the attempt (docs/internals.md, the PostgreSQL store).
UPDATE spoolq.messages SET
    state = %(dst)s, acked = false, held_by = NULL,
    attempt_id = NULL, owner = NULL, lease_until = NULL, runner = NULL, cancel_requested = false,
    msg = coalesce(%(msg)s, msg), due = coalesce(%(due)s, due),
    param1 = coalesce(%(param1)s, param1), param2 = coalesce(%(param2)s, param2),
    param3 = coalesce(%(param3)s, param3), param4 = coalesce(%(param4)s, param4),
    history = history || spoolq.history_entry(%(dst)s, %(note)s)
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = %(src)s
RETURNING msg, history

-- name: message_rewrite
UPDATE spoolq.messages SET msg = %(msg)s, due = %(due)s,
    param1 = %(param1)s, param2 = %(param2)s, param3 = %(param3)s, param4 = %(param4)s
WHERE queue = %(queue)s AND msg_id = %(msg_id)s

-- name: message_set_status
UPDATE spoolq.messages SET status = %(status)s WHERE queue = %(queue)s AND msg_id = %(msg_id)s

-- name: messages_scan
-- Newest first, from below the cursor (id_time, id_n); '~' sorts after every digit.
SELECT msg_id, state, acked, status, msg, history FROM spoolq.messages
WHERE queue = %(queue)s AND state = %(state)s AND (id_time, id_n) < (%(c_time)s, %(c_n)s)
ORDER BY id_time DESC, id_n DESC LIMIT %(limit)s

-- name: single_que_lock
-- Taken by single_que until its transaction ends: two callers never both create.
SELECT pg_advisory_xact_lock(%(lock)s::int, hashtext(%(queue)s))

-- name: message_first_queued
SELECT msg_id FROM spoolq.messages WHERE queue = %(queue)s AND state = 'que'
ORDER BY id_time, id_n LIMIT 1

-- name: message_ids_scan
SELECT msg_id FROM spoolq.messages
WHERE queue = %(queue)s AND state = %(state)s AND (id_time, id_n) < (%(c_time)s, %(c_n)s)
ORDER BY id_time DESC, id_n DESC LIMIT %(limit)s

-- name: messages_attachments
SELECT msg_id, name, size, md5, sha256 FROM spoolq.attachments
WHERE queue = %(queue)s AND msg_id = ANY(%(ids)s::text[])

-- name: messages_delete
DELETE FROM spoolq.messages WHERE queue = %(queue)s AND msg_id = ANY(%(ids)s::text[]) AND state <> 'run'
RETURNING msg_id

-- name: messages_delete_in_state
DELETE FROM spoolq.messages WHERE queue = %(queue)s AND msg_id = ANY(%(ids)s::text[]) AND state = %(state)s
  AND (%(acked)s::boolean IS NULL OR acked = %(acked)s::boolean)
RETURNING msg_id

-- name: relay_key_get
SELECT k.msg_id FROM spoolq.relay_keys k
JOIN spoolq.messages m ON m.queue = k.queue AND m.msg_id = k.msg_id
WHERE k.queue = %(queue)s AND k.key = %(key)s AND k.created > %(since)s

-- name: relay_key_set
INSERT INTO spoolq.relay_keys (queue, key, msg_id, created) VALUES (%(queue)s, %(key)s, %(msg_id)s, %(now)s)
ON CONFLICT (queue, key) DO UPDATE SET msg_id = EXCLUDED.msg_id, created = EXCLUDED.created

-- name: relay_keys_prune
DELETE FROM spoolq.relay_keys WHERE queue = %(queue)s AND created < %(since)s

-- name: messages_states
SELECT msg_id, state FROM spoolq.messages WHERE queue = %(queue)s AND msg_id = ANY(%(ids)s::text[])

-- name: errs_ack
UPDATE spoolq.messages SET acked = true WHERE queue = %(queue)s AND state = 'err' AND NOT acked

-- ---- attempts (store/leases.py) ------------------------------------------------------------------
-- name: claim_lock
SELECT pg_advisory_xact_lock(%(lock)s::int, hashtext(%(queue)s))

-- name: running_count
SELECT count(*) AS n FROM spoolq.messages WHERE queue = %(queue)s AND state = 'run'

-- name: claim_take
-- The part of claim and claim_plain that takes the row their CTE "pick" chose (included by
-- both, never run alone): que -> run with a new attempt id and lease; returns the message,
-- its params (for the coalesce key) and its attachments' names (for workdir).
UPDATE spoolq.messages m SET
    state = 'run', acked = false, leases = m.leases + 1,
    attempt_id = m.msg_id || '.' || (m.leases + 1) || '.' || left(md5(random()::text), 8),
    owner = %(owner)s, runner = NULL,
    lease_until = coalesce(%(now)s, spoolq.now()) + %(lease)s,
    history = m.history || spoolq.history_entry('run', 'run')
FROM pick WHERE m.queue = pick.queue AND m.msg_id = pick.msg_id
RETURNING m.msg_id, m.msg, m.history, m.attempt_id, m.lease_until, m.cancel_requested,
          m.param1, m.param2, m.param3, m.param4,
          coalesce((SELECT jsonb_agg(a.name) FROM spoolq.attachments a
                    WHERE a.queue = m.queue AND a.msg_id = m.msg_id), '[]') AS names

-- name: claim
-- que -> run for the first (due, id) that is due, not held, not blocked by a running message
-- (leases.pick); SKIP LOCKED: a row another claimer is taking is passed over, never shared.
WITH pick AS (
    SELECT m.queue, m.msg_id FROM spoolq.messages m
    WHERE m.queue = %(queue)s AND m.state = 'que' AND m.held_by IS NULL
      AND m.due <= coalesce(%(now)s, spoolq.now())
      AND NOT spoolq.blocked(m.queue, m.param1, m.param2, m.param3, m.param4, %(blocking)s::int[])
    ORDER BY m.due, m.id_time, m.id_n
    LIMIT 1 FOR UPDATE SKIP LOCKED
)
-- include: claim_take

-- name: claim_plain
-- claim in one statement for a queue that is up and has neither blocking nor coalesce
-- params nor cluster_workers (checked once, in the same statement); no row: the caller takes
-- the general path, which tells a paused queue, such params, or nothing due.
WITH pick AS (
    SELECT m.queue, m.msg_id FROM spoolq.messages m
    WHERE m.queue = %(queue)s AND m.state = 'que' AND m.held_by IS NULL
      AND m.due <= coalesce(%(now)s, spoolq.now())
      AND EXISTS (SELECT 1 FROM spoolq.queues q WHERE q.name = %(queue)s AND NOT q.paused AND NOT q.down
                  AND q.config->'blocking_params' = '[]'::jsonb AND q.config->'coalesce_params' = '[]'::jsonb
                  AND coalesce(q.config->'cluster_workers', 'null'::jsonb) = 'null'::jsonb)
    ORDER BY m.due, m.id_time, m.id_n
    LIMIT 1 FOR UPDATE OF m SKIP LOCKED
)
-- include: claim_take

-- name: claim_hold_dups
-- The queued messages with the parent's coalesce key become its held duplicates.
UPDATE spoolq.messages d SET held_by = %(parent)s
WHERE d.queue = %(queue)s AND d.state = 'que' AND d.held_by IS NULL AND d.msg_id <> %(parent)s
  AND spoolq.param_key(d.param1, d.param2, d.param3, d.param4, %(coalesce)s::int[]) = %(key)s::text[]
RETURNING d.msg_id, d.due

-- name: claim_wake
-- Nothing to run now: when the first message that is not blocked becomes due.
SELECT min(m.due) AS wake FROM spoolq.messages m
WHERE m.queue = %(queue)s AND m.state = 'que' AND m.held_by IS NULL
  AND m.due > coalesce(%(now)s, spoolq.now())
  AND NOT spoolq.blocked(m.queue, m.param1, m.param2, m.param3, m.param4, %(blocking)s::int[])

-- name: heartbeat
UPDATE spoolq.messages SET lease_until = coalesce(%(now)s, spoolq.now()) + %(lease)s,
    runner = coalesce(%(runner)s, runner)
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = 'run' AND attempt_id = %(attempt_id)s
RETURNING lease_until, cancel_requested

-- name: fence
-- The attempt still holds the message: lock the row, so that no one can take it over
-- (reclaim, move) before this transaction ends.
SELECT 1 AS held FROM spoolq.messages
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = 'run' AND attempt_id = %(attempt_id)s
FOR UPDATE

-- name: attempt_holds
-- The attempt still holds the message, at this instant (no lock: nothing is written under it).
SELECT 1 AS held FROM spoolq.messages
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = 'run' AND attempt_id = %(attempt_id)s

-- name: attempt_attachments
-- The attempt holds the message now (no row: it does not), and the names of its attachments.
SELECT coalesce((SELECT jsonb_agg(a.name) FROM spoolq.attachments a
                 WHERE a.queue = m.queue AND a.msg_id = m.msg_id), '[]') AS names
FROM spoolq.messages m
WHERE m.queue = %(queue)s AND m.msg_id = %(msg_id)s AND m.state = 'run' AND m.attempt_id = %(attempt_id)s

-- name: finish_simple
-- finish_move for an attempt that holds no duplicates (the claim said so, and only a claim
-- makes a message hold some): the fenced UPDATE alone. A statement of its own so that its
-- plan is cached: finish_move is planned again at every call (its duplicates' parts depend
-- on the success parameter), 0.36 ms each.
UPDATE spoolq.messages SET
    state = %(dst)s, acked = false, held_by = NULL,
    attempt_id = NULL, owner = NULL, lease_until = NULL, runner = NULL, cancel_requested = false,
    status = CASE WHEN %(set_status)s THEN %(status)s::text ELSE status END,
    history = history || spoolq.history_entry(%(dst)s, %(note)s)
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = 'run' AND attempt_id = %(attempt_id)s
RETURNING msg_id, msg, history

-- name: finish_move
-- finish when the message itself does not change (no update), in one statement: the UPDATE
-- of the parent is the fence (it changes the row only while it names this attempt, and a
-- racing reclaim waits for its row lock or finds the new state), the status and the move;
-- then its held duplicates, only if the parent moved: taken along on success (as
-- dups_finish), else let go (as dups_release). CHECK: a held duplicate is in que.
WITH moved AS (
-- include: finish_simple
), dups_done AS (
    UPDATE spoolq.messages d SET state = %(dst)s, acked = false, held_by = NULL, status = %(dup_status)s,
        msg = CASE WHEN %(dup)s::text IS NULL THEN d.msg
                   ELSE (d.msg::jsonb || jsonb_build_object('dup', %(dup)s::text))::text END,
        history = d.history || spoolq.history_entry(%(dst)s, %(dup_note)s)
    FROM moved WHERE %(success)s AND d.queue = %(queue)s AND d.held_by = moved.msg_id AND d.state = 'que'
), dups_free AS (
    UPDATE spoolq.messages d SET held_by = NULL
    FROM moved WHERE NOT %(success)s AND d.queue = %(queue)s AND d.held_by = moved.msg_id
)
SELECT msg, history FROM moved

-- name: dups_finish
-- A successful parent takes its held duplicates along (que -> done/relayed), each recording
-- the parent's full id as its "dup" when one is given.
UPDATE spoolq.messages SET state = %(dst)s, acked = false, held_by = NULL, status = %(status)s,
    msg = CASE WHEN %(dup)s::text IS NULL THEN msg
               ELSE (msg::jsonb || jsonb_build_object('dup', %(dup)s::text))::text END,
    history = history || spoolq.history_entry(%(dst)s, %(note)s)
WHERE queue = %(queue)s AND held_by = %(parent)s AND state = 'que'

-- name: dups_release
UPDATE spoolq.messages SET held_by = NULL WHERE queue = %(queue)s AND held_by = %(parent)s

-- name: reclaim
-- Attempts whose lease ran out (or that no attempt holds) are re-leased to the caller; the
-- new attempt id fences the old holder out. Held duplicates stay held (by the message).
WITH expired AS (
    SELECT queue, msg_id FROM spoolq.messages
    WHERE queue = %(queue)s AND state = 'run'
      AND (lease_until IS NULL OR lease_until < coalesce(%(now)s, spoolq.now()))
    FOR UPDATE SKIP LOCKED
)
UPDATE spoolq.messages m SET
    leases = m.leases + 1,
    attempt_id = m.msg_id || '.' || (m.leases + 1) || '.' || left(md5(random()::text), 8),
    owner = %(owner)s, lease_until = coalesce(%(now)s, spoolq.now()) + %(lease)s
FROM expired WHERE m.queue = expired.queue AND m.msg_id = expired.msg_id
RETURNING m.msg_id, m.msg, m.history, m.attempt_id, m.lease_until, m.cancel_requested, m.runner,
    ARRAY(SELECT d.msg_id FROM spoolq.messages d WHERE d.queue = m.queue AND d.held_by = m.msg_id
          ORDER BY d.due, d.id_time, d.id_n) AS dups

-- name: cancel_request
UPDATE spoolq.messages SET cancel_requested = true
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND state = 'run'

-- ---- attachments and logs ---------------------------------------------------------------------
-- name: attachment_drop
DELETE FROM spoolq.attachments WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s

-- name: attachment_begin
INSERT INTO spoolq.attachments (queue, msg_id, name, size, md5, sha256)
VALUES (%(queue)s, %(msg_id)s, %(name)s, 0, '', '')

-- name: attachment_chunk
INSERT INTO spoolq.attachment_chunks (queue, msg_id, name, off, data)
VALUES (%(queue)s, %(msg_id)s, %(name)s, %(off)s, %(data)s)

-- name: attachment_end
UPDATE spoolq.attachments SET size = %(size)s, md5 = %(md5)s, sha256 = %(sha256)s
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s

-- name: attachment_size
SELECT size FROM spoolq.attachments WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s

-- name: attachment_read
-- The chunks that overlap [start, stop): from the one holding start.
SELECT off, data FROM spoolq.attachment_chunks
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s AND off < %(stop)s
  AND off >= coalesce((SELECT max(off) FROM spoolq.attachment_chunks WHERE queue = %(queue)s
                       AND msg_id = %(msg_id)s AND name = %(name)s AND off <= %(start)s), 0)
ORDER BY off

-- name: log_end
SELECT off + octet_length(data) AS size FROM spoolq.log_chunks
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s
ORDER BY off DESC LIMIT 1

-- name: log_append
-- One append (its chunks at offsets rels from the log's current end) in one statement. Two
-- appends that read the same end collide on the primary key: the second fails (once the
-- first has committed) and is tried again (store.py).
INSERT INTO spoolq.log_chunks (queue, msg_id, name, off, data)
SELECT %(queue)s, %(msg_id)s, %(name)s, e.size + c.rel, c.data
FROM (SELECT coalesce((SELECT off + octet_length(data) FROM spoolq.log_chunks
                       WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s
                       ORDER BY off DESC LIMIT 1), 0) AS size) e,
     unnest(%(rels)s::bigint[], %(datas)s::bytea[]) AS c(rel, data)
RETURNING off + octet_length(data) AS size

-- name: log_read
SELECT off, data FROM spoolq.log_chunks
WHERE queue = %(queue)s AND msg_id = %(msg_id)s AND name = %(name)s AND off < %(stop)s
  AND off >= coalesce((SELECT max(off) FROM spoolq.log_chunks WHERE queue = %(queue)s
                       AND msg_id = %(msg_id)s AND name = %(name)s AND off <= %(start)s), 0)
ORDER BY off
