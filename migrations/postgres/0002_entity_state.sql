-- Flotilla: the saved state of `state = persisted` entities, written in the
-- same transaction as the reply of the message that changed it.

CREATE TABLE {prefix}entity_state (
    entity_type text   NOT NULL,
    entity_id   text   NOT NULL,
    state       bytea  NOT NULL,
    -- Unix milliseconds of the completion that wrote it.
    updated_at  bigint NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
);
