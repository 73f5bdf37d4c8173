//! The SQL of the SQLite backend, one statement per state transition, and the
//! mapping between rows and storage types.
//!
//! Every statement runs through `sqlx::query` with bound values, never with
//! values spliced into its text, so sqlx prepares it once per connection and
//! reuses it from its statement cache. Single-row statements are `const`s;
//! multi-row ones are built once per shape (row count) from `const` parts.

use std::sync::OnceLock;

/// A writer transaction takes the write lock at once: no reader-to-writer
/// upgrade can then fail with `SQLITE_BUSY` halfway through a batch.
pub(super) const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";
/// Ends a batch: one fsync (`synchronous = FULL`) for all of it.
pub(super) const COMMIT: &str = "COMMIT";
/// Abandons a batch.
pub(super) const ROLLBACK: &str = "ROLLBACK";

/// The most rows one multi-row statement carries (at 11 parameters a row,
/// far below SQLite's limit of 32766).
const MAX_ROWS: usize = 64;

/// Row counts of multi-row statements are powers of two up to [`MAX_ROWS`],
/// so each statement has 7 shapes, each prepared once per connection and
/// cached, and a batch of n rows takes at most log2(n) + 1 statements.
const SHAPES: usize = MAX_ROWS.ilog2() as usize + 1;

/// How many of `remaining` (at least 1) rows the next statement takes.
pub(super) fn chunk_len(remaining: usize) -> usize {
    1 << remaining.clamp(1, MAX_ROWS).ilog2()
}

/// The statement of one shape, built once per process.
fn shaped(
    cache: &'static OnceLock<Vec<String>>,
    rows: usize,
    build: fn(usize) -> String,
) -> &'static str {
    debug_assert!(rows.is_power_of_two() && rows <= MAX_ROWS, "{rows} rows");
    let shapes = cache.get_or_init(|| (0..SHAPES).map(|p| build(1 << p)).collect());
    // Total for any `rows`: a wrong count would fail as a bind mismatch, not a panic.
    let shape = rows.clamp(1, MAX_ROWS).ilog2() as usize;
    shapes.get(shape).map_or("", String::as_str)
}

fn rows_of(row: &str, rows: usize) -> String {
    vec![row; rows].join(", ")
}

/// Stores `rows` messages; a message whose key is taken (in storage, or by
/// an earlier row of the same statement) is skipped. Only a key conflict is
/// tolerated: an id stored under another key is a bug upstream and fails the
/// batch.
pub(super) fn insert_messages(rows: usize) -> &'static str {
    static CACHE: OnceLock<Vec<String>> = OnceLock::new();
    shaped(&CACHE, rows, |rows| {
        format!(
            "INSERT INTO flotilla_messages \
             (id, entity_type, entity_id, shard_group, shard_index, tag, message_key, \
              payload, headers, deliver_at, created_at) \
             VALUES {} \
             ON CONFLICT (message_key) DO NOTHING",
            rows_of("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        )
    })
}

/// Marks `rows` messages (`id, reply` pairs, then `processed_at`) processed
/// with their replies and returns the ids it marked; a message unknown or
/// processed already is left alone (the guard that makes a reply
/// exactly-once). The ids of one statement must be distinct.
pub(super) fn complete_messages(rows: usize) -> &'static str {
    static CACHE: OnceLock<Vec<String>> = OnceLock::new();
    shaped(&CACHE, rows, |rows| {
        format!(
            "WITH done (id, reply) AS (VALUES {}) \
             UPDATE flotilla_messages SET processed_at = ?, reply = done.reply \
             FROM done \
             WHERE flotilla_messages.id = done.id AND flotilla_messages.processed_at IS NULL \
             RETURNING id",
            rows_of("(?, ?)", rows)
        )
    })
}

/// Saves the states of `rows` entities; for an entity present twice, the
/// later row wins.
pub(super) fn upsert_states(rows: usize) -> &'static str {
    static CACHE: OnceLock<Vec<String>> = OnceLock::new();
    shaped(&CACHE, rows, |rows| {
        format!(
            "INSERT INTO flotilla_entity_state (entity_type, entity_id, state, updated_at) \
             VALUES {} \
             ON CONFLICT (entity_type, entity_id) \
             DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            rows_of("(?, ?, ?, ?)", rows)
        )
    })
}

