//! # Flotilla cluster tests
//!
//! A harness that runs real runner processes (`flotilla-test-node`, this
//! crate's binary) on loopback ports against a fresh PostgreSQL schema, and
//! the entities they serve. The scenarios in `tests/scenarios.rs` use it; so
//! can benchmarks.
//!
//! - [`TestCluster`] creates the schema (and its audit table), starts N
//!   runners with short failover settings, hands out an in-process
//!   client-only [`Cluster`](flotilla::Cluster), and reads `{prefix}shards`
//!   to wait for ownership to settle or move.
//! - [`Runner`] is one process: SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart,
//!   its stdout lines and its stderr log (printed when a test fails).
//! - [`Probe`] is the test entity: a volatile `whereami` and a persisted,
//!   deduplicated `record` that writes one [`AuditRow`] in its completion
//!   transaction (the audit table has no unique key, so duplicates count).
//!
//! Tests share PostgreSQL and a small machine: each holds [`exclusive`] for
//! its whole run so they run one at a time.
//!
//! Running them: `cargo test -p flotilla-cluster-tests -- --nocapture`
//! (PostgreSQL at `FLOTILLA_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `--nocapture` shows the
//! failover times the scenarios print). Runners log to stderr files at the
//! level of `RUST_LOG` (default `info`; try `info,flotilla=debug`); when a
//! test fails, the tail of every runner's log is printed and the log
//! directory kept.
//!
//! ```no_run
//! use flotilla_cluster_tests::{exclusive, ClusterSettings, TestCluster, Work};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let _one_at_a_time = exclusive().await;
//! let cluster = TestCluster::start("target/debug/flotilla-test-node", ClusterSettings::with_runners(2)).await?;
//! let client = cluster.client().await?;
//! let receipt = client.client::<flotilla_cluster_tests::Probe>("e-1").record("k-1".into(), Work::QUICK).await?;
//! assert_eq!(cluster.audit_counts().await?.get("k-1"), Some(&1));
//! # drop(receipt); Ok(()) }
//! ```

#![warn(missing_docs)]

mod cluster;
mod db;
mod entities;
mod error;
mod runner;
mod singletons;

use std::time::Duration;

pub use cluster::{AUDIT_TABLE, ClusterSettings, TEST_PREFIX, TEST_SECRET, TestCluster};
pub use db::{AuditRow, DATABASE_URL_ENV, ShardRow, TestDb, database_url};
pub use entities::{
    AUDIT_TABLE_ENV, Placement, Probe, ProbeClient, ProbeError, Receipt, Stranger, StrangerClient,
    Work, audit_table_ddl, is_identifier, unix_micros,
};
pub use error::HarnessError;
pub use runner::{PARENT_WATCH_ENV, Runner, RunnerSpec, process_state};
pub use singletons::{
    CLOCK_OFFSET_ENV, COUNTER_ROW, OffsetClock, SINGLETONS_ENV, TICKER_ROW, TestCounter,
    TestTicker, test_counter, test_ticker,
};

/// Held by a test for its whole run, so cluster tests run one at a time
/// (they share PostgreSQL and the machine's cores).
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other cluster test of this process runs, and keeps the
/// others out until the guard is dropped. A panicking test releases it too.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

/// Runs `future`, or fails with [`HarnessError::Timeout`] naming `what`
/// after `limit` (so a hung test fails instead of hanging the suite).
pub async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = T>,
) -> Result<T, HarnessError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| HarnessError::Timeout {
            what: what.to_owned(),
            after: limit,
        })
}
