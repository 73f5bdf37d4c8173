//! A test cluster: a fresh schema, N runner processes, and an in-process
//! client.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla::ClusterBuilder;
use flotilla::prelude::*;
use flotilla::transport::ClusterSecret;

use crate::HarnessError;
use crate::db::{AuditRow, TestDb};
use crate::entities::AUDIT_TABLE_ENV;
use crate::runner::{Runner, RunnerSpec};

/// The shared secret of every test cluster (tests only).
pub const TEST_SECRET: &str = "flotilla-cluster-tests-secret-0123456789";

/// The table prefix of every test cluster (each has a schema of its own).
pub const TEST_PREFIX: &str = "ct_";

/// The audit table of every test cluster.
pub const AUDIT_TABLE: &str = "audit";

/// How a test cluster is set up. The defaults are short, so failover is
/// quick: 32 shards, fence after 1 s, lock timeout 2 s, membership poll 100 ms.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterSettings {
    /// Runner processes started at once.
    pub runners: usize,
    /// Shards (`FLOTILLA_SHARDS`).
    pub shards: u32,
    /// `FLOTILLA_FENCE_AFTER`.
    pub fence_after: Duration,
    /// `FLOTILLA_LOCK_TIMEOUT`.
    pub lock_timeout: Duration,
    /// `FLOTILLA_MEMBERSHIP_POLL`.
    pub membership_poll: Duration,
    /// `FLOTILLA_SAFETY_POLL`.
    pub safety_poll: Duration,
    /// `FLOTILLA_CALL_TIMEOUT`, of runners and of the client.
    pub call_timeout: Duration,
    /// `FLOTILLA_SHUTDOWN_TIMEOUT`.
    pub shutdown_timeout: Duration,
    /// More variables for every runner (they win over the ones above).
    pub extra_env: Vec<(String, String)>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            runners: 2,
            shards: 32,
            fence_after: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(2),
            membership_poll: Duration::from_millis(100),
            safety_poll: Duration::from_millis(500),
            call_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            extra_env: Vec::new(),
        }
    }
}

impl ClusterSettings {
    /// The defaults with `runners` runner processes.
    pub fn with_runners(runners: usize) -> Self {
        Self {
            runners,
            ..Self::default()
        }
    }
}

/// A cluster of `flotilla-test-node` processes on a schema of its own.
///
/// Dropping it kills every runner, then drops the schema. If the test is
/// panicking, the tail of every runner's log is printed and the log
/// directory kept.
#[derive(Debug)]
pub struct TestCluster {
    // Field order is drop order: processes first, then the schema.
    runners: Vec<Runner>,
    logs: Option<tempfile::TempDir>,
    db: TestDb,
    settings: ClusterSettings,
    binary: PathBuf,
    tag: String,
    /// Runners started so far (the next one's index).
    started: usize,
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl TestCluster {
    /// Creates the schema and the audit table, starts `settings.runners`
    /// runners of `binary` (the `flotilla-test-node` executable) and waits
    /// until each is ready.
    pub async fn start(
        binary: impl Into<PathBuf>,
        settings: ClusterSettings,
    ) -> Result<Self, HarnessError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let db = TestDb::create(AUDIT_TABLE).await?;
        let logs = tempfile::Builder::new()
            .prefix("flotilla-cluster-test-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                what: "create the log directory",
                source,
            })?;
        let mut cluster = Self {
            runners: Vec::new(),
            logs: Some(logs),
            db,
            tag: format!(
                "{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            settings,
            binary: binary.into(),
            started: 0,
        };
        let mut starting = Vec::new();
        for _ in 0..cluster.settings.runners {
            starting.push(Runner::spawn_only(cluster.next_spec())?);
        }
        for runner in &mut starting {
            runner.wait_ready().await?;
        }
        cluster.runners = starting;
        Ok(cluster)
    }

