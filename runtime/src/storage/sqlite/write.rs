//! The write path: one [`WriteBatch`] inside one open transaction.
//!
//! Under load a batch holds hundreds of saves and completions, and with sqlx
//! every statement is a round trip to the connection's worker thread, which
//! costs more than SQLite's own work for a row. So the common cases are
//! written with multi-row statements (`sql::chunk_len` rows each): all saves
//! of a batch in a few `INSERT`s, and each run of completions without
//! effects in a few `UPDATE`s plus a few state upserts. Completions with
//! effects, and the rare outcomes (duplicate key, already processed), take
//! one statement each.

use std::collections::{HashMap, HashSet};

use sqlx::sqlite::SqliteConnection;
use sqlx::{AssertSqlSafe, Row};

use super::sql;
use crate::error::StorageError;
use crate::snowflake::now_unix_ms;
use crate::storage::{
    Completion, CompletionOutcome, MessageId, NewMessage, SaveOutcome, SqlValue, Statement,
    StoredReply, UnixMillis, WriteBatch, WriteOutcome,
};

/// Why a batch was not written.
#[derive(Debug)]
pub(super) enum BatchError {
    /// The database failed; the transaction must be rolled back.
    Storage(StorageError),
    /// A staged effect of the completion of `message` rolled back the whole
    /// transaction itself (a trigger's `RAISE(ROLLBACK, ..)`, an `INSERT OR
    /// ROLLBACK`): nothing of the batch is left. Writing the batch again with
    /// that completion's effects failed (`reason`) honours the contract that
    /// only its own completion fails.
    Voided {
        /// The completion whose effect voided the transaction.
        message: MessageId,
        /// The database's message.
        reason: String,
    },
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        Self::Storage(error.into())
    }
}

impl From<StorageError> for BatchError {
    fn from(error: StorageError) -> Self {
        Self::Storage(error)
    }
}

/// Writes `batch` inside the open transaction `conn`; the caller commits.
/// The completions of the messages in `voided` are recorded as
/// `EffectsFailed` with the reason given, without running their effects.
pub(super) async fn write_batch(
    conn: &mut SqliteConnection,
    batch: &WriteBatch,
    voided: &HashMap<MessageId, String>,
) -> Result<WriteOutcome, BatchError> {
    let saves = save_all(conn, &batch.saves).await?;
    let now = now_unix_ms() as i64;
    let mut completions = Vec::with_capacity(batch.completions.len());
    let mut rest = &batch.completions[..];
    while let Some(first) = rest.first() {
        if first.effects.is_empty() {
            let run = plain_run_len(rest);
            completions.extend(complete_plain(conn, &rest[..run], now).await?);
            rest = &rest[run..];
        } else {
            let outcome = match voided.get(&first.message_id) {
                Some(reason) => record_failed(conn, first.message_id, reason, now).await?,
                None => complete_with_effects(conn, first, now).await?,
            };
            completions.push(outcome);
            rest = &rest[1..];
        }
    }
    Ok(WriteOutcome { saves, completions })
}

/// Stores every message whose key is free, in multi-row inserts.
async fn save_all(
    conn: &mut SqliteConnection,
    saves: &[NewMessage],
) -> Result<Vec<SaveOutcome>, StorageError> {
    let mut outcomes = Vec::with_capacity(saves.len());
    let mut rest = saves;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sql::chunk_len(rest.len()));
        rest = tail;
        let mut insert = sqlx::query(sql::insert_messages(chunk.len()));
        for m in chunk {
            insert = insert
                .bind(m.id.0)
                .bind(&*m.address.entity_type)
                .bind(&*m.address.entity_id)
                .bind(m.address.shard.group())
                .bind(i64::from(m.address.shard.index()))
                .bind(&m.tag)
                .bind(m.key.as_ref().map(|k| k.as_str()))
                .bind(&m.payload)
                .bind(sql::encode_headers(&m.headers)?)
                .bind(m.deliver_at)
                .bind(m.created_at);
        }
        let inserted = insert.execute(&mut *conn).await?.rows_affected();
        if inserted == chunk.len() as u64 {
            // The common case: no key was taken, and nothing to read back.
            outcomes.extend(chunk.iter().map(|_| SaveOutcome::Saved));
            continue;
        }
        for m in chunk {
            outcomes.push(key_holder(conn, m).await?);
        }
    }
    Ok(outcomes)
}

