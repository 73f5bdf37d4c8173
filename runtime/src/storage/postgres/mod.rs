//! PostgreSQL storage: many runners on one database.
//!
//! Flotilla's tables carry a prefix (default `flotilla_`), so several clusters
//! and the application's own tables share one database. They are created by
//! Flotilla's own migrations (`migrations/postgres`, with a `{prefix}`
//! placeholder), recorded in `{prefix}migrations` and applied on connect under
//! an advisory lock, so runners starting together migrate once.
//!
//! Writes: one transaction per [`WriteBatch`], with multi-row statements that
//! bind one array per column (`UNNEST`), so a batch of any size takes a fixed
//! number of round trips. Reads run on the pool.

mod migrate;
mod runners;
mod sql;
mod write;

pub use runners::PostgresRunners;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::{
    MessageId, MessageStorage, ShardFilter, StoredMessage, StoredReply, UnixMillis,
    UnprocessedQuery, WriteBatch, WriteOutcome,
};
use crate::error::{SetupError, StorageError};
use sql::Statements;

/// The table prefix used when none is chosen.
pub const DEFAULT_PREFIX: &str = "flotilla_";

/// How many connections [`PostgresStorage::connect`] opens at most: the
/// group-commit writer, delivery scans and reply look-ups of one runner.
const POOL_SIZE: u32 = 8;

/// Checks a table prefix against `^[a-z_][a-z0-9_]{0,40}$`. The prefix is
/// pasted into SQL as part of identifiers, so nothing else may pass.
fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    let bytes = prefix.as_bytes();
    let valid = matches!(bytes.first(), Some(b'a'..=b'z' | b'_'))
        && bytes.len() <= 41
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(StorageError::Setup(SetupError::InvalidPrefix {
            prefix: prefix.to_owned(),
        }))
    }
}

/// Stores messages, replies and entity state in PostgreSQL tables named
/// `{prefix}messages`, `{prefix}entity_state` and `{prefix}migrations`.
///
/// ```no_run
/// # async fn run() -> Result<(), flotilla::StorageError> {
/// use flotilla::storage::{MessageStorage, PostgresStorage};
/// let storage = PostgresStorage::connect("postgres://app@db/app", "flotilla_").await?;
/// assert_eq!(storage.load_state("Account", "acct-42").await?, None);
/// storage.close().await;
/// # Ok(()) }
/// ```
pub struct PostgresStorage {
    pool: PgPool,
    prefix: String,
    statements: Arc<Statements>,
    closed: AtomicBool,
}

impl fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("prefix", &self.prefix)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresStorage {
    /// Connects to `url` with a pool of its own, and applies Flotilla's
    /// migrations to the tables prefixed `prefix` ([`DEFAULT_PREFIX`] unless
    /// you run several clusters in one database).
    ///
    /// Fails with a [`SetupError`] (see [`StorageError::setup_error`])
    /// for a bad prefix or a database migrated by a newer or different build.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StorageError> {
        validate_prefix(prefix)?;
        // No ping before each use: it would double the round trips of a
        // write; a dead connection fails its statement and is replaced.
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .test_before_acquire(false)
            .connect(url)
            .await?;
        Self::from_pool(pool, prefix).await
    }

    /// Uses `pool` (its connection settings, `search_path` included) and
    /// applies Flotilla's migrations to the tables prefixed `prefix`.
    /// [`close`](MessageStorage::close) closes the pool.
    pub async fn from_pool(pool: PgPool, prefix: &str) -> Result<Self, StorageError> {
        validate_prefix(prefix)?;
        migrate::migrate(&pool, prefix, migrate::MIGRATIONS).await?;
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
            statements: Statements::new(prefix),
            closed: AtomicBool::new(false),
        })
    }

    /// The table prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pool, for the application's own queries on the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The runner registry and shard locks of the cluster stored here (same
    /// database, same prefix). It reads and signals through this storage's
    /// pool and opens its own lock connection with the pool's connect
    /// options when it registers. `lock_timeout`: how long the lock session
    /// may stay silent before PostgreSQL ends it, freeing every lock of the
    /// runner (confirm more often than that); also the limit of one
    /// [`confirm`](super::RunnerStorage::confirm).
    pub fn runners(&self, lock_timeout: Duration) -> PostgresRunners {
        PostgresRunners::new(self.pool.clone(), &self.prefix, lock_timeout)
    }

    fn ensure_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Maps the error of a call whose pool closed under it to `Closed`.
    fn call_error(&self, error: impl Into<StorageError>) -> StorageError {
        match error.into() {
            StorageError::Database(sqlx::Error::PoolClosed) => StorageError::Closed,
            other if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(error = %other, "call failed while closing");
                StorageError::Closed
            }
            other => other,
        }
    }
}

