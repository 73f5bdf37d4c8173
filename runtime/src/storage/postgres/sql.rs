//! The SQL of the PostgreSQL backend, and the mapping of its rows and errors.
//!
//! Table names carry the storage's prefix, so the statements are built once
//! per storage ([`Statements::new`]) and then used as fixed strings: sqlx
//! prepares each text once per connection and caches it. Multi-row writes
//! bind one array per column and expand it with `UNNEST`, so a statement has
//! one shape whatever the row count.

use std::sync::Arc;

/// The most rows one multi-row statement carries. Arrays have no parameter
/// limit; the bound keeps one statement's memory and run time modest.
pub(super) const MAX_ROWS: usize = 1024;

/// How many processed rows one purge statement deletes, so that a large
/// purge never holds row locks or bloats one transaction for long.
pub(super) const PURGE_CHUNK: i64 = 1000;

/// Every statement of one storage, with its table prefix filled in.
#[derive(Debug)]
pub(super) struct Statements {
    /// Stores messages whose key is free; returns the ids stored.
    pub(super) insert_messages: String,
    /// `message_key, id, reply` of the messages holding the given keys.
    pub(super) select_by_keys: String,
    /// Marks unprocessed messages processed with their replies; returns the ids marked.
    pub(super) complete_messages: String,
    /// `id, reply` of the given messages (for those already processed).
    pub(super) select_replies: String,
    /// Saves entity states (one row per entity per statement).
    pub(super) upsert_states: String,
    /// Marks one message processed; 0 rows when it is unknown or processed.
    pub(super) complete_message: String,
    /// Replaces the reply of a completion whose effects failed.
    pub(super) replace_reply: String,
    /// The reply of one message.
    pub(super) select_reply: String,
    /// The state of one entity.
    pub(super) select_state: String,
    /// Ready unprocessed messages in id order.
    pub(super) select_unprocessed: String,
    /// Ready unprocessed messages of some shards (`$4` groups, `$5` indexes).
    pub(super) select_unprocessed_in: String,
    /// The earliest scheduled delivery after an instant.
    pub(super) next_delivery: String,
    /// The earliest scheduled delivery of some shards (`$2` groups, `$3` indexes).
    pub(super) next_delivery_in: String,
    /// Deletes one chunk of old processed messages.
    pub(super) purge_processed: String,
    /// Per fenced completion (`$1` message ids, `$2`/`$3` fence shards, in
    /// order): its 1-based position, the stored epoch of its fence's shard
    /// (read `FOR SHARE`; `$4`/`$5` are the distinct shards) and its
    /// message's shard (NULL when unknown).
    pub(super) check_fences: String,
}

/// The columns of a stored message, in the order `stored_message` reads them.
const MESSAGE_COLUMNS: &str = "id, entity_type, entity_id, shard_group, shard_index, tag, \
     message_key, payload, headers, deliver_at, created_at";

impl Statements {
    /// The statements for tables prefixed `p` (validated by the caller).
    pub(super) fn new(p: &str) -> Arc<Self> {
        Arc::new(Self {
            // `WITH ORDINALITY .. ORDER BY`: rows are inserted in batch order,
            // so of two saves with one key the first in the batch is stored.
            insert_messages: format!(
                "INSERT INTO {p}messages ({MESSAGE_COLUMNS}) \
                 SELECT id, entity_type, entity_id, shard_group, shard_index, tag, \
                        message_key, payload, headers, deliver_at, created_at \
                 FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                             $6::text[], $7::text[], $8::bytea[], $9::bytea[], $10::bigint[], \
                             $11::bigint[]) WITH ORDINALITY \
                      AS m ({MESSAGE_COLUMNS}, ord) \
                 ORDER BY ord \
                 ON CONFLICT (message_key) DO NOTHING \
                 RETURNING id"
            ),
            select_by_keys: format!(
                "SELECT message_key, id, reply FROM {p}messages \
                 WHERE message_key = ANY($1::text[])"
            ),
            complete_messages: format!(
                "UPDATE {p}messages AS m SET processed_at = $3, reply = done.reply \
                 FROM UNNEST($1::bigint[], $2::bytea[]) AS done (id, reply) \
                 WHERE m.id = done.id AND m.processed_at IS NULL \
                 RETURNING m.id"
            ),
            select_replies: format!(
                "SELECT id, reply FROM {p}messages WHERE id = ANY($1::bigint[])"
            ),
            upsert_states: format!(
                "INSERT INTO {p}entity_state (entity_type, entity_id, state, updated_at) \
                 SELECT entity_type, entity_id, state, $4 \
                 FROM UNNEST($1::text[], $2::text[], $3::bytea[]) \
                      AS s (entity_type, entity_id, state) \
                 ON CONFLICT (entity_type, entity_id) \
                 DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
            ),
            complete_message: format!(
                "UPDATE {p}messages SET processed_at = $1, reply = $2 \
                 WHERE id = $3 AND processed_at IS NULL"
            ),
            replace_reply: format!("UPDATE {p}messages SET reply = $1 WHERE id = $2"),
            select_reply: format!("SELECT reply FROM {p}messages WHERE id = $1"),
            select_state: format!(
                "SELECT state FROM {p}entity_state WHERE entity_type = $1 AND entity_id = $2"
            ),
            select_unprocessed: format!(
                "SELECT {MESSAGE_COLUMNS} FROM {p}messages \
                 WHERE processed_at IS NULL AND (deliver_at IS NULL OR deliver_at <= $1) \
                   AND id > $2 \
                 ORDER BY id LIMIT $3"
            ),
            select_unprocessed_in: format!(
                "SELECT {MESSAGE_COLUMNS} FROM {p}messages \
                 WHERE processed_at IS NULL AND (deliver_at IS NULL OR deliver_at <= $1) \
                   AND id > $2 \
                   AND (shard_group, shard_index) IN \
                       (SELECT * FROM UNNEST($4::text[], $5::bigint[])) \
                 ORDER BY id LIMIT $3"
            ),
            next_delivery: format!(
                "SELECT MIN(deliver_at) FROM {p}messages \
                 WHERE processed_at IS NULL AND deliver_at > $1"
            ),
            next_delivery_in: format!(
                "SELECT MIN(deliver_at) FROM {p}messages \
                 WHERE processed_at IS NULL AND deliver_at > $1 \
                   AND (shard_group, shard_index) IN \
                       (SELECT * FROM UNNEST($2::text[], $3::bigint[]))"
            ),
            // MATERIALIZED: the locking read runs once over the distinct
            // shards; a row locked there is what the join reads.
            check_fences: format!(
                "WITH fenced AS MATERIALIZED ( \
                   SELECT shard_group, shard_index, epoch FROM {p}shards \
                   WHERE (shard_group, shard_index) IN \
                         (SELECT * FROM UNNEST($4::text[], $5::bigint[])) \
                   FOR SHARE) \
                 SELECT d.ord, f.epoch, m.shard_group, m.shard_index \
                 FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) WITH ORDINALITY \
                      AS d (id, shard_group, shard_index, ord) \
                 LEFT JOIN fenced f \
                        ON f.shard_group = d.shard_group AND f.shard_index = d.shard_index \
                 LEFT JOIN {p}messages m ON m.id = d.id"
            ),
            purge_processed: format!(
                "DELETE FROM {p}messages WHERE id IN \
                 (SELECT id FROM {p}messages \
                  WHERE processed_at IS NOT NULL AND processed_at < $1 LIMIT $2)"
            ),
        })
    }
}