/// The outcome of a message of a chunk in which some insert was skipped: the
/// message that holds its key now is either itself (stored by this chunk) or
/// the one stored earlier (in storage, or earlier in this batch).
async fn key_holder(
    conn: &mut SqliteConnection,
    m: &NewMessage,
) -> Result<SaveOutcome, StorageError> {
    // The insert skips only on a key conflict: a message without a key was stored.
    let Some(key) = &m.key else {
        return Ok(SaveOutcome::Saved);
    };
    let row = sqlx::query(sql::SELECT_BY_KEY)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| {
            StorageError::Corrupt(format!(
                "{key:?} was inserted or taken, yet no message holds it"
            ))
        })?;
    let holder = MessageId(row.try_get(0)?);
    if holder == m.id {
        return Ok(SaveOutcome::Saved);
    }
    Ok(SaveOutcome::Duplicate {
        id: holder,
        reply: sql::decode_reply(row.try_get(1)?)?,
    })
}

/// How many completions at the head of `rest` can share multi-row
/// statements: no effects, and no message twice (a second completion of a
/// message must see the first one's processed mark).
fn plain_run_len(rest: &[Completion]) -> usize {
    let mut ids = HashSet::new();
    rest.iter()
        .take_while(|c| c.effects.is_empty() && ids.insert(c.message_id))
        .count()
}

/// Completes a run of completions without effects: marks the unprocessed
/// ones processed with their replies, then saves the states of those marked.
async fn complete_plain(
    conn: &mut SqliteConnection,
    run: &[Completion],
    now: UnixMillis,
) -> Result<Vec<CompletionOutcome>, StorageError> {
    let mut marked = HashSet::with_capacity(run.len());
    let mut rest = run;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sql::chunk_len(rest.len()));
        rest = tail;
        let mut update = sqlx::query_scalar::<_, i64>(sql::complete_messages(chunk.len()));
        for c in chunk {
            update = update
                .bind(c.message_id.0)
                .bind(sql::encode_reply(&c.reply)?);
        }
        marked.extend(update.bind(now).fetch_all(&mut *conn).await?);
    }

    // States in completion order: when one entity has several completions
    // in the run, the last one's state is the one that stays.
    let states: Vec<_> = run
        .iter()
        .filter(|c| marked.contains(&c.message_id.0))
        .filter_map(|c| c.state.as_ref())
        .collect();
    let mut rest = &states[..];
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sql::chunk_len(rest.len()));
        rest = tail;
        let mut upsert = sqlx::query(sql::upsert_states(chunk.len()));
        for s in chunk {
            upsert = upsert
                .bind(&s.entity_type)
                .bind(&s.entity_id)
                .bind(&s.bytes)
                .bind(now);
        }
        upsert.execute(&mut *conn).await?;
    }

    let mut outcomes = Vec::with_capacity(run.len());
    for c in run {
        outcomes.push(if marked.contains(&c.message_id.0) {
            CompletionOutcome::Recorded
        } else {
            already_processed(conn, c.message_id).await?
        });
    }
    Ok(outcomes)
}

/// The outcome of a completion whose message is processed already or unknown.
async fn already_processed(
    conn: &mut SqliteConnection,
    id: MessageId,
) -> Result<CompletionOutcome, StorageError> {
    let existing: Option<Option<Vec<u8>>> = sqlx::query_scalar(sql::SELECT_REPLY)
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(CompletionOutcome::AlreadyProcessed(sql::decode_reply(
        existing.flatten(),
    )?))
}

