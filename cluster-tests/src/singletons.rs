//! The singletons a test runner registers when [`SINGLETONS_ENV`] is `1`:
//! a cron ticker and a plain counter, each writing one audit row per run in
//! the transaction that records the run.

use std::time::{Duration, UNIX_EPOCH};

use flotilla::prelude::*;
use flotilla::storage::Statement;

use crate::entities::{AUDIT_TABLE_ENV, is_identifier, unix_micros};

/// Milliseconds a runner's clock runs ahead of the system clock (the
/// runner lives as if that much time had passed): simulates downtime.
pub const CLOCK_OFFSET_ENV: &str = "FLOTILLA_TEST_CLOCK_OFFSET_MS";

/// The system clock shifted by a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct OffsetClock {
    offset: Duration,
}

impl OffsetClock {
    /// A clock `offset` ahead of the system clock.
    pub fn new(offset: Duration) -> Self {
        Self { offset }
    }
}

impl flotilla::time::Clock for OffsetClock {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + self.offset
    }

    fn instant(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    fn sleep(&self, duration: Duration) -> flotilla::time::Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Set to `1` to register [`TestTicker`] and [`TestCounter`] in a runner.
pub const SINGLETONS_ENV: &str = "FLOTILLA_TEST_SINGLETONS";

/// `entity_id` of the ticker's audit rows (`msg_key`: the tick's instant in
/// Unix milliseconds; `message_id`: the ticker's state, its run count).
pub const TICKER_ROW: &str = "singleton:ticker";

/// `entity_id` of the counter's audit rows (`msg_key`: the count saved
/// with the row).
pub const COUNTER_ROW: &str = "singleton:counter";

fn audit_table() -> Result<String, String> {
    let table = std::env::var(AUDIT_TABLE_ENV).unwrap_or_else(|_| "audit".to_owned());
    if is_identifier(&table) {
        Ok(table)
    } else {
        Err(format!("bad audit table name {table:?}"))
    }
}

fn audit_row<S>(
    ctx: &SingletonContext<S>,
    table: &str,
    entity_id: &str,
    key: String,
    count: u64,
) -> Statement {
    Statement::new(format!(
        "INSERT INTO {table} \
         (msg_key, entity_id, runner_id, shard_index, epoch, message_id, started_at) \
         VALUES ($1, $2, $3, $4, NULL, $5, $6)"
    ))
    .bind(key)
    .bind(entity_id.to_owned())
    .bind(ctx.runner_id().to_string())
    .bind(i64::from(ctx.shard().index()))
    .bind(i64::try_from(count).unwrap_or(i64::MAX))
    .bind(unix_micros())
}

/// Every second: one audit row per tick, committed with the tick's record.
#[singleton(name = "test-ticker", cron = "* * * * * *", state = u64)]
pub async fn test_ticker(ctx: SingletonContext<u64>) -> Result<(), String> {
    let table = audit_table()?;
    let at = ctx.scheduled_at().ok_or("a cron tick has an instant")?;
    let at_ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis();
    let count = ctx.with_state(|n| {
        *n += 1;
        *n
    });
    ctx.stage(audit_row(
        &ctx,
        &table,
        TICKER_ROW,
        at_ms.to_string(),
        count,
    ));
    Ok(())
}

/// Counts every 100 ms until asked to stop, saving its count (with one
/// audit row) at each step: a new runner goes on from the last saved count.
#[singleton(name = "test-counter")]
pub async fn test_counter(ctx: SingletonContext<u64>) -> Result<(), String> {
    let table = audit_table()?;
    while !ctx.is_stopping() {
        let count = ctx.with_state(|n| {
            *n += 1;
            *n
        });
        ctx.stage(audit_row(
            &ctx,
            &table,
            COUNTER_ROW,
            count.to_string(),
            count,
        ));
        ctx.save_state().await.map_err(|e| e.to_string())?;
        tokio::select! {
            () = ctx.stopped() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    // The count was saved with its row; the end-of-run save adds nothing.
    Ok(())
}
