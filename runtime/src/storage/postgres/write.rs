//! The write path: one [`WriteBatch`] inside one open transaction.
//!
//! Every statement is a network round trip, so the common cases take a
//! fixed number of statements whatever the batch size: all saves of a batch
//! in one `INSERT .. SELECT FROM UNNEST(..)` per [`sql::MAX_ROWS`] rows, each
//! run of completions without effects in one `UPDATE .. FROM UNNEST(..)` plus
//! one state upsert. Completions with effects take a savepoint each; the rare
//! outcomes (duplicate key, already processed) are read back with one
//! statement per chunk. Fenced completions (cluster runners) add one
//! statement per chunk of completions, which checks every fence at once.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

use super::sql::{self, Statements};
use crate::error::StorageError;
use crate::snowflake::now_unix_ms;
use crate::storage::{
    Completion, CompletionOutcome, Epoch, Fence, MessageId, NewMessage, SaveOutcome, SqlValue,
    Statement, StoredReply, UnixMillis, WriteBatch, WriteOutcome,
};

/// Writes `batch` inside the open transaction `conn`; the caller commits.
pub(super) async fn write_batch(
    conn: &mut PgConnection,
    statements: &Statements,
    batch: &WriteBatch,
) -> Result<WriteOutcome, StorageError> {
    let mut saves = Vec::with_capacity(batch.saves.len());
    for chunk in batch.saves.chunks(sql::MAX_ROWS) {
        saves.extend(save_chunk(conn, statements, chunk).await?);
    }
    let now = now_unix_ms() as i64;
    let mut fenced = Vec::with_capacity(batch.completions.len());
    for chunk in batch.completions.chunks(sql::MAX_ROWS) {
        fenced.extend(check_fences(conn, statements, chunk).await?);
    }
    let passing: Vec<&Completion> = batch
        .completions
        .iter()
        .zip(&fenced)
        .filter(|(_, fenced)| fenced.is_none())
        .map(|(c, _)| c)
        .collect();
    let mut outcomes = Vec::with_capacity(passing.len());
    let mut rest = &passing[..];
    while let Some(first) = rest.first() {
        if first.effects.is_empty() {
            let run = plain_run_len(rest);
            outcomes.extend(complete_plain(conn, statements, &rest[..run], now).await?);
            rest = &rest[run..];
        } else {
            outcomes.push(complete_with_effects(conn, statements, first, now).await?);
            rest = &rest[1..];
        }
    }
    // Back in batch order: each fenced slot keeps its refusal, the others
    // take the outcomes of the passing completions in turn.
    let mut outcomes = outcomes.into_iter();
    let completions = fenced
        .into_iter()
        .map(|fenced| {
            fenced.or_else(|| outcomes.next()).ok_or_else(|| {
                StorageError::Corrupt("a completion of the batch has no outcome".to_owned())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WriteOutcome { saves, completions })
}

/// The refusal of each completion of `chunk` whose [`Fence`] is stale
/// (`None`: it may be written), read with one statement if any is fenced.
///
/// The statement reads the fenced shards' rows `FOR SHARE`, and the lock is
/// held until this transaction ends. A runner that acquires one of these
/// shards meanwhile bumps its epoch with an `UPDATE` of that row, which
/// waits for this commit: it then resumes the shard's unprocessed messages
/// only after the completions written here are committed, and sees them
/// processed. Had the bump committed first, this read sees the new epoch
/// (read committed re-reads a row updated under it) and the completion is
/// fenced. Either way no message is handled by the new owner and also
/// recorded by the old one.
///
/// A completion is fenced when its epoch is not the stored one, when its
/// shard has no row (never acquired), or when its message belongs to
/// another shard than the fence names (a caller bug must not write). An
/// unknown message with a valid fence passes, and is reported as unknown
/// by the completion itself.
async fn check_fences(
    conn: &mut PgConnection,
    statements: &Statements,
    chunk: &[Completion],
) -> Result<Vec<Option<CompletionOutcome>>, StorageError> {
    let mut refusals = vec![None; chunk.len()];
    let fenced: Vec<(usize, &Fence)> = chunk
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.fence.as_ref().map(|f| (i, f)))
        .collect();
    if fenced.is_empty() {
        return Ok(refusals);
    }
    let (mut ids, mut groups, mut indexes) = (
        Vec::with_capacity(fenced.len()),
        Vec::with_capacity(fenced.len()),
        Vec::with_capacity(fenced.len()),
    );
    let mut distinct = HashSet::new();
    let (mut distinct_groups, mut distinct_indexes) = (Vec::new(), Vec::new());
    for (i, fence) in &fenced {
        ids.push(chunk[*i].message_id.0);
        groups.push(fence.shard.group());
        indexes.push(i64::from(fence.shard.index()));
        if distinct.insert(&fence.shard) {
            distinct_groups.push(fence.shard.group());
            distinct_indexes.push(i64::from(fence.shard.index()));
        }
    }
    let rows = sqlx::query(AssertSqlSafe(&*statements.check_fences))
        .bind(&ids)
        .bind(&groups)
        .bind(&indexes)
        .bind(&distinct_groups)
        .bind(&distinct_indexes)
        .fetch_all(&mut *conn)
        .await?;
    if rows.len() != fenced.len() {
        return Err(StorageError::Corrupt(format!(
            "fence check returned {} rows for {} fenced completions",
            rows.len(),
            fenced.len()
        )));
    }
    for row in rows {
        // 1-based position among the fenced completions.
        let ord: i64 = row.try_get(0)?;
        let (i, fence) = usize::try_from(ord - 1)
            .ok()
            .and_then(|k| fenced.get(k))
            .ok_or_else(|| StorageError::Corrupt(format!("fence check row {ord}")))?;
        let current: Option<i64> = row.try_get(1)?;
        let message_group: Option<String> = row.try_get(2)?;
        let message_index: Option<i64> = row.try_get(3)?;
        let same_shard = match (&message_group, message_index) {
            (Some(group), Some(index)) => {
                group == fence.shard.group() && index == i64::from(fence.shard.index())
            }
            // Unknown message: nothing to compare; the completion reports it.
            _ => true,
        };
        if current != Some(fence.epoch.0) || !same_shard {
            refusals[*i] = Some(CompletionOutcome::Fenced {
                stale: fence.epoch,
                current: current.map(Epoch),
            });
        }
    }
    Ok(refusals)
}

/// Stores every message of `chunk` whose key is free, in one statement, and
/// reads back the holders of the keys that were taken.
async fn save_chunk(
    conn: &mut PgConnection,
    statements: &Statements,
    chunk: &[NewMessage],
) -> Result<Vec<SaveOutcome>, StorageError> {
    let n = chunk.len();
    let (mut ids, mut types, mut entities, mut groups, mut shards) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut tags, mut keys, mut payloads, mut headers, mut deliver, mut created) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for m in chunk {
        ids.push(m.id.0);
        types.push(&*m.address.entity_type);
        entities.push(&*m.address.entity_id);
        groups.push(m.address.shard.group());
        shards.push(i64::from(m.address.shard.index()));
        tags.push(m.tag.as_str());
        keys.push(m.key.as_ref().map(|k| k.as_str()));
        payloads.push(m.payload.as_slice());
        headers.push(sql::encode_headers(&m.headers)?);
        deliver.push(m.deliver_at);
        created.push(m.created_at);
    }
    let inserted: HashSet<i64> = sqlx::query_scalar(AssertSqlSafe(&*statements.insert_messages))
        .bind(&ids)
        .bind(&types)
        .bind(&entities)
        .bind(&groups)
        .bind(&shards)
        .bind(&tags)
        .bind(&keys)
        .bind(&payloads)
        .bind(&headers)
        .bind(&deliver)
        .bind(&created)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    if inserted.len() == n {
        // The common case: no key was taken, and nothing to read back.
        return Ok(vec![SaveOutcome::Saved; n]);
    }

    // The insert skips only on a key conflict (an id stored twice fails the
    // statement): each skipped message has a key, now held by another message.
    let taken: Vec<&str> = chunk
        .iter()
        .filter(|m| !inserted.contains(&m.id.0))
        .filter_map(|m| m.key.as_ref().map(|k| k.as_str()))
        .collect();
    let rows = sqlx::query(AssertSqlSafe(&*statements.select_by_keys))
        .bind(&taken)
        .fetch_all(&mut *conn)
        .await?;
    let mut holders = HashMap::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get(0)?;
        let id: i64 = row.try_get(1)?;
        let reply: Option<Vec<u8>> = row.try_get(2)?;
        holders.insert(key, (MessageId(id), reply));
    }
    chunk
        .iter()
        .map(|m| {
            if inserted.contains(&m.id.0) {
                return Ok(SaveOutcome::Saved);
            }
            let key = m.key.as_ref().ok_or_else(|| {
                StorageError::Corrupt(format!("message {} without a key was not stored", m.id))
            })?;
            let (id, reply) = holders.get(key.as_str()).ok_or_else(|| {
                StorageError::Corrupt(format!("{key:?} was taken, yet no message holds it"))
            })?;
            Ok(SaveOutcome::Duplicate {
                id: *id,
                reply: sql::decode_reply(reply.clone())?,
            })
        })
        .collect()
}

