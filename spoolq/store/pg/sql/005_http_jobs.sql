-- strings-queue's SQL intake (docs/http-jobs.md): a row inserted into spoolq.http_jobs is an
-- HTTP job. strings-queue's queued_job columns, plus `headers`, the `queue` it goes to (of kind
-- http) and the `msg_id` of the message it became.
--
--   INSERT INTO spoolq.http_jobs (http_method, url, body, timeout_secs) VALUES ('post', 'http://...', 'x', 120);
--
-- The insert makes the message in the same transaction (http_jobs_check names it before the
-- row is written, http_jobs_message makes it once the row is: a row an ON CONFLICT skips
-- makes none): the row and its message exist together or not at all. Each finish of the message rewrites its params (the
-- daemon's kind http: result_code, last_response, remaining_retries, ...), and
-- messages_http_job copies them onto the row in the finish's own transaction, so the row
-- always agrees with the message.

CREATE TABLE spoolq.http_jobs (
    id bigserial PRIMARY KEY,
    organization_id bigint,
    http_method varchar(10) NOT NULL
        CHECK (upper(http_method) IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS')),
    url text NOT NULL,
    body text,
    headers jsonb,
    timeout_secs integer NOT NULL DEFAULT 60 CHECK (timeout_secs BETWEEN 1 AND 3600),
    last_started_at timestamptz,
    last_finished_at timestamptz,
    last_response text,
    result_code integer,                    -- 0 success, 1 permanent failure, 2 temporary; NULL: not yet
    remaining_retries integer NOT NULL DEFAULT 10 CHECK (remaining_retries BETWEEN 0 AND 1000000),
    retry_delay_secs integer NOT NULL DEFAULT 60 CHECK (retry_delay_secs BETWEEN 0 AND 31536000),
    queue text COLLATE "C" NOT NULL DEFAULT 'http',
    msg_id text COLLATE "C",
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX http_jobs_message ON spoolq.http_jobs (queue, msg_id);

-- A message id as spoolq makes them (spoolq/ids.py): the UTC time to the millisecond, then a
-- number from the shared sequence.
CREATE FUNCTION spoolq.make_msg_id(t float8, n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(to_timestamp(floor(t)) AT TIME ZONE 'UTC', 'YYYYMMDD.HH24MI.SS') || '.'
           || lpad(floor((t - floor(t)) * 1000)::int::text, 3, '0') || '.' || n::text
$$;

-- The two insert triggers run with the rights of the role that migrated (SECURITY DEFINER,
-- a fixed search_path): a producer needs INSERT on spoolq.http_jobs and USAGE on its id
-- sequence, and nothing on spoolq's own tables, so it can enqueue HTTP jobs into kind http
-- queues and do nothing else.

-- Before the row is written: the queue takes it, and the row gets its message's id. No lock
-- on the queue's row (a send takes none): a queue deleted meanwhile fails the insert.
CREATE FUNCTION spoolq.http_job_check() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cfg jsonb;
    is_down boolean;
BEGIN
    SELECT config, down INTO cfg, is_down FROM spoolq.queues WHERE name = NEW.queue;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'spoolq: no queue %', NEW.queue USING ERRCODE = 'foreign_key_violation',
            HINT = 'create it: spoolq queue create ' || NEW.queue || ' --kind http';
    END IF;
    IF coalesce(cfg->>'kind', 'script') <> 'http' THEN
        RAISE EXCEPTION 'spoolq: queue % is not of kind http', NEW.queue USING ERRCODE = 'check_violation';
    END IF;
    IF is_down THEN
        RAISE EXCEPTION 'spoolq: queue % is DOWN: it refuses new messages', NEW.queue
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.headers IS NOT NULL AND jsonb_typeof(NEW.headers) <> 'object' THEN
        RAISE EXCEPTION 'spoolq: headers must be a JSON object' USING ERRCODE = 'check_violation';
    END IF;
    NEW.msg_id := spoolq.make_msg_id(spoolq.now(), nextval('spoolq.msg_seq'));
    NEW.result_code := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER http_jobs_check BEFORE INSERT ON spoolq.http_jobs
    FOR EACH ROW EXECUTE FUNCTION spoolq.http_job_check();

-- Once the row is written (not for a row an ON CONFLICT skipped): its message, in que.
CREATE FUNCTION spoolq.http_job_message() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t float8 := spoolq.now();
    params jsonb;
    body text;
BEGIN
    params := jsonb_strip_nulls(jsonb_build_object(
        'method', NEW.http_method, 'url', NEW.url, 'body', NEW.body, 'headers', NEW.headers,
        'timeout_secs', NEW.timeout_secs, 'remaining_retries', NEW.remaining_retries,
        'retry_delay_secs', NEW.retry_delay_secs, 'http_job_id', NEW.id::text));
    body := jsonb_build_object(
        'msg_id', NEW.msg_id, 'dest', NEW.queue, 'src', 'sql', 'count', 0,
        -- one try more than the job's retries: a crash's extra try cannot cut them short,
        -- and crashes that keep coming still end
        'max_count', least(NEW.remaining_retries + 1, 1000000),
        'param1', '', 'param2', '', 'param3', '', 'param4', '', 'due', t, 'orig_msg_id', '',
        'post_run_webhook', '[]'::jsonb, 'params', params, 'created_at', t)::text;
    IF octet_length(body) > 1048576 THEN  -- spoolq.model.MAX_MSG_BYTES: no daemon could run it
        RAISE EXCEPTION 'spoolq: the job is % bytes as a message; the limit is 1048576', octet_length(body)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    INSERT INTO spoolq.messages (queue, msg_id, state, due, param1, param2, param3, param4, msg, history)
    VALUES (NEW.queue, NEW.msg_id, 'que', t, '', '', '', '', body,
            jsonb_build_array(jsonb_build_object('state', 'que', 'at', t)));
    RETURN NULL;
END $$;
CREATE TRIGGER http_jobs_message AFTER INSERT ON spoolq.http_jobs
    FOR EACH ROW EXECUTE FUNCTION spoolq.http_job_message();

-- A row keeps the id, queue and message it was made with: the mirror finds it by them.
CREATE FUNCTION spoolq.http_job_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.queue, NEW.msg_id) IS DISTINCT FROM (OLD.id, OLD.queue, OLD.msg_id) THEN
        RAISE EXCEPTION 'spoolq: an http_jobs row keeps its id, queue and msg_id' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER http_jobs_keep BEFORE UPDATE ON spoolq.http_jobs
    FOR EACH ROW EXECUTE FUNCTION spoolq.http_job_keep();

-- A finish rewrote the message of a row: copy strings-queue's columns from its params.
-- Only the row whose msg_id is this message's is touched (a clone or a hand-made message
-- that carries some http_job_id changes no row).
-- A message that cannot be read as jsonb (a \u0000 in it) or params that do not fit the
-- row are skipped (with a warning): never a reason to refuse the message's own update. A row
-- locked by someone else's transaction fails the update at once (NOWAIT): the daemon holds
-- that finish and tries it again later, instead of waiting on its one store thread.
CREATE FUNCTION spoolq.http_job_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p jsonb;
BEGIN
    BEGIN
        p := (NEW.msg::jsonb)->'params';
    EXCEPTION WHEN invalid_text_representation OR untranslatable_character THEN
        RETURN NULL;
    END;
    IF jsonb_typeof(p) IS DISTINCT FROM 'object' OR jsonb_typeof(p->'http_job_id') IS DISTINCT FROM 'string'
       OR (p->>'http_job_id') !~ '^[0-9]{1,18}$' THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM spoolq.http_jobs
        WHERE id = (p->>'http_job_id')::bigint AND queue = NEW.queue AND msg_id = NEW.msg_id FOR UPDATE NOWAIT;
    BEGIN
    UPDATE spoolq.http_jobs j SET
        url = CASE WHEN jsonb_typeof(p->'url') = 'string' THEN p->>'url' ELSE j.url END,
        retry_delay_secs = CASE WHEN jsonb_typeof(p->'retry_delay_secs') = 'number'
                                THEN least((p->>'retry_delay_secs')::numeric, 2147483647)::int ELSE j.retry_delay_secs END,
        remaining_retries = CASE WHEN jsonb_typeof(p->'remaining_retries') = 'number'
                                 THEN greatest(0, least((p->>'remaining_retries')::numeric, 2147483647))::int
                                 ELSE j.remaining_retries END,
        result_code = CASE WHEN jsonb_typeof(p->'result_code') = 'number'
                           THEN (p->>'result_code')::numeric::int ELSE j.result_code END,
        last_response = CASE WHEN jsonb_typeof(p->'last_response') = 'string'
                             THEN p->>'last_response' ELSE j.last_response END,
        last_started_at = CASE WHEN jsonb_typeof(p->'last_started_at') = 'number'
                               THEN to_timestamp((p->>'last_started_at')::float8) ELSE j.last_started_at END,
        last_finished_at = CASE WHEN jsonb_typeof(p->'last_finished_at') = 'number'
                                THEN to_timestamp((p->>'last_finished_at')::float8) ELSE j.last_finished_at END
    WHERE j.id = (p->>'http_job_id')::bigint AND j.queue = NEW.queue AND j.msg_id = NEW.msg_id;
    EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range OR check_violation
                   OR untranslatable_character OR datetime_field_overflow OR invalid_parameter_value THEN
        RAISE WARNING 'spoolq: http_jobs row % not updated from message %/%: %', p->>'http_job_id', NEW.queue,
            NEW.msg_id, SQLERRM;
    END;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_http_job AFTER UPDATE ON spoolq.messages
    FOR EACH ROW WHEN (strpos(NEW.msg, '"http_job_id"') > 0 AND OLD.msg IS DISTINCT FROM NEW.msg)
    EXECUTE FUNCTION spoolq.http_job_mirror();

-- strings-queue's queued_job_log: one row per entry of a job's log (its message's stdio.log;
-- the lines of a body that spans lines belong to the entry they follow: the daemon begins
-- them with a tab, which is taken off here). `logged_at` is the time as the daemon wrote it
-- (its local time).
CREATE VIEW spoolq.http_job_log AS
WITH lines AS (
    SELECT j.id AS job_id, l.n, l.text,
           substring(l.text FROM '^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})  ') AS stamp
    FROM spoolq.http_jobs j
    CROSS JOIN LATERAL (
        SELECT convert_from(string_agg(c.data, ''::bytea ORDER BY c.off), 'UTF8') AS all_text
        FROM spoolq.log_chunks c WHERE c.queue = j.queue AND c.msg_id = j.msg_id AND c.name = 'stdio.log'
    ) logs
    CROSS JOIN LATERAL regexp_split_to_table(rtrim(logs.all_text, E'\n'), E'\n') WITH ORDINALITY AS l(text, n)
    WHERE logs.all_text IS NOT NULL
), entries AS (
    SELECT *, count(stamp) OVER (PARTITION BY job_id ORDER BY n) AS entry FROM lines
)
SELECT job_id, entry AS line, min(stamp) AS logged_at,
       regexp_replace(string_agg(CASE WHEN stamp IS NULL THEN regexp_replace(text, E'^\t', '') ELSE text END,
                                 E'\n' ORDER BY n),
                      '^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}  ', '') AS msg
FROM entries GROUP BY job_id, entry;
