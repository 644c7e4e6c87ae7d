-- spoolq's PostgreSQL store, version 1 (docs/internals.md, "The PostgreSQL store").
-- Times are epoch seconds (float8), like the message's own fields; "now" is the
-- database's clock (spoolq.now()), so the hosts sharing a database share one clock.

CREATE FUNCTION spoolq.now() RETURNS float8 LANGUAGE sql STABLE
    AS $$ SELECT extract(epoch FROM statement_timestamp())::float8 $$;

-- The values of the params numbered in nums (a queue's coalesce_params or blocking_params):
-- two messages share a key when these arrays are equal. NULL when nums is empty.
CREATE FUNCTION spoolq.param_key(p1 text, p2 text, p3 text, p4 text, nums int[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN cardinality(nums) = 0 THEN NULL
                 ELSE ARRAY(SELECT (ARRAY[p1, p2, p3, p4])[n] FROM unnest(nums) AS n ORDER BY n) END $$;

-- One entry for the history of a message: {state, at, note?}.
CREATE FUNCTION spoolq.history_entry(state text, note text) RETURNS jsonb LANGUAGE sql STABLE
    AS $$ SELECT jsonb_build_array(jsonb_strip_nulls(
              jsonb_build_object('state', state, 'at', spoolq.now(), 'note', nullif(note, '')))) $$;

CREATE TABLE spoolq.settings (
    key text PRIMARY KEY,
    value jsonb NOT NULL
);

CREATE TABLE spoolq.queues (
    name text COLLATE "C" PRIMARY KEY,
    config jsonb NOT NULL,            -- QueueConfig.to_dict()
    paused boolean NOT NULL DEFAULT false,
    down boolean NOT NULL DEFAULT false,
    script_error text
);

-- Daemons serving this database; a host is live while its session holds the advisory lock
-- (classid 1397772113, objid = id): a dead process's session ends and lets go of it.
CREATE TABLE spoolq.hosts (
    id serial PRIMARY KEY,
    name text NOT NULL,
    started_at float8 NOT NULL DEFAULT spoolq.now()
);

CREATE SEQUENCE spoolq.msg_seq;  -- the unique suffix of every message id, across hosts

CREATE TABLE spoolq.messages (
    queue text COLLATE "C" NOT NULL REFERENCES spoolq.queues (name) ON DELETE CASCADE,
    msg_id text COLLATE "C" NOT NULL,
    id_time text COLLATE "C" GENERATED ALWAYS AS (left(msg_id, 20)) STORED,              -- YYYYmmdd.HHMM.SS.mmm
    id_n bigint GENERATED ALWAYS AS (split_part(msg_id, '.', 5)::bigint) STORED,
    state text NOT NULL CHECK (state IN ('prep', 'que', 'run', 'done', 'relayed', 'err')),
    acked boolean NOT NULL DEFAULT false,
    due float8 NOT NULL,
    param1 text NOT NULL,
    param2 text NOT NULL,
    param3 text NOT NULL,
    param4 text NOT NULL,
    msg text NOT NULL,                      -- Message.encode() without its history
    history jsonb NOT NULL,                 -- [{state, at, note?}]
    status text NOT NULL DEFAULT '',
    -- the current attempt, while in run (store/leases.py); NULL otherwise
    attempt_id text,
    owner text,
    lease_until float8,
    runner text,
    leases integer NOT NULL DEFAULT 0,      -- attempts ever leased: part of each attempt id
    cancel_requested boolean NOT NULL DEFAULT false,
    held_by text,                           -- a queued duplicate: the msg_id of its running parent
    PRIMARY KEY (queue, msg_id),
    CHECK (attempt_id IS NULL OR state = 'run'),
    CHECK (held_by IS NULL OR state = 'que')
);
-- Is a message with these params blocked by a running message of its queue with the same
-- blocking key (a queue's blocking_params, numbered in nums)?
CREATE FUNCTION spoolq.blocked(q text, p1 text, p2 text, p3 text, p4 text, nums int[]) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT cardinality(nums) > 0 AND EXISTS (
              SELECT 1 FROM spoolq.messages r WHERE r.queue = q AND r.state = 'run'
                 AND spoolq.param_key(r.param1, r.param2, r.param3, r.param4, nums)
                     = spoolq.param_key(p1, p2, p3, p4, nums)) $$;

CREATE INDEX messages_listing ON spoolq.messages (queue, state, id_time DESC, id_n DESC);
CREATE INDEX messages_due ON spoolq.messages (queue, due, id_time, id_n) WHERE state = 'que';
CREATE INDEX messages_running ON spoolq.messages (queue, lease_until) WHERE state = 'run';
CREATE INDEX messages_held ON spoolq.messages (queue, held_by) WHERE held_by IS NOT NULL;

CREATE TABLE spoolq.attachments (
    queue text COLLATE "C" NOT NULL,
    msg_id text COLLATE "C" NOT NULL,
    name text NOT NULL,
    size bigint NOT NULL,
    md5 text NOT NULL,
    sha256 text NOT NULL,
    PRIMARY KEY (queue, msg_id, name),
    FOREIGN KEY (queue, msg_id) REFERENCES spoolq.messages ON DELETE CASCADE
);

-- An attachment's bytes in rows of at most 1 MiB, keyed by their offset.
CREATE TABLE spoolq.attachment_chunks (
    queue text COLLATE "C" NOT NULL,
    msg_id text COLLATE "C" NOT NULL,
    name text NOT NULL,
    off bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (queue, msg_id, name, off),
    FOREIGN KEY (queue, msg_id, name) REFERENCES spoolq.attachments ON DELETE CASCADE
);
ALTER TABLE spoolq.attachment_chunks ALTER COLUMN data SET STORAGE EXTERNAL;  -- no compression try

-- A message's logs (stdio.log, ...): appended pieces keyed by their offset.
CREATE TABLE spoolq.log_chunks (
    queue text COLLATE "C" NOT NULL,
    msg_id text COLLATE "C" NOT NULL,
    name text NOT NULL,
    off bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (queue, msg_id, name, off),
    FOREIGN KEY (queue, msg_id) REFERENCES spoolq.messages ON DELETE CASCADE
);

-- Change notification: NOTIFY spoolq, 'msg <queue> <id>' whenever a message appears, goes,
-- or changes in anything but its lease; 'cancel <queue> <id>' besides when a cancel is asked
-- for a running message (its host stops the script); 'queue <name>' for a queue's config and flags.
CREATE FUNCTION spoolq.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r spoolq.messages;
BEGIN
    r := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    PERFORM pg_notify('spoolq', 'msg ' || r.queue || ' ' || r.msg_id);
    IF TG_OP = 'UPDATE' AND NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('spoolq', 'cancel ' || r.queue || ' ' || r.msg_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_notify_insert_delete AFTER INSERT OR DELETE ON spoolq.messages
    FOR EACH ROW EXECUTE FUNCTION spoolq.notify_message();
CREATE TRIGGER messages_notify_update AFTER UPDATE ON spoolq.messages
    FOR EACH ROW WHEN ((OLD.state, OLD.msg, OLD.status, OLD.cancel_requested, OLD.acked, OLD.held_by)
                       IS DISTINCT FROM (NEW.state, NEW.msg, NEW.status, NEW.cancel_requested, NEW.acked,
                                         NEW.held_by))
    EXECUTE FUNCTION spoolq.notify_message();

CREATE FUNCTION spoolq.notify_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spoolq', 'queue ' || CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END $$;
CREATE TRIGGER queues_notify AFTER INSERT OR UPDATE OR DELETE ON spoolq.queues
    FOR EACH ROW EXECUTE FUNCTION spoolq.notify_queue();

CREATE FUNCTION spoolq.notify_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spoolq', 'log ' || NEW.queue || ' ' || NEW.msg_id);
    RETURN NULL;
END $$;
CREATE TRIGGER log_chunks_notify AFTER INSERT ON spoolq.log_chunks
    FOR EACH ROW EXECUTE FUNCTION spoolq.notify_log();
