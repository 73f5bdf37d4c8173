//! SQLite storage: the embedded default, one runner per database file.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a write that returned
//! `Ok` is in the WAL on disk and survives a crash of the process or the
//! machine. Flotilla's tables are created by its own migrations
//! (`migrations/sqlite`), recorded in `flotilla_migrations`, apart from the
//! application's `_sqlx_migrations`.

mod sql;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};

use super::{
    MessageId, MessageStorage, ShardFilter, StoredMessage, StoredReply, UnixMillis,
    UnprocessedQuery, WriteBatch, WriteOutcome,
};
use crate::error::StorageError;
use write::BatchError;

/// How long a statement waits for a lock held by another connection (an
/// application's own connection to the same file, a backup) before it fails
/// with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections. WAL lets readers run beside the writer and each other;
/// delivery scans, reply look-ups and state loads rarely overlap more than
/// this, and each sqlx SQLite connection is one OS thread.
const READERS: u32 = 4;

/// Stores messages, replies and entity state in one SQLite file.
///
/// Only one `SqliteStorage` may have a file open at a time: [`open`](Self::open)
/// takes an exclusive lock on `<path>.lock` and fails with
/// [`StorageError::InUse`] while another holds it. The operating system drops
/// the lock when the process ends, however it ends, so a restart after a
/// crash never waits for a lease to expire.
///
/// ```no_run
/// # async fn run() -> Result<(), flotilla::StorageError> {
/// use flotilla::storage::{MessageStorage, SqliteStorage};
/// let storage = SqliteStorage::open("data/flotilla.db").await?;
/// assert_eq!(storage.load_state("Account", "acct-42").await?, None);
/// storage.close().await;
/// # Ok(()) }
/// ```
pub struct SqliteStorage {
    path: PathBuf,
    closed: AtomicBool,
    /// The one connection that writes. The runtime funnels every write through
    /// one group-commit task, so a second writer would only wait on SQLite's
    /// file lock (or fail with `SQLITE_BUSY`); a mutex makes the wait cheap and
    /// keeps the writer's prepared statements warm. `None` once closed.
    writer: tokio::sync::Mutex<Option<Writer>>,
    /// Read-only connections for queries, so a delivery scan never waits
    /// behind a group commit.
    readers: SqlitePool,
    /// The runner lock on `<path>.lock`, held until `close` or drop.
    lock: std::sync::Mutex<Option<File>>,
}

/// The writer connection and whether a transaction of ours is open on it.
///
/// Transactions are begun and ended with plain statements rather than
/// sqlx's `Transaction`: a staged effect can end the transaction itself
/// (`INSERT OR ROLLBACK`, a trigger's `RAISE(ROLLBACK, ..)`), after which
/// sqlx's own bookkeeping would refuse every later `BEGIN` on the connection.
struct Writer {
    conn: SqliteConnection,
    /// Set by `BEGIN`, cleared by `COMMIT`/`ROLLBACK`. Still set on entry
    /// when a write was cancelled half way: the next use rolls it back.
    in_transaction: bool,
}

impl Writer {
    async fn begin(&mut self) -> Result<(), StorageError> {
        self.end_abandoned().await;
        // Set before the `BEGIN` is sent: a write cancelled while it waits
        // leaves a transaction open in the worker, and a `ROLLBACK` when
        // there is none is harmless.
        self.in_transaction = true;
        sqlx::query(sql::BEGIN_IMMEDIATE)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StorageError> {
        match sqlx::query(sql::COMMIT).execute(&mut self.conn).await {
            Ok(_) => {
                self.in_transaction = false;
                Ok(())
            }
            Err(error) => {
                self.rollback().await;
                Err(error.into())
            }
        }
    }

    /// Rolls back whatever is open. Fails only when nothing is (the
    /// transaction ended itself), which is what a rollback wants.
    async fn rollback(&mut self) {
        if let Err(error) = sqlx::query(sql::ROLLBACK).execute(&mut self.conn).await {
            tracing::debug!(%error, "rollback found no transaction to end");
        }
        self.in_transaction = false;
    }

    async fn end_abandoned(&mut self) {
        if self.in_transaction {
            tracing::debug!("rolling back the transaction of a cancelled write");
            self.rollback().await;
        }
    }
}

impl fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStorage")
            .field("path", &self.path)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqliteStorage {
    /// Opens (creating if missing) the database at `path`, takes the runner
    /// lock and applies Flotilla's migrations.
    ///
    /// Fails with [`StorageError::InUse`] when another runner has the file open.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str() == ":memory:" {
            // SQLite would give every connection its own empty database.
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "SQLite storage needs a file; for storage in memory use MemoryStorage \
                 (`Cluster::builder().memory()`)",
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // The lock comes first: a second runner must not even migrate.
        let lock = take_runner_lock(&path)?;

        let writer_options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let mut writer = writer_options.connect().await?;
        let mut migrator = sqlx::migrate!("../migrations/sqlite");
        migrator.dangerous_set_table_name("flotilla_migrations");
        migrator.run(&mut writer).await?;

        // Readers open after the writer has put the file in WAL mode (a
        // persistent property of the file). Pool defaults suit a server pool,
        // not a local file: no ping before each use, no recycling.
        let reader_options = SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT);
        let readers = SqlitePoolOptions::new()
            .max_connections(READERS)
            .min_connections(1)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(reader_options)
            .await?;

