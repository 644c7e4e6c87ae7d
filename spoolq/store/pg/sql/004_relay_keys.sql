-- Which message a relay made, by the relay's key (docs/relay.md, exactly once at the far
-- end): a prep that carries X-Spoolq-Relay-Key and finds its key here answers the message
-- made before instead of making a second one. Kept seven days (Store.sweep prunes), and a
-- key whose message is gone is no key.
CREATE TABLE spoolq.relay_keys (
    queue text COLLATE "C" NOT NULL REFERENCES spoolq.queues (name) ON DELETE CASCADE,
    key text NOT NULL,
    msg_id text COLLATE "C" NOT NULL,
    created float8 NOT NULL,
    PRIMARY KEY (queue, key)
);
CREATE INDEX relay_keys_created ON spoolq.relay_keys (created);
