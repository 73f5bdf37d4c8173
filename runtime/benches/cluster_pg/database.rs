//! The bench's own PostgreSQL schema: created fresh, dropped at the end
//! (also when the bench panics), and the commit latency of the server.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

use crate::cpu::cpu_ns;

/// The server the bench runs on.
fn base_url() -> String {
    std::env::var("FLOTILLA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn connect(url: &str) -> PgConnection {
    match PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(error) => panic!(
            "PostgreSQL is not reachable at {url}: {error}. Start it (`scripts/test` does), \
             or point FLOTILLA_TEST_DATABASE_URL at one"
        ),
    }
}

/// A schema of one bench run; every runner's connections see it first.
pub(crate) struct BenchDatabase {
    schema: String,
    url: String,
}

impl BenchDatabase {
    /// Creates a schema no other run uses.
    pub(crate) async fn create() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let schema = format!(
            "flotilla_bench_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        );
        let base = base_url();
        let mut conn = connect(&base).await;
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create the bench schema");
        conn.close().await.expect("close");
        // `options=-c search_path=<schema>`: every connection of every runner
        // (pools, lock sessions, listeners) works in the schema; the
        // application name finds their backends (lock sessions name
        // themselves).
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!(
            "{base}{separator}options=-c%20search_path%3D{schema}&application_name={schema}"
        );
        Self { schema, url }
    }

    /// The URL runners connect with (`search_path` set to the schema).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The `application_name` of the runners' connections (the schema's name).
    pub(crate) fn application_name(&self) -> &str {
        &self.schema
    }

    /// Times `rounds` commits of one single-row `INSERT` each, and names the
    /// server's durability settings: the persisted figures move with them.
    pub(crate) async fn commit_latency(&self, rounds: usize) -> String {
        let mut conn = connect(&self.url).await;
        sqlx::query("CREATE TABLE commit_probe (n bigint NOT NULL)")
            .execute(&mut conn)
            .await
            .expect("create the probe table");
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .expect("backend pid");
        let backend = u32::try_from(backend).unwrap_or(0);
        let cpu_before = cpu_ns(backend);
        let mut commits = Vec::with_capacity(rounds);
        for n in 0..rounds {
            let t = Instant::now();
            sqlx::query("INSERT INTO commit_probe (n) VALUES ($1)")
                .bind(n as i64)
                .execute(&mut conn)
                .await
                .expect("probe insert");
            commits.push(t.elapsed().as_secs_f64() * 1_000.0);
        }
        let cpu = match (cpu_before, cpu_ns(backend)) {
            (Some(before), Some(after)) => format!(
                ", backend CPU {:.0} us per commit",
                after.saturating_sub(before) as f64 / 1e3 / rounds as f64
            ),
            _ => String::new(),
        };
        let mut round_trips = Vec::with_capacity(rounds);
        for n in 0..rounds {
            let t = Instant::now();
            sqlx::query("SELECT $1::bigint")
                .bind(n as i64)
                .execute(&mut conn)
                .await
                .expect("probe select");
            round_trips.push(t.elapsed().as_secs_f64() * 1_000.0);
        }
        let at = |samples: &mut Vec<f64>, q: f64| {
            samples.sort_by(f64::total_cmp);
            samples[((samples.len() - 1) as f64 * q) as usize]
        };
        let fsync = show(&mut conn, "fsync").await;
        let synchronous_commit = show(&mut conn, "synchronous_commit").await;
        let version = show(&mut conn, "server_version").await;
        conn.close().await.expect("close");
        format!(
            "PostgreSQL {version}: commit of a single-row INSERT p50 {:.3} ms, p99 {:.3} ms{cpu}; \
             round trip (SELECT) p50 {:.3} ms ({rounds} each); fsync={fsync}, \
             synchronous_commit={synchronous_commit} (persisted figures move with these)",
            at(&mut commits, 0.5),
            at(&mut commits, 0.99),
            at(&mut round_trips, 0.5),
        )
    }
}

/// The value of the server setting `name`.
async fn show(conn: &mut PgConnection, name: &str) -> String {
    sqlx::query_scalar(AssertSqlSafe(format!("SHOW {name}")))
        .fetch_one(conn)
        .await
        .expect("SHOW a setting")
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        // Drop may run during a panic, outside any runtime we could await
        // in: a thread with a runtime of its own.
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        let url = base_url();
        type BoxError = Box<dyn std::error::Error + Send + Sync>;
        let dropped = std::thread::spawn(move || -> Result<(), BoxError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let options: PgConnectOptions = url.parse()?;
                let mut conn = options.connect().await?;
                // A runner session left over must not hang the bench.
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
            eprintln!("could not drop bench schema {}: {dropped:?}", self.schema);
        }
    }
}
