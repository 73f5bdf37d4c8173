-- Flotilla: the saved state of `state = persisted` entities, written in the
-- same transaction as the reply of the message that changed it.

CREATE TABLE flotilla_entity_state (
    entity_type TEXT    NOT NULL,
    entity_id   TEXT    NOT NULL,
    state       BLOB    NOT NULL,
    -- Unix milliseconds of the completion that wrote it.
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
);