/// One completion's effects and state commit or roll back together.
pub(super) const SAVEPOINT: &str = "SAVEPOINT flotilla_completion";
/// Undoes the effects and state of one completion, keeping the rest of the batch.
pub(super) const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT flotilla_completion";
/// Ends the savepoint (its writes stay part of the batch transaction).
pub(super) const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT flotilla_completion";

use super::super::columns::refuse_keyword;
pub(super) use super::super::columns::{
    decode_reply, encode_headers, encode_reply, stored_message,
};

/// Why a staged effect is refused before it runs, if it is.
///
/// An effect runs inside the batch transaction, so it must be a data
/// statement: transaction control (`COMMIT`, `ROLLBACK`, `SAVEPOINT`,
/// `RELEASE`), session settings (`SET`, `RESET`, `DISCARD`), `LISTEN`/`NOTIFY`
/// (a NOTIFY inside the write transaction serialises every commit), `CALL`
/// (a procedure may commit) or DDL could end or escape the transaction that
/// makes the completion atomic. A second statement after a `;` needs no check
/// here: effects run as prepared statements, which PostgreSQL refuses to
/// hold more than one command (a fault of the effect, so only its own
/// completion fails).
pub(super) fn refuse_effect(sql: &str) -> Option<String> {
    refuse_keyword(
        sql,
        &["INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "SELECT"],
    )
}

/// True for errors that say the database, the connection or the transaction
/// is in trouble (connection lost, serialization failure or deadlock, out of
/// resources, shutdown, cancelled, internal), as opposed to a fault of the
/// statement itself (syntax, missing table, constraint, bad data). A staged
/// effect failing for the first reason fails the whole batch, to be retried;
/// for the second it fails only its completion.
pub(super) fn is_environmental(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return true;
    };
    let Some(code) = db.code() else {
        return false;
    };
    // SQLSTATE classes: 08 connection exception, 25 invalid transaction
    // state, 40 transaction rollback, 53 insufficient resources, 55 object
    // not in prerequisite state (lock not available), 57 operator
    // intervention (shutdown, cancel), 58 system error, F0 configuration
    // file error, XX internal error.
    matches!(
        code.get(..2),
        Some("08" | "25" | "40" | "53" | "55" | "57" | "58" | "F0" | "XX")
    )
}

/// The database's own message for an error, for `EffectsFailed`.
pub(super) fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_the_prefix_and_no_other_table_name() {
        let s = Statements::new("app_");
        for sql in [
            &s.insert_messages,
            &s.complete_messages,
            &s.upsert_states,
            &s.select_unprocessed,
            &s.purge_processed,
            &s.check_fences,
        ] {
            assert!(sql.contains("app_"), "{sql}");
            assert!(!sql.contains("flotilla_"), "{sql}");
        }
        // The arrays are bound once: the shape does not depend on a row count.
        assert_eq!(s.insert_messages.matches('$').count(), 11);
    }

    #[test]
    fn data_statements_are_accepted() {
        for sql in [
            "INSERT INTO audit (a) VALUES ($1)",
            "  update audit set a = 1",
            "-- note\nDELETE FROM audit WHERE a = ';'",
            "/* c */ WITH x AS (SELECT 1) INSERT INTO audit SELECT * FROM x",
            "merge into audit using src on true when matched then do nothing",
        ] {
            assert_eq!(refuse_effect(sql), None, "{sql}");
        }
    }

    #[test]
    fn transaction_control_and_session_statements_are_refused() {
        for sql in [
            "COMMIT",
            "rollback",
            "END",
            "RELEASE SAVEPOINT flotilla_completion",
            "SAVEPOINT x",
            "SET search_path = other",
            "NOTIFY flotilla",
            "CALL do_things()",
            "CREATE TABLE t (a int)",
            "",
        ] {
            assert!(refuse_effect(sql).is_some(), "{sql}");
        }
    }
}
