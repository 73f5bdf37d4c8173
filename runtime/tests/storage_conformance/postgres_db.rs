//! A fresh PostgreSQL schema per test, dropped when the test ends.
//!
//! Tests read `FLOTILLA_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). An unreachable database
//! fails the test with a message saying how to start one: these tests never
//! skip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla::storage::PostgresStorage;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

/// The database the tests use.
pub(crate) fn database_url() -> String {
    std::env::var("FLOTILLA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// An administrative connection, or a panic that says how to get PostgreSQL up.
async fn admin() -> PgConnection {
    let url = database_url();
    match PgConnection::connect(&url).await {
        Ok(conn) => conn,
        Err(error) => panic!(
            "PostgreSQL is not reachable at {url}: {error}. The PostgreSQL tests need a \
             server: run `scripts/test` (it starts one), or start it with \
             `pg_ctlcluster --skip-systemctl-redirect <version> main start` (version from \
             `ls /etc/postgresql`), or point FLOTILLA_TEST_DATABASE_URL at one"
        ),
    }
}

/// A schema of one test. Dropping it drops the schema and everything in it,
/// also when the test panics.
#[derive(Debug)]
pub(crate) struct TestSchema {
    name: String,
}

impl TestSchema {
    /// Creates a schema with a name no other test uses.
    pub(crate) async fn create() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "flotilla_t_{}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = admin().await;
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test schema");
        conn.close().await.expect("close admin connection");
        Self { name }
    }

    /// The schema's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A pool whose connections see this schema first (`search_path`).
    pub(crate) async fn pool(&self, max_connections: u32) -> PgPool {
        let options: PgConnectOptions = database_url().parse().expect("database url");
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(
                options
                    .options([("search_path", self.name.as_str())])
                    // Lets a test find its own sessions in `pg_stat_activity`.
                    .application_name(&self.name),
            )
            .await
            .expect("pool on the test schema")
    }

    /// Postgres storage with `prefix` in this schema.
    pub(crate) async fn storage(&self, prefix: &str) -> PostgresStorage {
        PostgresStorage::from_pool(self.pool(4).await, prefix)
            .await
            .expect("PostgreSQL storage on the test schema")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop runs outside any async context we could await in (and maybe
        // during a panic): a thread of its own with a runtime of its own.
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        type BoxError = Box<dyn std::error::Error + Send + Sync>;
        let dropped = std::thread::spawn(move || -> Result<(), BoxError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let options: PgConnectOptions = database_url().parse()?;
                let mut conn = options.connect().await?;
                // A session left holding a lock on the schema must not hang
                // the test run: report it instead.
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
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}
