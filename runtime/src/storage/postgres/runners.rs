//! [`RunnerStorage`] on PostgreSQL: a runner registry, shard locks held as
//! session advisory locks, ownership epochs and `NOTIFY` signals.
//!
//! # Tables (migration `0003_runners.sql`, every name prefixed)
//!
//! - `{prefix}cluster`: one row, `lock_namespace integer`, drawn at random by
//!   the migration. It is the first key of every advisory lock of this
//!   cluster, so clusters in other schemas or under other prefixes of the
//!   same database never share a lock.
//! - `{prefix}lock_keys`: an `integer` sequence, the second lock key of every
//!   runner and shard row (one sequence for both, so a runner key never
//!   equals a shard key).
//! - `{prefix}runners (runner_id text PRIMARY KEY, address text, weight
//!   integer, groups text[], lock_key integer UNIQUE, registered_at bigint)`.
//!   A row is kept after its runner dies (the id keeps its key); a runner is
//!   *live* while its key is locked.
//! - `{prefix}shards (shard_group text, shard_index bigint, epoch bigint,
//!   owner text, lock_key integer UNIQUE, acquired_at bigint, PRIMARY KEY
//!   (shard_group, shard_index))`. A row is created (epoch 0) the first time a
//!   shard is acquired. `owner` is informative (the last acquirer, NULL once
//!   released); the lock is the truth.
//! - Signals: `NOTIFY` on channel `{prefix}signals_<lock_namespace as 8 hex
//!   digits>` (channels are database-wide: the namespace keeps two clusters
//!   with one prefix in two schemas apart), sent on the pool in a
//!   transaction of its own, never inside a write transaction; payloads `m`
//!   (membership changed), `r:<group>:<index>` (messages ready), `l` (lagged).
//!
//! # Locks
//!
//! Every lock is `pg_try_advisory_lock(lock_namespace, lock_key)` (the
//! two-`int4` form, shown in `pg_locks` with `classid` = namespace, `objid` =
//! key, `objsubid` = 2), taken in *session* mode on one dedicated connection
//! per runner, opened by [`register`](RunnerStorage::register) outside the
//! pool (`application_name = 'flotilla-lock/<runner id>'`). That connection
//! holds the runner's liveness lock and every shard lock it acquires, so
//! whatever ends the session (the process dies, the connection breaks, an
//! administrator terminates the backend) frees all of them at once, and
//! [`live_runners`](RunnerStorage::live_runners), which joins the registry
//! with the granted locks of `pg_locks`, stops listing the runner at once.
//! The session sets `idle_session_timeout` to the lock timeout (a frozen or
//! partitioned runner that stops confirming loses its session, hence its
//! locks) and server-side TCP keepalives / `tcp_user_timeout` of the same
//! order (a vanished peer is noticed while a statement is in flight too).
//! `confirm` is one `SELECT 1` on that connection, bounded by the lock
//! timeout. Any failure on the lock connection (or a call on it dropped
//! half way) closes it: this value then holds nothing, and every call that
//! needs the connection fails until the runner registers again.
//! Acquisition locks exactly the wanted rows, once each (session locks are
//! re-entrant counters: a double lock would survive one unlock); shards
//! already held are not locked again.
//!
//! # Epochs and fencing
//!
//! Each acquisition runs, after the lock is granted, `UPDATE {prefix}shards
//! SET epoch = epoch + 1`, and returns the new epoch; the runner tags every
//! completion it writes for the shard with it (a [`Fence`](crate::storage::Fence)).
//! `PostgresStorage::write` reads the epochs of the fenced shards in the write
//! transaction with `SELECT .. FOR SHARE` and writes nothing for a completion
//! whose epoch is not the stored one (`CompletionOutcome::Fenced`).
//!
//! Why no stale completion can commit after a new owner starts: the new owner
//! bumps the epoch only once it holds the lock, and the bump (an `UPDATE` of
//! the shard row) must wait for the `FOR SHARE` row lock of any write
//! transaction that has already checked the old epoch. So either that write
//! commits before the bump returns — and the new owner, which scans the
//! shard's unprocessed messages only after `acquire` returns, sees it
//! processed — or the write reads the row after the bump committed (read
//! committed re-reads a row updated under it) and is fenced. The old owner
//! itself can only have written under an epoch it acquired while holding
//! the lock. `FOR SHARE`, not `FOR KEY SHARE`: the latter does not block an
//! `UPDATE` of a non-key column such as `epoch`. (Under `REPEATABLE READ` as
//! the database default, the same race ends in a serialization failure of
//! the write batch instead, which is retried: still no stale commit.)
//! A completion whose message lies in another shard than its fence names is
//! fenced too, so a caller's mistake cannot write.