/// The message that holds a key, for a duplicate save.
pub(super) const SELECT_BY_KEY: &str =
    "SELECT id, reply FROM flotilla_messages WHERE message_key = ?";

/// Marks one message processed with its reply; 0 rows when it is unknown or
/// processed already.
pub(super) const COMPLETE_MESSAGE: &str = "UPDATE flotilla_messages \
     SET processed_at = ?, reply = ? \
     WHERE id = ? AND processed_at IS NULL";

/// Replaces the reply of a completion whose effects failed (inside the same
/// transaction that just marked it processed).
pub(super) const REPLACE_REPLY: &str = "UPDATE flotilla_messages SET reply = ? WHERE id = ?";

/// The recorded reply of a message (NULL while unprocessed).
pub(super) const SELECT_REPLY: &str = "SELECT reply FROM flotilla_messages WHERE id = ?";

/// Saves one entity's state.
pub(super) const UPSERT_STATE: &str = "INSERT INTO flotilla_entity_state \
     (entity_type, entity_id, state, updated_at) VALUES (?, ?, ?, ?) \
     ON CONFLICT (entity_type, entity_id) \
     DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at";

/// Loads entity state.
pub(super) const SELECT_STATE: &str =
    "SELECT state FROM flotilla_entity_state WHERE entity_type = ? AND entity_id = ?";

/// One completion's effects and state commit or roll back together.
pub(super) const SAVEPOINT: &str = "SAVEPOINT flotilla_completion";
/// Undoes the effects and state of one completion, keeping the rest of the batch.
pub(super) const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT flotilla_completion";
/// Ends the savepoint (its writes stay part of the batch transaction).
pub(super) const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT flotilla_completion";

/// Ready unprocessed messages in id order. Uses the partial index
/// `flotilla_messages_unprocessed`.
pub(super) const SELECT_UNPROCESSED: &str = "SELECT id, entity_type, entity_id, shard_group, \
     shard_index, tag, message_key, payload, headers, deliver_at, created_at \
     FROM flotilla_messages \
     WHERE processed_at IS NULL AND (deliver_at IS NULL OR deliver_at <= ?) AND id > ? \
     ORDER BY id LIMIT ?";

/// `SELECT_UNPROCESSED` limited to the shards of a JSON array of
/// `"group:index"` strings ([`shard_list`]).
pub(super) const SELECT_UNPROCESSED_IN: &str = "SELECT id, entity_type, entity_id, shard_group, \
     shard_index, tag, message_key, payload, headers, deliver_at, created_at \
     FROM flotilla_messages \
     WHERE processed_at IS NULL AND (deliver_at IS NULL OR deliver_at <= ?) AND id > ? \
       AND (shard_group || ':' || shard_index) IN (SELECT value FROM json_each(?)) \
     ORDER BY id LIMIT ?";

/// `NEXT_DELIVERY` limited to the shards of a JSON array ([`shard_list`]).
pub(super) const NEXT_DELIVERY_IN: &str = "SELECT MIN(deliver_at) FROM flotilla_messages \
     WHERE processed_at IS NULL AND deliver_at > ? \
       AND (shard_group || ':' || shard_index) IN (SELECT value FROM json_each(?))";

/// A JSON array of `"group:index"` strings, one per shard.
pub(super) fn shard_list(shards: &[crate::sharding::ShardId]) -> String {
    let mut json = String::from("[");
    for (i, shard) in shards.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push('"');
        for c in shard.group().chars() {
            match c {
                '"' => json.push_str("\\\""),
                '\\' => json.push_str("\\\\"),
                c if u32::from(c) < 0x20 => json.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => json.push(c),
            }
        }
        json.push_str(&format!(":{}\"", shard.index()));
    }
    json.push(']');
    json
}

/// The earliest scheduled delivery after an instant. Uses the partial index
/// `flotilla_messages_deliver_at` (`deliver_at > ?` implies `IS NOT NULL`).
pub(super) const NEXT_DELIVERY: &str = "SELECT MIN(deliver_at) FROM flotilla_messages \
     WHERE processed_at IS NULL AND deliver_at > ?";

/// How many processed rows one purge transaction deletes, so that a large
/// purge never holds the write lock for long: group commits run between chunks.
pub(super) const PURGE_CHUNK: i64 = 1000;

