-- Counts per queue without counting messages (docs/internals.md, the PostgreSQL store, I-PG5).
-- Every change of a message's count key (its state; err_acked for an acknowledged error)
-- appends a delta row: +1 for the new key, -1 for the old. counts() sums a queue's deltas,
-- and compaction (counts(), sweep()) folds them into one row per key. Append-only: two
-- transactions never wait for each other on a counter row.

CREATE TABLE spoolq.count_deltas (
    id bigserial PRIMARY KEY,
    queue text COLLATE "C" NOT NULL,  -- no foreign key: deleting a queue deletes these itself
    key text NOT NULL,
    n bigint NOT NULL
);
CREATE INDEX count_deltas_queue ON spoolq.count_deltas (queue, id);

CREATE FUNCTION spoolq.count_key(state text, acked boolean) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN acked THEN 'err_acked' ELSE state END $$;

CREATE FUNCTION spoolq.count_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO spoolq.count_deltas (queue, key, n) VALUES (OLD.queue, spoolq.count_key(OLD.state, OLD.acked), -1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO spoolq.count_deltas (queue, key, n) VALUES (NEW.queue, spoolq.count_key(NEW.state, NEW.acked), 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_count_insert_delete AFTER INSERT OR DELETE ON spoolq.messages
    FOR EACH ROW EXECUTE FUNCTION spoolq.count_change();
CREATE TRIGGER messages_count_update AFTER UPDATE ON spoolq.messages
    FOR EACH ROW WHEN (spoolq.count_key(OLD.state, OLD.acked) IS DISTINCT FROM spoolq.count_key(NEW.state, NEW.acked))
    EXECUTE FUNCTION spoolq.count_change();

INSERT INTO spoolq.count_deltas (queue, key, n)
SELECT queue, spoolq.count_key(state, acked), count(*) FROM spoolq.messages GROUP BY 1, 2;