mod session;
mod signals;
mod statements;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use tokio::sync::{Mutex, MutexGuard, OnceCell, mpsc};

use crate::error::StorageError;
use crate::sharding::{RunnerId, ShardId};
use crate::snowflake::now_unix_ms;
use crate::storage::{Epoch, RunnerInfo, RunnerStorage, Signal};
use session::LockSession;
use statements::RunnerStatements;

/// The most bytes PostgreSQL keeps of an `application_name`.
const APPLICATION_NAME_MAX: usize = 63;

/// Runner registry, shard locks and signals of one cluster in PostgreSQL.
///
/// Made by [`PostgresStorage::runners`](super::PostgresStorage::runners): it
/// shares the storage's pool (reads, signals), opens its lock connection with
/// the pool's connect options, and uses the same table prefix. One value
/// serves one runner.
///
/// ```no_run
/// # async fn run() -> Result<(), flotilla::StorageError> {
/// use std::time::Duration;
/// use flotilla::sharding::{RunnerId, ShardId};
/// use flotilla::storage::{PostgresStorage, RunnerInfo, RunnerStorage};
/// let storage = PostgresStorage::connect("postgres://app@db/app", "flotilla_").await?;
/// let runners = storage.runners(Duration::from_secs(10));
/// runners
///     .register(&RunnerInfo {
///         id: RunnerId::new("10.0.0.7:7100"),
///         address: "10.0.0.7:7100".parse().expect("address"),
///         weight: 1,
///         groups: Vec::new(),
///     })
///     .await?;
/// let taken = runners.acquire(&[ShardId::default_group(0)]).await?;
/// assert!(taken.len() <= 1);
/// runners.unregister().await?;
/// # Ok(()) }
/// ```
pub struct PostgresRunners {
    pool: PgPool,
    prefix: String,
    lock_timeout: Duration,
    statements: RunnerStatements,
    /// The `NOTIFY` channel, named once the cluster's namespace is read.
    channel: OnceCell<String>,
    /// The lock connection and what it holds; `None` before `register` and
    /// after any failure on it.
    session: Mutex<Option<LockSession>>,
}

impl fmt::Debug for PostgresRunners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let runner = match self.session.try_lock() {
            Ok(session) => session.as_ref().map(|s| s.runner.to_string()),
            Err(_) => Some("<busy>".to_owned()),
        };
        f.debug_struct("PostgresRunners")
            .field("prefix", &self.prefix)
            .field("lock_timeout", &self.lock_timeout)
            .field("runner", &runner)
            .finish_non_exhaustive()
    }
}

/// The error of a call that needs the lock connection when there is none.
fn not_registered() -> StorageError {
    StorageError::Io(io::Error::new(
        io::ErrorKind::NotConnected,
        "the runner holds no lock connection (not registered, or it was lost): register again",
    ))
}