/// Deletes up to `PURGE_CHUNK` processed rows older than the cutoff (SQLite
/// has no `DELETE .. LIMIT` by default, hence the subquery).
pub(super) const PURGE_PROCESSED: &str = "DELETE FROM flotilla_messages WHERE id IN \
     (SELECT id FROM flotilla_messages \
      WHERE processed_at IS NOT NULL AND processed_at < ? LIMIT ?)";

use super::super::columns::refuse_keyword;
pub(super) use super::super::columns::{
    decode_reply, encode_headers, encode_reply, stored_message,
};

/// Why a staged effect is refused before it runs, if it is.
///
/// An effect runs inside the batch transaction, so it must be one data
/// statement: a `COMMIT`, `ROLLBACK`, `RELEASE`, `PRAGMA` or `ATTACH` (alone
/// or after a `;`) could end or escape the transaction that makes the
/// completion atomic.
pub(super) fn refuse_effect(sql: &str) -> Option<String> {
    if let Some(refusal) = refuse_keyword(
        sql,
        &["INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "SELECT"],
    ) {
        return Some(refusal);
    }
    if has_second_statement(sql) {
        return Some(
            "a staged effect must be a single statement; stage one Statement per statement"
                .to_owned(),
        );
    }
    None
}

/// True when something other than whitespace or comments follows a `;` that
/// is outside quotes and comments.
fn has_second_statement(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut ended = false;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' | b'"' | b'`' | b'[' => {
                if ended {
                    return true;
                }
                let close = if b == b'[' { b']' } else { b };
                i += 1;
                while i < bytes.len() && bytes[i] != close {
                    i += 1;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b';' => ended = true,
            b if b.is_ascii_whitespace() => {}
            _ if ended => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// True for SQLite result codes that say the database or the machine is in
/// trouble (busy, locked, out of memory or disk, I/O, corruption), as opposed
/// to a fault of the statement itself (syntax, missing table, constraint).
/// A staged effect failing for the first reason fails the whole batch, to be
/// retried; for the second it fails only its completion.
pub(super) fn is_environmental(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return true;
    };
    let Some(code) = db.code().and_then(|c| c.parse::<i32>().ok()) else {
        return false;
    };
    // Primary result codes (the low byte of an extended code):
    // BUSY 5, LOCKED 6, NOMEM 7, READONLY 8, INTERRUPT 9, IOERR 10, CORRUPT 11,
    // FULL 13, CANTOPEN 14, PROTOCOL 15, NOTADB 26.
    matches!(code & 0xff, 5..=11 | 13..=15 | 26)
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
    fn chunks_are_powers_of_two_up_to_the_maximum() {
        let split = |mut n: usize| {
            let mut chunks = Vec::new();
            while n > 0 {
                let len = chunk_len(n);
                chunks.push(len);
                n -= len;
            }
            chunks
        };
        assert_eq!(split(1), vec![1]);
        assert_eq!(split(64), vec![64]);
        assert_eq!(split(63), vec![32, 16, 8, 4, 2, 1]);
        assert_eq!(split(130), vec![64, 64, 2]);
        assert_eq!(insert_messages(4).matches('?').count(), 44);
        assert_eq!(complete_messages(64).matches('?').count(), 129);
        assert_eq!(upsert_states(1).matches('?').count(), 4);
    }

    #[test]
    fn data_statements_are_accepted() {
        for sql in [
            "INSERT INTO audit (a) VALUES (?)",
            "  update audit set a = 1",
            "-- note\nDELETE FROM audit WHERE a = ';'",
            "/* c */ WITH x AS (SELECT 1) INSERT INTO audit SELECT * FROM x;",
            "INSERT INTO audit (a) VALUES ('x;y'); -- trailing comment",
            "REPLACE INTO \"odd;name\" VALUES (1);  ",
        ] {
            assert_eq!(refuse_effect(sql), None, "{sql}");
        }
    }

    #[test]
    fn transaction_control_and_second_statements_are_refused() {
        for sql in [
            "COMMIT",
            "rollback",
            "RELEASE SAVEPOINT flotilla_completion",
            "PRAGMA foreign_keys = OFF",
            "ATTACH 'x.db' AS x",
            "BEGIN",
            "INSERT INTO audit VALUES (1); COMMIT",
            "INSERT INTO audit VALUES (';'); COMMIT",
            "",
        ] {
            assert!(refuse_effect(sql).is_some(), "{sql}");
        }
    }
}
