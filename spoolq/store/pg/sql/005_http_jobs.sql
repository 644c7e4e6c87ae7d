-- strings-queue's SQL intake (docs/http-jobs.md): a row inserted into spoolq.http_jobs is an
-- HTTP job. strings-queue's queued_job columns, plus `headers`, the `queue` it goes to (of kind
-- http) and the `msg_id` of the message it became.
--
--   INSERT INTO spoolq.http_jobs (http_method, url, body, timeout_secs) VALUES ('post', 'http://...', 'x', 120);
--
-- The insert makes the message in the same transaction (http_jobs_insert): the row and its
-- message exist together or not at all. Each finish of the message rewrites its params (the
-- daemon's kind http: result_code, last_response, remaining_retries, ...), and
-- messages_http_job copies them onto the row in the finish's own transaction, so the row
-- always agrees with the message.

CREATE TABLE spoolq.http_jobs (
    id bigserial PRIMARY KEY,
    organization_id bigint,
    http_method varchar(10) NOT NULL,
    url text NOT NULL,
    body text,
    headers jsonb,
    timeout_secs integer NOT NULL DEFAULT 60 CHECK (timeout_secs > 0),
    last_started_at timestamptz,
    last_finished_at timestamptz,
    last_response text,
    result_code integer,                    -- 0 success, 1 permanent failure, 2 temporary; NULL: not yet
    remaining_retries integer NOT NULL DEFAULT 10 CHECK (remaining_retries >= 0),
    retry_delay_secs integer NOT NULL DEFAULT 60 CHECK (retry_delay_secs >= 0),
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

CREATE FUNCTION spoolq.http_job_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cfg jsonb;
    is_down boolean;
    t float8 := spoolq.now();
    mid text;
    params jsonb;
    body text;
BEGIN
    SELECT config, down INTO cfg, is_down FROM spoolq.queues WHERE name = NEW.queue FOR SHARE;
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
    mid := spoolq.make_msg_id(t, nextval('spoolq.msg_seq'));
    NEW.msg_id := mid;
    NEW.result_code := NULL;
    params := jsonb_strip_nulls(jsonb_build_object(
        'method', NEW.http_method, 'url', NEW.url, 'body', NEW.body, 'headers', NEW.headers,
        'timeout_secs', NEW.timeout_secs, 'remaining_retries', NEW.remaining_retries,
        'retry_delay_secs', NEW.retry_delay_secs, 'http_job_id', NEW.id::text));
    body := jsonb_build_object(
        'msg_id', mid, 'dest', NEW.queue, 'src', 'sql', 'count', 0,
        -- one try more than the job's retries: a crash's extra try cannot cut them short,
        -- and crashes that keep coming still end
        'max_count', least(NEW.remaining_retries + 1, 1000000),
        'param1', '', 'param2', '', 'param3', '', 'param4', '', 'due', t, 'orig_msg_id', '',
        'post_run_webhook', '[]'::jsonb, 'params', params, 'created_at', t)::text;
    INSERT INTO spoolq.messages (queue, msg_id, state, due, param1, param2, param3, param4, msg, history)
    VALUES (NEW.queue, mid, 'que', t, '', '', '', '', body, jsonb_build_array(jsonb_build_object('state', 'que', 'at', t)));
    RETURN NEW;
END $$;
CREATE TRIGGER http_jobs_insert BEFORE INSERT ON spoolq.http_jobs
    FOR EACH ROW EXECUTE FUNCTION spoolq.http_job_insert();

-- A finish rewrote the message of a row: copy strings-queue's columns from its params.
-- Only the row whose msg_id is this message's is touched (a clone or a hand-made message
-- that carries some http_job_id changes no row).
CREATE FUNCTION spoolq.http_job_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p jsonb := (NEW.msg::jsonb)->'params';
BEGIN
    IF jsonb_typeof(p) <> 'object' OR jsonb_typeof(p->'http_job_id') <> 'string'
       OR (p->>'http_job_id') !~ '^[0-9]{1,18}$' THEN
        RETURN NULL;
    END IF;
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
    RETURN NULL;
END $$;
CREATE TRIGGER messages_http_job AFTER UPDATE ON spoolq.messages
    FOR EACH ROW WHEN (OLD.msg IS DISTINCT FROM NEW.msg AND strpos(NEW.msg, '"http_job_id"') > 0)
    EXECUTE FUNCTION spoolq.http_job_mirror();

-- strings-queue's queued_job_log: one row per line of a job's log (its message's stdio.log).
-- `logged_at` is the time as the daemon wrote it (its local time); a line of a response body
-- that spans lines has none.
CREATE VIEW spoolq.http_job_log AS
SELECT j.id AS job_id, l.n AS line, nullif(substring(l.text FROM '^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})  '), '') AS logged_at,
       regexp_replace(l.text, '^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}  ', '') AS msg
FROM spoolq.http_jobs j
CROSS JOIN LATERAL (
    SELECT convert_from(string_agg(c.data, ''::bytea ORDER BY c.off), 'UTF8') AS all_text
    FROM spoolq.log_chunks c WHERE c.queue = j.queue AND c.msg_id = j.msg_id AND c.name = 'stdio.log'
) logs
CROSS JOIN LATERAL regexp_split_to_table(rtrim(logs.all_text, E'\n'), E'\n') WITH ORDINALITY AS l(text, n)
WHERE logs.all_text IS NOT NULL;