/// Completes one message whose handler staged effects: its state and effects
/// run inside a savepoint, so a failing effect undoes only this completion.
async fn complete_with_effects(
    conn: &mut SqliteConnection,
    c: &Completion,
    now: UnixMillis,
) -> Result<CompletionOutcome, BatchError> {
    let marked = sqlx::query(sql::COMPLETE_MESSAGE)
        .bind(now)
        .bind(sql::encode_reply(&c.reply)?)
        .bind(c.message_id.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if marked == 0 {
        // Nothing was written: the effects must not run again.
        return Ok(already_processed(conn, c.message_id).await?);
    }
    sqlx::query(sql::SAVEPOINT).execute(&mut *conn).await?;
    if let Some(state) = &c.state {
        sqlx::query(sql::UPSERT_STATE)
            .bind(&state.entity_type)
            .bind(&state.entity_id)
            .bind(&state.bytes)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    let outcome = match run_effects(conn, &c.effects).await? {
        None => CompletionOutcome::Recorded,
        Some(reason) => {
            if let Err(error) = sqlx::query(sql::ROLLBACK_TO_SAVEPOINT)
                .execute(&mut *conn)
                .await
            {
                if sql::is_environmental(&error) {
                    return Err(error.into());
                }
                // "no such savepoint": the effect ended the transaction.
                return Err(BatchError::Voided {
                    message: c.message_id,
                    reason,
                });
            }
            // The processed mark was set before the savepoint and stays: a
            // failed completion is recorded, not retried forever. Its reply
            // says what happened.
            sqlx::query(sql::REPLACE_REPLY)
                .bind(sql::encode_reply(&StoredReply::EffectsFailed(
                    reason.clone(),
                ))?)
                .bind(c.message_id.0)
                .execute(&mut *conn)
                .await?;
            CompletionOutcome::EffectsFailed(reason)
        }
    };
    sqlx::query(sql::RELEASE_SAVEPOINT)
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}

/// Records the completion of `id` as `EffectsFailed(reason)` without its
/// state or effects (their failure is known already).
async fn record_failed(
    conn: &mut SqliteConnection,
    id: MessageId,
    reason: &str,
    now: UnixMillis,
) -> Result<CompletionOutcome, StorageError> {
    let marked = sqlx::query(sql::COMPLETE_MESSAGE)
        .bind(now)
        .bind(sql::encode_reply(&StoredReply::EffectsFailed(
            reason.to_owned(),
        ))?)
        .bind(id.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if marked == 0 {
        return already_processed(conn, id).await;
    }
    Ok(CompletionOutcome::EffectsFailed(reason.to_owned()))
}

/// Runs staged effects in order. `Ok(Some(message))`: one failed by its own
/// fault (and the rest did not run); `Err`: the database is in trouble and
/// the whole batch must fail.
async fn run_effects(
    conn: &mut SqliteConnection,
    effects: &[Statement],
) -> Result<Option<String>, StorageError> {
    for effect in effects {
        if let Some(refusal) = sql::refuse_effect(effect.sql()) {
            return Ok(Some(refusal));
        }
        let mut query = sqlx::query(AssertSqlSafe(effect.sql()));
        for value in effect.params() {
            query = match value {
                SqlValue::Null => query.bind(None::<i64>),
                SqlValue::Int(v) => query.bind(*v),
                SqlValue::Real(v) => query.bind(*v),
                SqlValue::Text(v) => query.bind(v.as_str()),
                SqlValue::Blob(v) => query.bind(v.as_slice()),
            };
        }
        match query.execute(&mut *conn).await {
            Ok(_) => {}
            Err(error) if sql::is_environmental(&error) => return Err(error.into()),
            Err(error) => return Ok(Some(sql::database_message(&error))),
        }
    }
    Ok(None)
}
