//! A fresh PostgreSQL schema per test, and the queries the tests make on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, Row};

use crate::HarnessError;
use crate::entities::{audit_table_ddl, is_identifier};

/// The variable naming the test database (default
/// `postgres://postgres@127.0.0.1:5432/postgres`).
pub const DATABASE_URL_ENV: &str = "FLOTILLA_TEST_DATABASE_URL";

/// The test database's URL.
pub fn database_url() -> String {
    std::env::var(DATABASE_URL_ENV)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn db_error(source: sqlx::Error) -> HarnessError {
    HarnessError::Database {
        url: database_url(),
        source,
    }
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// The message's primary key.
    pub msg_key: String,
    /// The entity id.
    pub entity_id: String,
    /// The runner whose completion committed the row.
    pub runner_id: String,
    /// The entity's shard index.
    pub shard_index: i64,
    /// The epoch the handler saw.
    pub epoch: Option<i64>,
    /// The persisted message's id.
    pub message_id: Option<i64>,
    /// Handler start, runner clock, Unix microseconds.
    pub started_at: i64,
    /// Row insertion (just before the commit), PostgreSQL clock, Unix microseconds.
    pub inserted_at: i64,
}

/// Who owns a shard, as `{prefix}shards` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRow {
    /// The owner's runner id; `None` after a graceful release.
    pub owner: Option<String>,
    /// The ownership epoch (bumped by every acquisition).
    pub epoch: i64,
}

/// A schema of one test; `search_path` of every connection made through
/// [`url`](Self::url) or [`pool`](Self::pool) points at it. Dropping it drops
/// the schema and everything in it, also when the test panics.
#[derive(Debug)]
pub struct TestDb {
    schema: String,
    pool: PgPool,
}

impl TestDb {
    /// Creates a schema with a name no other test uses, with the audit table
    /// `audit_table` in it.
    pub async fn create(audit_table: &str) -> Result<Self, HarnessError> {
        if !is_identifier(audit_table) {
            return Err(HarnessError::Invalid(format!(
                "audit table name {audit_table:?} is not a plain identifier"
            )));
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let schema = format!(
            "flotilla_ct_{}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::connect(&database_url())
            .await
            .map_err(db_error)?;
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut admin)
            .await
            .map_err(db_error)?;
        let _ = admin.close().await;
        let options: PgConnectOptions = database_url().parse().map_err(db_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(
                options
                    .options([("search_path", schema.as_str())])
                    .application_name(&schema),
            )
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                drop_schema(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                return Err(db_error(e));
            }
        };
        // From here on, dropping `db` drops the schema on every error path.
        let db = Self { schema, pool };
        sqlx::query(AssertSqlSafe(audit_table_ddl(audit_table)))
            .execute(&db.pool)
            .await
            .map_err(db_error)?;
        Ok(db)
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The database URL with `search_path` set to this schema (for runners).
    pub fn url(&self) -> String {
        let base = database_url();
        let separator = if base.contains('?') { '&' } else { '?' };
        format!(
            "{base}{separator}options=-c%20search_path%3D{}",
            self.schema
        )
    }

    /// A pool whose connections see this schema first.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Every audit row, in insertion order.
    pub async fn audit_rows(&self, table: &str) -> Result<Vec<AuditRow>, HarnessError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT msg_key, entity_id, runner_id, shard_index, epoch, message_id, \
             started_at, inserted_at FROM {table} ORDER BY inserted_at"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    msg_key: r.try_get(0)?,
                    entity_id: r.try_get(1)?,
                    runner_id: r.try_get(2)?,
                    shard_index: r.try_get(3)?,
                    epoch: r.try_get(4)?,
                    message_id: r.try_get(5)?,
                    started_at: r.try_get(6)?,
                    inserted_at: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db_error)
    }

    /// How many audit rows each key has (keys with none are absent).
    pub async fn audit_counts(&self, table: &str) -> Result<BTreeMap<String, usize>, HarnessError> {
        let mut counts = BTreeMap::new();
        for row in self.audit_rows(table).await? {
            *counts.entry(row.msg_key).or_default() += 1;
        }
        Ok(counts)
    }

    /// The rows of `{prefix}shards` for the default group, by shard index.
    pub async fn shards(&self, prefix: &str) -> Result<BTreeMap<u32, ShardRow>, HarnessError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT shard_index, owner, epoch FROM {prefix}shards WHERE shard_group = 'default'"
        )))
        .fetch_all(&self.pool)
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            // No runner has migrated yet: no table, no owner.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                return Ok(BTreeMap::new());
            }
            Err(e) => return Err(db_error(e)),
        };
        rows.iter()
            .map(|r| {
                let index: i64 = r.try_get(0)?;
                Ok((
                    u32::try_from(index).unwrap_or(u32::MAX),
                    ShardRow {
                        owner: r.try_get(1)?,
                        epoch: r.try_get(2)?,
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db_error)
    }

    /// The registered runners of `{prefix}runners`: id → transport address.
    pub async fn runner_addresses(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, String>, HarnessError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT runner_id, address FROM {prefix}runners"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db_error)
    }

    /// Persisted messages not yet processed, in `{prefix}messages`.
    pub async fn unprocessed(&self, prefix: &str) -> Result<i64, HarnessError> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {prefix}messages WHERE processed_at IS NULL"
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }

    /// The backend pid of runner `runner_id`'s lock connection (found by its
    /// `application_name`, `flotilla-lock/<runner_id>`), if it has one.
    pub async fn lock_backend(&self, runner_id: &str) -> Result<Option<i32>, HarnessError> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND datname = current_database()",
        )
        .bind(format!("flotilla-lock/{runner_id}"))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)
    }

    /// Terminates backend `pid` (`pg_terminate_backend`); true if it existed.
    pub async fn terminate_backend(&self, pid: i32) -> Result<bool, HarnessError> {
        sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }

    /// PostgreSQL's clock now, in Unix microseconds (the clock of
    /// [`AuditRow::inserted_at`]).
    pub async fn now_micros(&self) -> Result<i64, HarnessError> {
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }

    /// Polls `check` every 50 ms until it returns `Some`, or fails after
    /// `timeout` with `what` and the last state `describe` gave.
    pub async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<T, HarnessError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<T, String>, HarnessError>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check().await? {
                Ok(value) => return Ok(value),
                Err(state) => state,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{what} (last seen: {last})"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_schema(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// Runs `sql` on a connection of its own, on a thread with a runtime of its
/// own: `Drop` cannot await, and may run during a panic.
fn drop_schema(sql: String) {
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let what = sql.clone();
    let dropped = std::thread::spawn(move || -> Result<(), BoxError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let options: PgConnectOptions = database_url().parse()?;
            let mut conn = options.connect().await?;
            // A session left holding a lock in the schema must not hang the
            // test run: report it instead.
            sqlx::query("SET lock_timeout = '10s'")
                .execute(&mut conn)
                .await?;
            sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
            conn.close().await?;
            Ok::<_, BoxError>(())
        })
    })
    .join();
    if !matches!(dropped, Ok(Ok(()))) {
        eprintln!("cluster tests: `{what}` failed: {dropped:?}");
    }
}