#[async_trait]
impl MessageStorage for PostgresStorage {
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError> {
        self.ensure_open()?;
        if batch.is_empty() {
            return Ok(WriteOutcome::default());
        }
        // If this future is dropped half way, sqlx rolls the transaction
        // back when `tx` drops: nothing of the batch commits.
        let mut tx = self.pool.begin().await.map_err(|e| self.call_error(e))?;
        match write::write_batch(&mut tx, &self.statements, &batch).await {
            Ok(outcome) => {
                tx.commit().await.map_err(|e| self.call_error(e))?;
                Ok(outcome)
            }
            Err(error) => {
                // Explicitly: a dropped transaction is rolled back only when
                // its connection is next used, and keeps its row locks until then.
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(error = %rollback, "rolling back a failed batch failed");
                }
                Err(self.call_error(error))
            }
        }
    }

    async fn unprocessed(
        &self,
        query: UnprocessedQuery,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.ensure_open()?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let after = query.after.map_or(i64::MIN, |id| id.0);
        let rows = match &query.shards {
            ShardFilter::All => {
                sqlx::query(AssertSqlSafe(&*self.statements.select_unprocessed))
                    .bind(query.ready_at)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
            }
            ShardFilter::Only(shards) => {
                let (groups, indexes) = shard_columns(shards);
                sqlx::query(AssertSqlSafe(&*self.statements.select_unprocessed_in))
                    .bind(query.ready_at)
                    .bind(after)
                    .bind(limit)
                    .bind(groups)
                    .bind(indexes)
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(|e| self.call_error(e))?;
        rows.iter().map(sql::stored_message).collect()
    }

    async fn next_delivery(
        &self,
        after: UnixMillis,
        shards: &ShardFilter,
    ) -> Result<Option<UnixMillis>, StorageError> {
        self.ensure_open()?;
        match shards {
            ShardFilter::All => {
                sqlx::query_scalar(AssertSqlSafe(&*self.statements.next_delivery))
                    .bind(after)
                    .fetch_one(&self.pool)
                    .await
            }
            ShardFilter::Only(shards) => {
                let (groups, indexes) = shard_columns(shards);
                sqlx::query_scalar(AssertSqlSafe(&*self.statements.next_delivery_in))
                    .bind(after)
                    .bind(groups)
                    .bind(indexes)
                    .fetch_one(&self.pool)
                    .await
            }
        }
        .map_err(|e| self.call_error(e))
    }

    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError> {
        self.ensure_open()?;
        let row = sqlx::query(AssertSqlSafe(&*self.statements.select_reply))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.call_error(e))?;
        let reply: Option<Vec<u8>> = match row {
            Some(row) => row.try_get(0)?,
            None => None,
        };
        sql::decode_reply(reply)
    }

    async fn load_state(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.ensure_open()?;
        sqlx::query_scalar(AssertSqlSafe(&*self.statements.select_state))
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.call_error(e))
    }

    async fn purge_processed(&self, processed_before: UnixMillis) -> Result<u64, StorageError> {
        let mut purged = 0;
        loop {
            self.ensure_open()?;
            // One chunk per statement (its own transaction), so group
            // commits on the same rows never wait for all of a long purge.
            let deleted = sqlx::query(AssertSqlSafe(&*self.statements.purge_processed))
                .bind(processed_before)
                .bind(sql::PURGE_CHUNK)
                .execute(&self.pool)
                .await
                .map_err(|e| self.call_error(e))?
                .rows_affected();
            purged += deleted;
            if deleted < sql::PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Waits for the connections in use to come back, so a write in
        // flight commits or rolls back before the pool is gone.
        self.pool.close().await;
    }
}

/// The shards as two columns (groups, indexes) for `UNNEST`.
fn shard_columns<'a>(
    shards: impl IntoIterator<Item = &'a crate::sharding::ShardId>,
) -> (Vec<String>, Vec<i64>) {
    shards
        .into_iter()
        .map(|s| (s.group().to_owned(), i64::from(s.index())))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_follow_the_rule() {
        for ok in [
            "flotilla_",
            "_",
            "a",
            "app2_",
            &format!("a{}", "b".repeat(40)),
        ] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "9a",
            "App_",
            "a-b",
            "a b",
            "x;drop table y;",
            "é",
            &format!("a{}", "b".repeat(41)),
        ] {
            let error = validate_prefix(bad).unwrap_err();
            assert_eq!(
                error.setup_error(),
                Some(&SetupError::InvalidPrefix {
                    prefix: bad.to_owned()
                }),
                "{bad}"
            );
            assert!(
                error.to_string().contains("^[a-z_][a-z0-9_]{0,40}$"),
                "{error}"
            );
        }
    }
}
