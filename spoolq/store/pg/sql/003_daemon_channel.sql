-- The daemons' own channel, spoolq_work (docs/internals.md, the PostgreSQL store): only what
-- a daemon acts on, so that a message's way through the store wakes the daemons once, not
-- at each of its changes (the LISTEN thread, the pipe and the daemon's loop each woke ~4
-- times per message on the spoolq channel, which carries every change for `wait`, `log -f`
-- and the UI).
--   'work <queue>'        a message may have become claimable: it entered que (sent,
--                         requeued, released by its parent, its due time moved), or one
--                         left run in a queue whose claims depend on what runs (blocking
--                         params, cluster_workers). NOTIFY folds equal payloads of one
--                         transaction: a batch send wakes each daemon once.
--   'cancel <queue> <id>' a cancel was asked for a running message: its host stops the script.
--   'queue <name>'        a queue's config or flags changed, or the queue came or went.

CREATE FUNCTION spoolq.frees_others(q text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM spoolq.queues
                   WHERE name = q AND (coalesce(config->'blocking_params', '[]'::jsonb) <> '[]'::jsonb
                                       OR coalesce(config->'cluster_workers', 'null'::jsonb) <> 'null'::jsonb))
$$;

CREATE FUNCTION spoolq.notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('spoolq_work', 'work ' || NEW.queue);
    ELSIF TG_OP = 'DELETE' THEN
        IF spoolq.frees_others(OLD.queue) THEN
            PERFORM pg_notify('spoolq_work', 'work ' || OLD.queue);
        END IF;
    ELSE
        IF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
            PERFORM pg_notify('spoolq_work', 'cancel ' || NEW.queue || ' ' || NEW.msg_id);
        END IF;
        IF NEW.state = 'que' OR (OLD.state = 'run' AND NEW.state <> 'run' AND spoolq.frees_others(OLD.queue)) THEN
            PERFORM pg_notify('spoolq_work', 'work ' || NEW.queue);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER messages_work_insert AFTER INSERT ON spoolq.messages
    FOR EACH ROW WHEN (NEW.state = 'que') EXECUTE FUNCTION spoolq.notify_work();
CREATE TRIGGER messages_work_delete AFTER DELETE ON spoolq.messages
    FOR EACH ROW WHEN (OLD.state = 'run') EXECUTE FUNCTION spoolq.notify_work();
CREATE TRIGGER messages_work_update AFTER UPDATE ON spoolq.messages
    FOR EACH ROW WHEN ((NEW.state = 'que' AND NEW.held_by IS NULL
                        AND (OLD.state <> 'que' OR OLD.held_by IS NOT NULL OR OLD.due IS DISTINCT FROM NEW.due))
                       OR (OLD.state = 'run' AND NEW.state <> 'run')
                       OR (NEW.cancel_requested AND NOT OLD.cancel_requested))
    EXECUTE FUNCTION spoolq.notify_work();

-- The spoolq channel keeps 'msg' and 'log' for those waiting on one message; cancels and
-- queues move to spoolq_work.
CREATE OR REPLACE FUNCTION spoolq.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spoolq', 'msg ' || CASE WHEN TG_OP = 'DELETE' THEN OLD.queue || ' ' || OLD.msg_id
                                               ELSE NEW.queue || ' ' || NEW.msg_id END);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION spoolq.notify_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('spoolq_work', 'queue ' || CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END $$;