/// How many completions at the head of `rest` can share multi-row
/// statements: no effects, and no message twice (a second completion of a
/// message must see the first one's processed mark).
fn plain_run_len(rest: &[&Completion]) -> usize {
    let mut ids = HashSet::new();
    rest.iter()
        .take_while(|c| c.effects.is_empty() && ids.insert(c.message_id))
        .take(sql::MAX_ROWS)
        .count()
}

/// Completes a run of completions without effects: marks the unprocessed
/// ones processed with their replies, then saves the states of those marked.
async fn complete_plain(
    conn: &mut PgConnection,
    statements: &Statements,
    run: &[&Completion],
    now: UnixMillis,
) -> Result<Vec<CompletionOutcome>, StorageError> {
    let ids: Vec<i64> = run.iter().map(|c| c.message_id.0).collect();
    let replies = run
        .iter()
        .map(|c| sql::encode_reply(&c.reply))
        .collect::<Result<Vec<_>, _>>()?;
    let marked: HashSet<i64> = sqlx::query_scalar(AssertSqlSafe(&*statements.complete_messages))
        .bind(&ids)
        .bind(&replies)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();

    // One row per entity: an upsert may not touch a row twice. When one
    // entity has several completions in the run, the last one's state stays.
    let mut last = HashMap::new();
    for c in run.iter().filter(|c| marked.contains(&c.message_id.0)) {
        if let Some(s) = &c.state {
            last.insert((s.entity_type.as_str(), s.entity_id.as_str()), &s.bytes);
        }
    }
    if !last.is_empty() {
        let (mut types, mut entities, mut states) = (
            Vec::with_capacity(last.len()),
            Vec::with_capacity(last.len()),
            Vec::with_capacity(last.len()),
        );
        for ((entity_type, entity_id), bytes) in last {
            types.push(entity_type);
            entities.push(entity_id);
            states.push(bytes.as_slice());
        }
        sqlx::query(AssertSqlSafe(&*statements.upsert_states))
            .bind(&types)
            .bind(&entities)
            .bind(&states)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }

    let mut earlier = if marked.len() == run.len() {
        HashMap::new()
    } else {
        let unmarked: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !marked.contains(id))
            .collect();
        replies_of(conn, statements, &unmarked).await?
    };
    Ok(run
        .iter()
        .map(|c| {
            if marked.contains(&c.message_id.0) {
                CompletionOutcome::Recorded
            } else {
                CompletionOutcome::AlreadyProcessed(earlier.remove(&c.message_id.0).flatten())
            }
        })
        .collect())
}

