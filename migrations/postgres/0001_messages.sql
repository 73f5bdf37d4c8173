-- Flotilla: persisted messages, their replies and their processed mark.
-- `{prefix}` is replaced by the storage's table prefix (default `flotilla_`),
-- so that several Flotilla clusters, or an application's own tables, share
-- one database without colliding.

CREATE TABLE {prefix}messages (
    -- The snowflake id: unique, time-ordered, the delivery order.
    id           bigint PRIMARY KEY,
    entity_type  text   NOT NULL,
    entity_id    text   NOT NULL,
    shard_group  text   NOT NULL,
    shard_index  bigint NOT NULL,
    tag          text   NOT NULL,
    -- Dedup key; NULL when the rpc has no primary key (NULLs never conflict
    -- in a UNIQUE column, so dedup applies to explicit keys only).
    message_key  text   UNIQUE,
    payload      bytea  NOT NULL,
    -- MessagePack map of header names to values.
    headers      bytea  NOT NULL,
    -- Unix milliseconds; NULL: deliver at once.
    deliver_at   bigint,
    created_at   bigint NOT NULL,
    -- Unix milliseconds; NULL while unprocessed.
    processed_at bigint,
    -- MessagePack of the recorded reply; set together with processed_at.
    reply        bytea
);

-- The delivery scan: unprocessed rows in id order. Partial, so the index
-- holds only the (small) backlog, not the retained history.
CREATE INDEX {prefix}messages_unprocessed
    ON {prefix}messages (id)
    WHERE processed_at IS NULL;

-- The per-shard scan a new shard owner runs to resume its backlog.
CREATE INDEX {prefix}messages_unprocessed_by_shard
    ON {prefix}messages (shard_index, id)
    WHERE processed_at IS NULL;

-- The timer of the earliest scheduled delivery.
CREATE INDEX {prefix}messages_deliver_at
    ON {prefix}messages (deliver_at)
    WHERE processed_at IS NULL AND deliver_at IS NOT NULL;

-- Retention: purge of processed rows by age.
CREATE INDEX {prefix}messages_processed_at
    ON {prefix}messages (processed_at)
    WHERE processed_at IS NOT NULL;