        Ok(Self {
            path,
            closed: AtomicBool::new(false),
            writer: tokio::sync::Mutex::new(Some(Writer {
                conn: writer,
                in_transaction: false,
            })),
            readers,
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ensure_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Maps the error of a reader whose pool closed under it to `Closed`.
    fn read_error(&self, error: sqlx::Error) -> StorageError {
        match error {
            sqlx::Error::PoolClosed => StorageError::Closed,
            other if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(error = %other, "read failed while closing");
                StorageError::Closed
            }
            other => other.into(),
        }
    }
}

/// Takes the exclusive lock on `<path>.lock`.
///
/// The lock file is never deleted: removing it while another process waits
/// to lock it would let two processes hold "the" lock on two different files.
fn take_runner_lock(path: &Path) -> Result<File, StorageError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::InUse(format!(
            "{} is locked: another process runs a Flotilla runner on this database \
             (stop it, or give this runner its own database file)",
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

#[async_trait]
impl MessageStorage for SqliteStorage {
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError> {
        self.ensure_open()?;
        if batch.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let mut writer = self.writer.lock().await;
        let writer = writer.as_mut().ok_or(StorageError::Closed)?;
        let mut voided = HashMap::new();
        loop {
            writer.begin().await?;
            match write::write_batch(&mut writer.conn, &batch, &voided).await {
                Ok(outcome) => {
                    writer.commit().await?;
                    return Ok(outcome);
                }
                Err(BatchError::Storage(error)) => {
                    writer.rollback().await;
                    return Err(error);
                }
                // Bounded: each round takes the effects of one more
                // completion out of the batch.
                Err(BatchError::Voided { message, reason }) => {
                    writer.rollback().await;
                    if voided.insert(message, reason).is_some() {
                        return Err(StorageError::Corrupt(format!(
                            "the completion of message {message} voided its batch twice"
                        )));
                    }
                }
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
                sqlx::query(sql::SELECT_UNPROCESSED)
                    .bind(query.ready_at)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.readers)
                    .await
            }
            ShardFilter::Only(shards) => {
                sqlx::query(sql::SELECT_UNPROCESSED_IN)
                    .bind(query.ready_at)
                    .bind(after)
                    .bind(sql::shard_list(shards))
                    .bind(limit)
                    .fetch_all(&self.readers)
                    .await
            }
        }
        .map_err(|e| self.read_error(e))?;
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
                sqlx::query_scalar(sql::NEXT_DELIVERY)
                    .bind(after)
                    .fetch_one(&self.readers)
                    .await
            }
            ShardFilter::Only(shards) => {
                sqlx::query_scalar(sql::NEXT_DELIVERY_IN)
                    .bind(after)
                    .bind(sql::shard_list(shards))
                    .fetch_one(&self.readers)
                    .await
            }
        }
        .map_err(|e| self.read_error(e))
    }

    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError> {
        self.ensure_open()?;
        let reply: Option<Option<Vec<u8>>> = sqlx::query_scalar(sql::SELECT_REPLY)
            .bind(id.0)
            .fetch_optional(&self.readers)
            .await
            .map_err(|e| self.read_error(e))?;
        sql::decode_reply(reply.flatten())
    }

    async fn load_state(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.ensure_open()?;
        sqlx::query_scalar(sql::SELECT_STATE)
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(&self.readers)
            .await
            .map_err(|e| self.read_error(e))
    }

    async fn purge_processed(&self, processed_before: UnixMillis) -> Result<u64, StorageError> {
        let mut purged = 0;
        loop {
            self.ensure_open()?;
            // The writer is taken per chunk, so group commits interleave with
            // a long purge instead of waiting for all of it.
            let mut writer = self.writer.lock().await;
            let writer = writer.as_mut().ok_or(StorageError::Closed)?;
            writer.end_abandoned().await;
            let deleted = sqlx::query(sql::PURGE_PROCESSED)
                .bind(processed_before)
                .bind(sql::PURGE_CHUNK)
                .execute(&mut writer.conn)
                .await?
                .rows_affected();
            purged += deleted;
            if deleted < sql::PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Waits for reads in flight, then for the write in flight (it holds
        // the writer), so nothing is cut off half way.
        self.readers.close().await;
        if let Some(writer) = self.writer.lock().await.take()
            && let Err(error) = writer.conn.close().await
        {
            tracing::warn!(%error, path = %self.path.display(), "closing the SQLite writer failed");
        }
        let lock = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(file) = lock
            && let Err(error) = file.unlock()
        {
            // Dropping the file below releases the lock all the same.
            tracing::warn!(%error, "unlocking the runner lock failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{AssertSqlSafe, Row};

    use super::*;

    /// SQLite's plan for `query`, one detail line per step.
    async fn plan(storage: &SqliteStorage, query: &str, params: usize) -> String {
        let mut explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")));
        for _ in 0..params {
            explain = explain.bind(0_i64);
        }
        let rows = explain.fetch_all(&storage.readers).await.unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn scans_use_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(dir.path().join("plan.db"))
            .await
            .unwrap();
        let unprocessed = plan(&storage, sql::SELECT_UNPROCESSED, 3).await;
        assert!(
            unprocessed.contains("flotilla_messages_unprocessed"),
            "{unprocessed}"
        );
        let next = plan(&storage, sql::NEXT_DELIVERY, 1).await;
        assert!(next.contains("flotilla_messages_deliver_at"), "{next}");
        let purge = plan(&storage, sql::PURGE_PROCESSED, 2).await;
        assert!(purge.contains("flotilla_messages_processed_at"), "{purge}");
        storage.close().await;
    }
}