    fn next_spec(&mut self) -> RunnerSpec {
        let index = self.started;
        self.started += 1;
        let id = format!("r{index}-{}", self.tag);
        let s = &self.settings;
        let mut env: Vec<(String, String)> = vec![
            ("FLOTILLA_STORAGE".into(), self.db.url()),
            ("FLOTILLA_TABLE_PREFIX".into(), TEST_PREFIX.into()),
            ("FLOTILLA_LISTEN".into(), "127.0.0.1:0".into()),
            ("FLOTILLA_SECRET".into(), TEST_SECRET.into()),
            ("FLOTILLA_SHARDS".into(), s.shards.to_string()),
            ("FLOTILLA_FENCE_AFTER".into(), millis(s.fence_after)),
            ("FLOTILLA_LOCK_TIMEOUT".into(), millis(s.lock_timeout)),
            ("FLOTILLA_MEMBERSHIP_POLL".into(), millis(s.membership_poll)),
            ("FLOTILLA_SAFETY_POLL".into(), millis(s.safety_poll)),
            ("FLOTILLA_CALL_TIMEOUT".into(), millis(s.call_timeout)),
            (
                "FLOTILLA_SHUTDOWN_TIMEOUT".into(),
                millis(s.shutdown_timeout),
            ),
            (AUDIT_TABLE_ENV.into(), AUDIT_TABLE.into()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        env.extend(s.extra_env.iter().cloned());
        let log = self
            .logs
            .as_ref()
            .map(|d| d.path().join(format!("{id}.log")))
            .unwrap_or_else(|| PathBuf::from(format!("{id}.log")));
        RunnerSpec {
            id,
            binary: self.binary.clone(),
            env,
            log,
        }
    }

    /// Starts one more runner and waits until it is ready; returns its index.
    pub async fn add_runner(&mut self) -> Result<usize, HarnessError> {
        let runner = Runner::start(self.next_spec()).await?;
        self.runners.push(runner);
        Ok(self.runners.len() - 1)
    }

    /// Runner `index` (in start order).
    ///
    /// # Panics
    /// If there is no such runner (a test bug).
    pub fn runner(&self, index: usize) -> &Runner {
        &self.runners[index]
    }

    /// Runner `index`, to signal or restart it.
    ///
    /// # Panics
    /// If there is no such runner (a test bug).
    pub fn runner_mut(&mut self, index: usize) -> &mut Runner {
        &mut self.runners[index]
    }

    /// Every runner, in start order.
    pub fn runners(&self) -> &[Runner] {
        &self.runners
    }

    /// Every runner, mutably.
    pub fn runners_mut(&mut self) -> &mut [Runner] {
        &mut self.runners
    }

    /// The ids of every runner, in start order.
    pub fn runner_ids(&self) -> Vec<String> {
        self.runners.iter().map(|r| r.id().to_owned()).collect()
    }

    /// The schema and its queries.
    pub fn db(&self) -> &TestDb {
        &self.db
    }

    /// The settings the runners were started with.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// A builder for an in-process client-only cluster on this schema (no
    /// entity registered yet).
    pub fn client_builder(&self) -> Result<ClusterBuilder, HarnessError> {
        let secret = ClusterSecret::new(TEST_SECRET)
            .map_err(|e| HarnessError::Invalid(format!("test secret: {e}")))?;
        let s = &self.settings;
        Ok(Cluster::builder()
            .postgres(self.db.url())
            .table_prefix(TEST_PREFIX)
            .secret(secret)
            .client_only()
            .shards(s.shards)
            .fence_after(s.fence_after)
            .lock_timeout(s.lock_timeout)
            .membership_poll(s.membership_poll)
            .safety_poll(s.safety_poll)
            .call_timeout(s.call_timeout))
    }

    /// An in-process client-only cluster on this schema, with
    /// [`Probe`](crate::Probe) registered.
    pub async fn client(&self) -> Result<Cluster, HarnessError> {
        self.client_builder()?
            .register::<crate::Probe>()
            .start()
            .await
            .map_err(|e| HarnessError::Invalid(format!("the client did not start: {e}")))
    }

    /// Every audit row, in insertion order.
    pub async fn audit_rows(&self) -> Result<Vec<AuditRow>, HarnessError> {
        self.db.audit_rows(AUDIT_TABLE).await
    }

    /// Audit rows per key.
    pub async fn audit_counts(&self) -> Result<BTreeMap<String, usize>, HarnessError> {
        self.db.audit_counts(AUDIT_TABLE).await
    }

    /// Shard index → owner, for shards whose owner is set.
    pub async fn owners(&self) -> Result<BTreeMap<u32, String>, HarnessError> {
        Ok(self
            .db
            .shards(TEST_PREFIX)
            .await?
            .into_iter()
            .filter_map(|(index, row)| row.owner.map(|owner| (index, owner)))
            .collect())
    }

    /// Waits until every shard has an owner among `runner_ids`, each of
    /// them owns at least one, and the map held still for three polls
    /// (100 ms apart); returns it.
    pub async fn wait_balanced(
        &self,
        runner_ids: &[String],
        timeout: Duration,
    ) -> Result<BTreeMap<u32, String>, HarnessError> {
        let expected: BTreeSet<&str> = runner_ids.iter().map(String::as_str).collect();
        let shards = self.settings.shards as usize;
        let deadline = Instant::now() + timeout;
        let mut previous = BTreeMap::new();
        let mut stable = 0;
        loop {
            let owners = self.owners().await?;
            let holders: BTreeSet<&str> = owners.values().map(String::as_str).collect();
            let complete = owners.len() == shards && holders == expected;
            stable = if complete && owners == previous {
                stable + 1
            } else {
                0
            };
            if stable >= 2 {
                return Ok(owners);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "all {shards} shards owned by {expected:?}, stable (last seen: {} owned, \
                         by {holders:?})",
                        owners.len()
                    ),
                    after: timeout,
                });
            }
            previous = owners;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every shard is owned by one of `runner_ids`; returns how
    /// long that took from `since`.
    pub async fn wait_owned_by(
        &self,
        runner_ids: &[&str],
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration, HarnessError> {
        let shards = self.settings.shards as usize;
        let deadline = Instant::now() + timeout;
        loop {
            let owners = self.owners().await?;
            let done =
                owners.len() == shards && owners.values().all(|o| runner_ids.contains(&o.as_str()));
            if done {
                return Ok(since.elapsed());
            }
            if Instant::now() >= deadline {
                let others: BTreeSet<&String> = owners
                    .values()
                    .filter(|o| !runner_ids.contains(&o.as_str()))
                    .collect();
                return Err(HarnessError::Timeout {
                    what: format!(
                        "all {shards} shards owned by {runner_ids:?} (last seen: {} owned, \
                         others still holding: {others:?})",
                        owners.len()
                    ),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for runner in &self.runners {
            eprintln!(
                "===== runner {} (pid {}), log {} — last lines =====\n{}",
                runner.id(),
                runner.pid(),
                runner.log_path().display(),
                runner.log_tail(80)
            );
        }
        if let Some(logs) = self.logs.take() {
            eprintln!("runner logs kept in {}", logs.keep().display());
        }
    }
}