/// The recorded replies of `ids` (processed already, or unknown: absent).
async fn replies_of(
    conn: &mut PgConnection,
    statements: &Statements,
    ids: &[i64],
) -> Result<HashMap<i64, Option<StoredReply>>, StorageError> {
    let rows = sqlx::query(AssertSqlSafe(&*statements.select_replies))
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    let mut replies = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get(0)?;
        replies.insert(id, sql::decode_reply(row.try_get(1)?)?);
    }
    Ok(replies)
}

/// Completes one message whose handler staged effects: its state and effects
/// run inside a savepoint, so a failing effect undoes only this completion.
async fn complete_with_effects(
    conn: &mut PgConnection,
    statements: &Statements,
    c: &Completion,
    now: UnixMillis,
) -> Result<CompletionOutcome, StorageError> {
    let marked = sqlx::query(AssertSqlSafe(&*statements.complete_message))
        .bind(now)
        .bind(sql::encode_reply(&c.reply)?)
        .bind(c.message_id.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if marked == 0 {
        // Nothing was written: the effects must not run again.
        let mut earlier = replies_of(conn, statements, &[c.message_id.0]).await?;
        return Ok(CompletionOutcome::AlreadyProcessed(
            earlier.remove(&c.message_id.0).flatten(),
        ));
    }
    sqlx::query(sql::SAVEPOINT).execute(&mut *conn).await?;
    if let Some(state) = &c.state {
        sqlx::query(AssertSqlSafe(&*statements.upsert_states))
            .bind([state.entity_type.as_str()])
            .bind([state.entity_id.as_str()])
            .bind([state.bytes.as_slice()])
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    let outcome = match run_effects(conn, &c.effects).await? {
        None => CompletionOutcome::Recorded,
        Some(reason) => {
            // A failed statement leaves the transaction aborted until this.
            sqlx::query(sql::ROLLBACK_TO_SAVEPOINT)
                .execute(&mut *conn)
                .await?;
            // The processed mark was set before the savepoint and stays: a
            // failed completion is recorded, not retried forever. Its reply
            // says what happened.
            sqlx::query(AssertSqlSafe(&*statements.replace_reply))
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

/// Runs staged effects in order, binding each `SqlValue` to `$1`, `$2`, ...
/// `Ok(Some(message))`: one failed by its own fault (and the rest did not
/// run); `Err`: the database is in trouble and the whole batch must fail.
async fn run_effects(
    conn: &mut PgConnection,
    effects: &[Statement],
) -> Result<Option<String>, StorageError> {
    for effect in effects {
        if let Some(refusal) = sql::refuse_effect(effect.sql()) {
            return Ok(Some(refusal));
        }
        let mut query = sqlx::query(AssertSqlSafe(effect.sql()));
        for value in effect.params() {
            query = match value {
                SqlValue::Null => query.bind(UntypedNull),
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

/// A NULL bound without a type. A typed NULL (say `bigint`) would fail in
/// a `text` column (PostgreSQL casts parameters to a column's type only
/// where an assignment cast exists); with type OID 0 the server infers the
/// placeholder's type from where it stands, as for a literal `NULL`.
#[derive(Debug, Clone, Copy)]
struct UntypedNull;

impl sqlx::Type<sqlx::Postgres> for UntypedNull {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}
