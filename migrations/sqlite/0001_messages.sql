-- Flotilla: persisted messages, their replies and their processed mark.
-- Every object Flotilla creates is prefixed `flotilla_` so that it never
-- collides with the application's own tables or migrations.

CREATE TABLE flotilla_messages (
    -- The snowflake id: unique, time-ordered, the delivery order.
    id           INTEGER PRIMARY KEY,
    entity_type  TEXT    NOT NULL,
    entity_id    TEXT    NOT NULL,
    shard_group  TEXT    NOT NULL,
    shard_index  INTEGER NOT NULL,
    tag          TEXT    NOT NULL,
    -- Dedup key; NULL when the rpc has no primary key (SQLite lets any number
    -- of NULLs share a UNIQUE column, so dedup applies to explicit keys only).
    message_key  TEXT    UNIQUE,
    payload      BLOB    NOT NULL,
    -- MessagePack map of header names to values.
    headers      BLOB    NOT NULL,
    -- Unix milliseconds; NULL: deliver at once.
    deliver_at   INTEGER,
    created_at   INTEGER NOT NULL,
    -- Unix milliseconds; NULL while unprocessed.
    processed_at INTEGER,
    -- MessagePack of the recorded reply; set together with processed_at.
    reply        BLOB
);

-- The delivery scan: unprocessed rows in id order. Partial, so the index
-- holds only the (small) backlog, not the retained history.
CREATE INDEX flotilla_messages_unprocessed
    ON flotilla_messages (id)
    WHERE processed_at IS NULL;

-- The timer of the earliest scheduled delivery.
CREATE INDEX flotilla_messages_deliver_at
    ON flotilla_messages (deliver_at)
    WHERE processed_at IS NULL AND deliver_at IS NOT NULL;

-- Retention: purge of processed rows by age.
CREATE INDEX flotilla_messages_processed_at
    ON flotilla_messages (processed_at)
    WHERE processed_at IS NOT NULL;