/// `application_name` of a runner's lock connection, cut to what PostgreSQL keeps.
fn lock_application_name(runner: &RunnerId) -> String {
    let mut name = format!("flotilla-lock/{runner}");
    if name.len() > APPLICATION_NAME_MAX {
        let mut end = APPLICATION_NAME_MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

impl PostgresRunners {
    /// The runners of the cluster stored in `pool` under `prefix` (migrated
    /// and validated by the caller).
    pub(super) fn new(pool: PgPool, prefix: &str, lock_timeout: Duration) -> Self {
        Self {
            pool,
            prefix: prefix.to_owned(),
            lock_timeout,
            statements: RunnerStatements::new(prefix),
            channel: OnceCell::new(),
            session: Mutex::new(None),
        }
    }

    /// How long the lock session may stay silent before PostgreSQL ends it
    /// (and frees every lock of this runner).
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    fn ensure_open(&self) -> Result<(), StorageError> {
        if self.pool.is_closed() {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Milliseconds of the lock timeout, as PostgreSQL settings take them.
    fn timeout_ms(&self) -> i64 {
        i64::try_from(self.lock_timeout.as_millis())
            .unwrap_or(i64::MAX)
            .clamp(1, i64::from(i32::MAX))
    }

    /// Opens a lock connection for `runner` and applies the session settings.
    async fn open_lock_connection(&self, runner: &RunnerId) -> Result<PgConnection, StorageError> {
        let options: PgConnectOptions = self
            .pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&lock_application_name(runner));
        let mut conn = PgConnection::connect_with(&options).await?;
        let ms = self.timeout_ms();
        // Keepalives: probe after a third of the timeout, then every sixth,
        // three times; `tcp_user_timeout` bounds unacknowledged sends. (These
        // apply to TCP connections; over a Unix socket they are ignored.)
        let idle_s = (ms / 3000).max(1);
        let interval_s = (ms / 6000).max(1);
        sqlx::query(
            "SELECT set_config('idle_session_timeout', $1, false), \
                    set_config('tcp_keepalives_idle', $2, false), \
                    set_config('tcp_keepalives_interval', $3, false), \
                    set_config('tcp_keepalives_count', '3', false), \
                    set_config('tcp_user_timeout', $1, false), \
                    set_config('lock_timeout', $4, false), \
                    set_config('client_connection_check_interval', $5, false)",
        )
        .bind(ms.to_string())
        .bind(idle_s.to_string())
        .bind(interval_s.to_string())
        // A statement on the lock session never waits long for a row lock
        // (an epoch bump behind a slow write transaction fails and is
        // retried next round), and a backend left waiting by a runner that
        // gave up notices the closed socket within a second, so its locks
        // do not outlive the runner's interest in them.
        .bind((ms / 4).max(100).to_string())
        .bind((ms / 4).clamp(100, 1000).to_string())
        .execute(&mut conn)
        .await?;
        Ok(conn)
    }

    /// The `NOTIFY` channel of this cluster: `{prefix}signals_<namespace in
    /// hex>`. Channels are database-wide, so the prefix alone would let
    /// clusters of one prefix in two schemas wake each other.
    async fn channel(&self) -> Result<&str, StorageError> {
        self.channel
            .get_or_try_init(|| async {
                let namespace: i32 = sqlx::query_scalar(AssertSqlSafe(&*self.statements.namespace))
                    .fetch_one(&self.pool)
                    .await?;
                Ok::<_, StorageError>(format!("{}signals_{:08x}", self.prefix, namespace))
            })
            .await
            .map(String::as_str)
    }

    /// Sends `signal` on the pool, in a transaction of its own.
    async fn notify(&self, signal: &Signal) -> Result<(), StorageError> {
        self.ensure_open()?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(self.channel().await?)
            .bind(signals::encode(signal))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the lock session out of its slot, to be put back only if the
    /// work on it succeeds. On failure (or if the calling future is dropped
    /// half way) the session is dropped with its connection, so every lock it
    /// held is freed and none is left half tracked.
    async fn take_session(
        &self,
    ) -> Result<(MutexGuard<'_, Option<LockSession>>, LockSession), StorageError> {
        self.ensure_open()?;
        let mut guard = self.session.lock().await;
        let session = guard.take().ok_or_else(not_registered)?;
        Ok((guard, session))
    }
}

#[async_trait]
impl RunnerStorage for PostgresRunners {
    async fn register(&self, runner: &RunnerInfo) -> Result<(), StorageError> {
        self.ensure_open()?;
        let mut guard = self.session.lock().await;
        // Closing the old connection frees everything it held.
        if let Some(old) = guard.take()
            && let Err(error) = old.conn.close().await
        {
            tracing::debug!(%error, "closing the previous lock connection failed");
        }
        let mut conn = self.open_lock_connection(&runner.id).await?;
        let address = runner.address.to_string();
        // A weight past i32::MAX is clamped (no cluster comes near it).
        let weight = i32::try_from(runner.weight).unwrap_or(i32::MAX);
        let now = now_unix_ms() as i64;
        let row = sqlx::query(AssertSqlSafe(&*self.statements.upsert_runner))
            .bind(runner.id.as_str())
            .bind(&address)
            .bind(weight)
            .bind(&runner.groups)
            .bind(now)
            .fetch_one(&mut conn)
            .await?;
        let key: i32 = row.try_get(0)?;
        let namespace: i32 = row.try_get(1)?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(namespace)
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if !locked {
            if let Err(error) = conn.close().await {
                tracing::debug!(%error, "closing a refused lock connection failed");
            }
            return Err(StorageError::RunnerIdInUse(runner.id.to_string()));
        }
        sqlx::query(AssertSqlSafe(&*self.statements.update_runner))
            .bind(runner.id.as_str())
            .bind(&address)
            .bind(weight)
            .bind(&runner.groups)
            .bind(now)
            .execute(&mut conn)
            .await?;
        *guard = Some(LockSession {
            conn,
            runner: runner.id.clone(),
            namespace,
            held: HashMap::new(),
            machine_id: None,
        });
        drop(guard);
        self.notify(&Signal::MembershipChanged).await
    }

    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError> {
        self.ensure_open()?;
        let rows = sqlx::query(AssertSqlSafe(&*self.statements.live_runners))
            .fetch_all(&self.pool)
            .await?;
        let mut runners = rows
            .iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let address: String = row.try_get(1)?;
                let address: SocketAddr = address.parse().map_err(|_| {
                    StorageError::Corrupt(format!("runner {id:?} has address {address:?}"))
                })?;
                let weight: i32 = row.try_get(2)?;
                let weight = u32::try_from(weight).map_err(|_| {
                    StorageError::Corrupt(format!("runner {id:?} has weight {weight}"))
                })?;
                Ok(RunnerInfo {
                    id: RunnerId::new(id),
                    address,
                    weight,
                    groups: row.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        // Sorted here: the database's collation need not order as Rust does.
        runners.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(runners)
    }

    async fn acquire(&self, shards: &[ShardId]) -> Result<Vec<(ShardId, Epoch)>, StorageError> {
        let (mut guard, mut session) = self.take_session().await?;
        let taken = session.acquire(&self.statements, shards).await?;
        *guard = Some(session);
        Ok(taken)
    }

    async fn release(&self, shards: &[ShardId]) -> Result<(), StorageError> {
        let (mut guard, mut session) = self.take_session().await?;
        session.release(&self.statements, shards).await?;
        *guard = Some(session);
        Ok(())
    }

    async fn confirm(&self) -> Result<(), StorageError> {
        let (mut guard, mut session) = self.take_session().await?;
        let timeout = self.lock_timeout;
        match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&mut session.conn))
            .await
        {
            Ok(Ok(_)) => {
                *guard = Some(session);
                Ok(())
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(StorageError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the lock connection did not answer within {timeout:?}"),
            ))),
        }
    }

    async fn unregister(&self) -> Result<(), StorageError> {
        let mut guard = self.session.lock().await;
        let Some(mut session) = guard.take() else {
            // Not registered, or the session is gone with its locks already.
            return Ok(());
        };
        drop(guard);
        let runner = session.runner.as_str();
        // On the lock connection, while the liveness lock is still held: the
        // row of a runner that took this id over is never deleted.
        sqlx::query(AssertSqlSafe(&*self.statements.disown_all))
            .bind(runner)
            .execute(&mut session.conn)
            .await?;
        sqlx::query(AssertSqlSafe(&*self.statements.delete_runner))
            .bind(runner)
            .execute(&mut session.conn)
            .await?;
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut session.conn)
            .await?;
        session.conn.close().await?;
        if self.pool.is_closed() {
            // Shutting down with the storage already closed: the others see
            // the lock gone at their next look at the live set.
            return Ok(());
        }
        self.notify(&Signal::MembershipChanged).await
    }

    async fn lease_machine_id(&self, holder: &RunnerId) -> Result<u16, StorageError> {
        self.ensure_open()?;
        let mut guard = self.session.lock().await;
        let mut session = match guard.take() {
            Some(session) => session,
            None => {
                // A process that never registers (client-only): a session
                // of its own, holding only the lease.
                let conn = self.open_lock_connection(holder).await?;
                let mut conn = conn;
                let namespace: i32 = sqlx::query_scalar(AssertSqlSafe(&*self.statements.namespace))
                    .fetch_one(&mut conn)
                    .await?;
                LockSession {
                    conn,
                    runner: holder.clone(),
                    namespace,
                    held: HashMap::new(),
                    machine_id: None,
                }
            }
        };
        // On failure the session is dropped with its connection (and every
        // lock on it), as for the other calls.
        let id = session.lease_machine_id().await?;
        *guard = Some(session);
        Ok(id)
    }

    async fn signal(&self, signal: Signal) -> Result<(), StorageError> {
        self.notify(&signal).await
    }

    async fn listen(&self) -> Result<mpsc::Receiver<Signal>, StorageError> {
        self.ensure_open()?;
        signals::listen(&self.pool, self.channel().await?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_fit_postgres_and_stay_utf8() {
        assert_eq!(
            lock_application_name(&RunnerId::new("10.0.0.7:7100")),
            "flotilla-lock/10.0.0.7:7100"
        );
        let long = lock_application_name(&RunnerId::new("é".repeat(40)));
        assert!(long.len() <= APPLICATION_NAME_MAX);
        assert!(long.starts_with("flotilla-lock/é"));
        assert_eq!(long.len(), 62, "cut at a char boundary");
    }
}
