//! The entities the test runners serve, and the audit row their persisted rpc
//! writes inside its completion transaction.

use std::fmt;
use std::io::Write;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla::prelude::*;
use flotilla::storage::Statement;

/// The variable naming the audit table the handlers write to (default `audit`).
/// Read once per process; the harness sets it for every runner.
pub const AUDIT_TABLE_ENV: &str = "FLOTILLA_TEST_AUDIT_TABLE";

/// The audit table name, from [`AUDIT_TABLE_ENV`], or `None` when the value is
/// not a plain lower-case SQL identifier (it is pasted into SQL).
static AUDIT_TABLE: LazyLock<Option<String>> = LazyLock::new(|| {
    let name = std::env::var(AUDIT_TABLE_ENV).unwrap_or_else(|_| "audit".to_owned());
    is_identifier(&name).then_some(name)
});

/// Whether `name` may be pasted into SQL as a table name:
/// `^[a-z_][a-z0-9_]{0,62}$`.
pub fn is_identifier(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z' | b'_'))
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// The `CREATE TABLE` of the audit table `table`: one row per committed
/// effect and no unique key at all, so duplicates can be counted.
///
/// `started_at` is the runner's clock when the handler started and
/// `inserted_at` PostgreSQL's clock when the row was inserted (inside the
/// completion transaction, just before its commit), both in Unix
/// microseconds.
pub fn audit_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            msg_key     text   NOT NULL,
            entity_id   text   NOT NULL,
            runner_id   text   NOT NULL,
            shard_index bigint NOT NULL,
            epoch       bigint,
            message_id  bigint,
            started_at  bigint NOT NULL,
            inserted_at bigint NOT NULL
                DEFAULT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
        )"
    )
}

/// Microseconds since the Unix epoch on this machine's clock.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Where a handler ran, as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The entity id.
    pub entity_id: String,
    /// The runner that ran the handler.
    pub runner_id: String,
    /// The entity's shard index (default group).
    pub shard_index: u32,
    /// The shard's ownership epoch on that runner, if it has one.
    pub epoch: Option<i64>,
}

/// What a [`ProbeClient::record`] call does besides recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    /// Milliseconds to sleep before staging the audit row (a slow handler).
    pub sleep_ms: u64,
    /// Print `STARTED <key> <runner> <epoch> <message id> <started at µs>`
    /// on stdout when the handler
    /// starts, so the harness can count handler runs (not only commits).
    pub announce: bool,
}

impl Work {
    /// No sleep, no announcement.
    pub const QUICK: Self = Self {
        sleep_ms: 0,
        announce: false,
    };

    /// No sleep; announce the start.
    pub const ANNOUNCED: Self = Self {
        sleep_ms: 0,
        announce: true,
    };

    /// Sleep `millis` and announce the start.
    pub fn slow(millis: u64) -> Self {
        Self {
            sleep_ms: millis,
            announce: true,
        }
    }
}

/// The reply of [`ProbeClient::record`]: who handled the message, under which
/// epoch. Every caller of one key must get the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The message's primary key.
    pub key: String,
    /// Where the handler ran.
    pub placement: Placement,
    /// The persisted message's id.
    pub message_id: Option<i64>,
    /// When the handler started (runner clock, Unix microseconds).
    pub started_at_us: i64,
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.placement;
        write!(
            f,
            "key={}/entity={}/runner={}/shard={}/epoch={:?}/message={:?}/started={}",
            self.key,
            p.entity_id,
            p.runner_id,
            p.shard_index,
            p.epoch,
            self.message_id,
            self.started_at_us
        )
    }
}

/// Why [`ProbeClient::record`] failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The audit table name in the environment is not a plain identifier.
    #[error("{AUDIT_TABLE_ENV} is not a plain lower-case SQL identifier")]
    BadAuditTable,
    /// The audit row could not be staged.
    #[error("could not stage the audit row: {0}")]
    Stage(String),
}

/// The test entity. Stateless: what the tests count lives in the audit table.
#[derive(Debug, Default)]
pub struct Probe;

#[entity(max_idle = "60s")]
impl Probe {
    /// Volatile: where this entity runs now.
    #[rpc]
    async fn whereami(&self, ctx: &EntityContext) -> Placement {
        placement(ctx)
    }

    /// Persisted, deduplicated by `key`: sleeps as asked, then stages one
    /// audit row in the completion transaction and replies with a receipt.
    #[rpc(persisted, primary_key = key)]
    async fn record(
        &self,
        ctx: &EntityContext,
        key: String,
        work: Work,
    ) -> Result<Receipt, ProbeError> {
        let started_at_us = unix_micros();
        let placement = placement(ctx);
        let message_id = ctx.message_id().map(|id| id.0);
        if work.announce {
            let or_dash = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            announce(&format!(
                "STARTED {key} {} {} {} {started_at_us}",
                placement.runner_id,
                or_dash(placement.epoch),
                or_dash(message_id),
            ));
        }
        if work.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(work.sleep_ms)).await;
        }
        let table = AUDIT_TABLE.as_deref().ok_or(ProbeError::BadAuditTable)?;
        ctx.stage(
            Statement::new(format!(
                "INSERT INTO {table} \
                 (msg_key, entity_id, runner_id, shard_index, epoch, message_id, started_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(key.as_str())
            .bind(placement.entity_id.as_str())
            .bind(placement.runner_id.as_str())
            .bind(i64::from(placement.shard_index))
            .bind(placement.epoch)
            .bind(message_id)
            .bind(started_at_us),
        )
        .map_err(|e| ProbeError::Stage(e.to_string()))?;
        Ok(Receipt {
            key,
            placement,
            message_id,
            started_at_us,
        })
    }
}

fn placement(ctx: &EntityContext) -> Placement {
    Placement {
        entity_id: ctx.entity_id().to_owned(),
        runner_id: ctx.runner_id().to_string(),
        shard_index: ctx.shard_id().index(),
        epoch: ctx.epoch().map(|e| e.0),
    }
}

/// One line on stdout, written at once (the harness reads it while the
/// process runs; a full pipe only slows the handler, it never fails it).
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// An entity type the runners never register: calls to it must fail with
/// `ClusterError::UnknownEntityType` (scenario 8).
#[derive(Debug, Default)]
pub struct Stranger;

#[entity]
impl Stranger {
    /// Never runs on a test runner.
    #[rpc]
    async fn hello(&self) -> u8 {
        1
    }
}
