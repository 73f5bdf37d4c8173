//! Entities and helpers shared by the runtime's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use flotilla::prelude::*;
use flotilla::storage::Statement;

/// How many times each (entity, key) handler ran, across all tests of a binary.
/// Keys include a test-unique entity id, so tests do not see each other's runs.
pub static RUNS: LazyLock<Mutex<HashMap<String, u32>>> = LazyLock::new(Default::default);

pub fn record_run(key: String) {
    *RUNS.lock().unwrap().entry(key).or_default() += 1;
}

pub fn runs(key: &str) -> u32 {
    RUNS.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// A storage backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
}

/// A builder on `backend`; for SQLite, a fresh file in `dir`.
pub fn builder(backend: Backend, dir: &tempfile::TempDir) -> flotilla::ClusterBuilder {
    let builder = Cluster::builder().safety_poll(Duration::from_millis(500));
    match backend {
        Backend::Memory => builder.memory(),
        Backend::Sqlite => builder.sqlite(dir.path().join("flotilla.db")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds: balance {balance}")]
    Insufficient { balance: i64 },
}

/// A ledger with persisted state and persisted, deduplicated rpcs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub balance: i64,
    pub applied: u32,
}

#[entity(state = persisted, max_idle = "30s")]
impl Ledger {
    #[rpc(persisted, primary_key = key)]
    async fn apply(
        &mut self,
        ctx: &EntityContext,
        key: u64,
        amount: i64,
    ) -> Result<i64, LedgerError> {
        record_run(format!("{}/{key}", ctx.entity_id()));
        if self.balance + amount < 0 {
            return Err(LedgerError::Insufficient {
                balance: self.balance,
            });
        }
        self.balance += amount;
        self.applied += 1;
        Ok(self.balance)
    }

    /// Applies and writes an audit row in the completion transaction (SQLite dialect).
    #[rpc(persisted, primary_key = key)]
    async fn apply_audited(
        &mut self,
        ctx: &EntityContext,
        key: u64,
        amount: i64,
        table: String,
    ) -> i64 {
        record_run(format!("{}/{key}", ctx.entity_id()));
        self.balance += amount;
        self.applied += 1;
        ctx.stage(
            Statement::new(format!(
                "INSERT INTO {table} (entity, key, amount) VALUES (?, ?, ?)"
            ))
            .bind(ctx.entity_id())
            .bind(key as i64)
            .bind(amount),
        )
        .expect("persisted handlers can stage effects");
        self.balance
    }

    /// Persisted without a key: every call is its own message.
    #[rpc(persisted)]
    async fn note(&mut self, ctx: &EntityContext, text: String) -> u32 {
        record_run(format!("{}/note/{text}", ctx.entity_id()));
        self.applied += 1;
        self.applied
    }

    #[rpc]
    async fn balance(&self) -> (i64, u32) {
        (self.balance, self.applied)
    }
}

/// Echoes requests; used for the many-callers tests.
#[derive(Debug, Default)]
pub struct Echo;

#[entity]
impl Echo {
    #[rpc(persisted)]
    async fn echo(&self, ctx: &EntityContext, caller: u32, seq: u32) -> (String, u32, u32) {
        record_run(format!("{}/{caller}/{seq}", ctx.entity_id()));
        (ctx.entity_id().to_owned(), caller, seq)
    }

    #[rpc]
    async fn ping(&self, n: u64) -> u64 {
        n
    }
}

/// Counts concurrent handlers, panics on request, sleeps on request.
#[derive(Debug, Default)]
pub struct Worker {
    pub handled: u32,
}

/// Per entity id: (handlers running now, most ever running at once).
pub static CONCURRENCY: LazyLock<Mutex<HashMap<String, (usize, usize)>>> =
    LazyLock::new(Default::default);

pub fn max_concurrency(entity_id: &str) -> usize {
    CONCURRENCY
        .lock()
        .unwrap()
        .get(entity_id)
        .map_or(0, |c| c.1)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);

#[entity(mailbox = 4, max_idle = "300ms")]
impl Worker {
    #[rpc]
    async fn work(&mut self, ctx: &EntityContext, millis: u64) -> u32 {
        {
            let mut all = CONCURRENCY.lock().unwrap();
            let c = all.entry(ctx.entity_id().to_owned()).or_default();
            c.0 += 1;
            c.1 = c.1.max(c.0);
        }
        tokio::time::sleep(Duration::from_millis(millis)).await;
        CONCURRENCY
            .lock()
            .unwrap()
            .get_mut(ctx.entity_id())
            .unwrap()
            .0 -= 1;
        self.handled += 1;
        self.handled
    }

    #[rpc]
    async fn boom(&mut self, message: String) -> u32 {
        self.handled += 1;
        panic!("{message}");
    }

    #[rpc]
    async fn handled(&self) -> u32 {
        self.handled
    }

    #[rpc]
    async fn refuse(&self, why: String) -> Result<u32, Refused> {
        Err(Refused(why))
    }

    #[rpc]
    async fn whereami(&self, ctx: &EntityContext) -> (String, String, String, bool) {
        (
            ctx.entity_id().to_owned(),
            ctx.shard_id().to_string(),
            ctx.runner_id().to_string(),
            ctx.message_id().is_none(),
        )
    }

    #[rpc(persisted)]
    async fn persisted_boom(&mut self, message: String) -> u32 {
        panic!("{message}");
    }
}

/// Never registered: calls to it fail with `UnknownEntityType`.
#[derive(Debug, Default)]
pub struct Unregistered;

#[entity]
impl Unregistered {
    #[rpc]
    async fn hello(&self) -> u8 {
        1
    }
}

/// Runs `f` for each backend with a fresh directory.
pub async fn each_backend<F, Fut>(f: F)
where
    F: Fn(Backend, Arc<tempfile::TempDir>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for backend in [Backend::Memory, Backend::Sqlite] {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        f(backend, dir).await;
    }
}
