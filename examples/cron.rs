//! A cron singleton on two runners: its runner is killed with `SIGKILL`, the
//! other one takes over, and the counter in its state goes on.
//!
//! ```text
//! cargo run --example cron
//! ```
//!
//! The program starts two runner processes of itself (`cron runner`) against
//! PostgreSQL (`FLOTILLA_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) in a schema of its own,
//! dropped at the end. Both register the singleton `heartbeat`: a cron every
//! second that adds one to a counter kept in its state, and stages one row
//! (tick instant, counter, runner) in the table `cron_ticks`. The row commits
//! in the same transaction as the tick's record and the new state. Then:
//!
//! 1. after a few ticks, the runner running `heartbeat` is killed with
//!    `SIGKILL`;
//! 2. the other runner takes the singleton's shard over, loads the saved
//!    state, and runs the next ticks (the missed ones first: a tick less than
//!    `skip_if_older_than` late still runs);
//! 3. the survivor is stopped with `SIGTERM`, and the parent reads
//!    `cron_ticks` back: one row per second, the counter 1, 2, 3, … with no
//!    reset, no gap and no tick recorded twice.
//!
//! It exits 0 with a summary, in well under 30 seconds.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use flotilla::prelude::*;
use flotilla::storage::Statement;
use sqlx::AssertSqlSafe;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

type Fallible<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const RUNNERS: [&str; 2] = ["runner-1", "runner-2"];
/// Shards of the cluster (the default); every process must agree on it.
const SHARDS: usize = 300;
/// Ticks to see on the first runner before it is killed, and on the second.
const TICKS_PER_RUNNER: usize = 4;
/// Shared by every process of this demo cluster. A real one comes from a
/// secret store, through `FLOTILLA_SECRET`.
const SECRET: &str = "cron-example-secret-not-for-production";

// ANCHOR: singleton
/// The singleton's state: stored with every tick, loaded by the runner that
/// takes over.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    count: u64,
}

/// Every second, once cluster-wide: count, and record the tick.
#[singleton(cron = "* * * * * *", skip_if_older_than = "10s", state = Tally)]
async fn heartbeat(ctx: SingletonContext<Tally>) -> Result<(), String> {
    let tick = ctx.scheduled_at().ok_or("a cron run has a tick")?;
    let tick_ms = tick
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis();
    let count = ctx.with_state(|tally| {
        tally.count += 1;
        tally.count
    });
    // Commits with the tick's record and the new count, or not at all.
    ctx.stage(
        Statement::new(
            "INSERT INTO cron_ticks (tick_ms, count, runner, ran_at_us) VALUES ($1, $2, $3, $4)",
        )
        .bind(i64::try_from(tick_ms).map_err(|e| e.to_string())?)
        .bind(i64::try_from(count).map_err(|e| e.to_string())?)
        .bind(ctx.runner_id().to_string())
        .bind(unix_micros()),
    );
    // The parent reads this line to see who runs the singleton.
    println!("TICK {count} {tick_ms}");
    Ok(())
}
// ANCHOR_END: singleton

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Fallible {
    if std::env::args().nth(1).as_deref() == Some("runner") {
        return runner().await;
    }
    let database = std::env::var("FLOTILLA_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let schema = format!("flotilla_cron_example_{}", std::process::id());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL (FLOTILLA_DATABASE_URL): {e}"))?;
    // The name is ours (a fixed text and a number), so pasting it is safe.
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {schema}.cron_ticks (tick_ms bigint NOT NULL, count bigint NOT NULL, \
         runner text NOT NULL, ran_at_us bigint NOT NULL)"
    )))
    .execute(&admin)
    .await?;

    // Every process of the demo works in that schema: the connection option
    // sets the `search_path`, so Flotilla's tables (and `cron_ticks`) are
    // found there.
    let separator = if database.contains('?') { '&' } else { '?' };
    let url = format!("{database}{separator}options=-c%20search_path%3D{schema}");
    let outcome = tokio::select! {
        outcome = demo(&url, &admin, &schema) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };

    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await?;
    admin.close().await;
    outcome
}

// ANCHOR: runner
/// One runner process: its configuration comes from `FLOTILLA_*` variables.
async fn runner() -> Fallible {
    let cluster = Cluster::builder()
        .config(ClusterConfig::from_env()?)
        .singleton::<Heartbeat>()
        .start()
        .await?;
    println!("READY {}", cluster.runner_id());
    tokio::select! {
        () = flotilla::shutdown_signal() => {}
        () = parent_gone() => {}
    }
    cluster.shutdown().await; // a tick under way ends, the shard is handed over
    Ok(())
}
// ANCHOR_END: runner

/// Resolves when the parent closes our stdin (it exited, or was killed), so
/// that no runner outlives the demo.
async fn parent_gone() {
    let (closed, on_close) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let _ = on_close.await;
}

/// One row of `cron_ticks`.
#[derive(Debug, sqlx::FromRow)]
struct TickRow {
    tick_ms: i64,
    count: i64,
    runner: String,
    ran_at_us: i64,
}

/// The demo, driven from the parent process.
async fn demo(url: &str, admin: &sqlx::PgPool, schema: &str) -> Fallible {
    let log = Log::new();
    let ticks = Ticks::default();
    let mut runners = BTreeMap::new();
    for id in RUNNERS {
        runners.insert(id, Runner::spawn(id, url, &ticks, &log).await?);
    }
    log.say("2 runners started; waiting for ticks");
    ticks.wait_for(&log, TICKS_PER_RUNNER, None).await?;

    // Kill the runner that ran the last tick, without warning.
    let victim = ticks.last_runner().ok_or("no tick yet")?;
    let survivor = RUNNERS
        .into_iter()
        .find(|id| *id != victim)
        .ok_or("no other runner")?;
    let runner = runners.remove(victim).ok_or("no such runner")?;
    // Mid-second: the next tick is due 600 ms after the kill, so the survivor
    // must take over before it to run it on time.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let count_at_kill = ticks.count();
    log.say(&format!(
        "SIGKILL {victim} (it runs `heartbeat`; last count {count_at_kill})"
    ));
    let killed_at = Instant::now();
    let killed_at_ms = unix_micros() / 1_000;
    runner.kill().await?;
    ticks.wait_for(&log, 1, Some(survivor)).await?;
    let taken_over_in = killed_at.elapsed();
    log.say(&format!(
        "{survivor} runs `heartbeat` now, {} ms after the kill",
        taken_over_in.as_millis()
    ));
    ticks
        .wait_for(&log, TICKS_PER_RUNNER, Some(survivor))
        .await?;

    log.say(&format!("SIGTERM {survivor} (graceful leave)"));
    for (_, runner) in runners {
        runner.terminate().await?;
    }

    let rows: Vec<TickRow> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT tick_ms, count, runner, ran_at_us FROM {schema}.cron_ticks ORDER BY tick_ms"
    )))
    .fetch_all(admin)
    .await?;
    let checked = check(&rows, victim, survivor, count_at_kill)?;
    let first = rows
        .iter()
        .find(|r| r.count > count_at_kill as i64)
        .ok_or("no tick after the kill")?;

    println!();
    println!("summary");
    println!(
        "  ticks recorded:        {} ({} by {victim}, {} by {survivor})",
        rows.len(),
        checked.by_victim,
        checked.by_survivor
    );
    println!(
        "  counter:               1..={} in tick order: no reset, no gap, no tick twice",
        rows.len()
    );
    println!(
        "  first tick after the SIGKILL: due {} ms after it, run by {} {} ms after its instant",
        first.tick_ms - killed_at_ms,
        first.runner,
        first.ran_at_us / 1_000 - first.tick_ms
    );
    println!(
        "  lateness (run start - tick): median {} ms, max {} ms",
        checked.median_late_ms, checked.max_late_ms
    );
    Ok(())
}

/// What [`check`] found.
struct Checked {
    by_victim: usize,
    by_survivor: usize,
    median_late_ms: i64,
    max_late_ms: i64,
}

/// The rows must be one per second, counting 1, 2, 3, … in tick order, and
/// only the survivor's after the kill.
fn check(rows: &[TickRow], victim: &str, survivor: &str, count_at_kill: u64) -> Fallible<Checked> {
    if rows.len() < 2 * TICKS_PER_RUNNER {
        return Err(format!(
            "{} ticks recorded, expected at least {}",
            rows.len(),
            2 * TICKS_PER_RUNNER
        )
        .into());
    }
    for (n, row) in rows.iter().enumerate() {
        let expected = n as i64 + 1;
        if row.count != expected {
            return Err(format!(
                "tick {} has count {}, expected {expected}: the counter was reset or a tick was recorded twice",
                row.tick_ms, row.count
            )
            .into());
        }
    }
    for pair in rows.windows(2) {
        if pair[1].tick_ms - pair[0].tick_ms != 1_000 {
            return Err(format!(
                "ticks {} and {} are not one second apart: a tick was lost or doubled",
                pair[0].tick_ms, pair[1].tick_ms
            )
            .into());
        }
    }
    // From the kill on, only the survivor records ticks (the victim's last
    // printed tick may be recorded by either: if the victim died before its
    // record committed, the survivor ran that tick again).
    if let Some(row) = rows
        .iter()
        .find(|r| r.count > count_at_kill as i64 && r.runner != survivor)
    {
        return Err(format!(
            "tick {} (count {}) was recorded by {} after it was killed",
            row.tick_ms, row.count, row.runner
        )
        .into());
    }
    let by_survivor = rows.iter().filter(|r| r.runner == survivor).count();
    let by_victim = rows.iter().filter(|r| r.runner == victim).count();
    let mut late: Vec<i64> = rows
        .iter()
        .map(|r| r.ran_at_us / 1_000 - r.tick_ms)
        .collect();
    late.sort_unstable();
    Ok(Checked {
        by_victim,
        by_survivor,
        median_late_ms: late[late.len() / 2],
        max_late_ms: late[late.len() - 1],
    })
}

/// A runner process and the task reading its stdout.
struct Runner {
    id: &'static str,
    child: Child,
    reader: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// Starts `cron runner` with its settings in the environment, and waits
    /// for its `READY` line.
    async fn spawn(id: &'static str, url: &str, ticks: &Ticks, log: &Log) -> Fallible<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("runner")
            .env("FLOTILLA_STORAGE", url)
            .env("FLOTILLA_SHARDS", SHARDS.to_string())
            .env("FLOTILLA_SECRET", SECRET)
            .env("FLOTILLA_RUNNER_ID", id)
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_SHUTDOWN_TIMEOUT", "5s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (ready, on_ready) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(ticks.clone().follow(id, stdout, ready, log.clone()));
        tokio::time::timeout(Duration::from_secs(15), on_ready)
            .await
            .map_err(|_| format!("{id} did not start within 15 s"))?
            .map_err(|_| format!("{id} exited before it was ready"))?;
        Ok(Self { id, child, reader })
    }

    /// `SIGKILL`: no chance to release anything.
    async fn kill(mut self) -> Fallible {
        self.child.kill().await?;
        self.reader.await?;
        Ok(())
    }

    /// `SIGTERM`, and wait for the graceful exit.
    async fn terminate(mut self) -> Fallible {
        let pid = self.child.id().ok_or("already exited")?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !sent.success() {
            return Err(format!("kill -TERM {pid} failed").into());
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .map_err(|_| format!("{} did not stop within 10 s of SIGTERM", self.id))??;
        self.reader.await?;
        if !status.success() {
            return Err(format!("{} exited with {status}", self.id).into());
        }
        Ok(())
    }
}

/// The `TICK` lines the runners printed, in arrival order: (runner, count).
#[derive(Clone, Default)]
struct Ticks(Arc<Mutex<Vec<(&'static str, u64)>>>);

impl Ticks {
    /// Reads the `READY` and `TICK <count> <instant>` lines of runner `id`
    /// until it exits.
    async fn follow(
        self,
        id: &'static str,
        stdout: tokio::process::ChildStdout,
        ready: tokio::sync::oneshot::Sender<()>,
        log: Log,
    ) {
        let mut ready = Some(ready);
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("READY ") {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            } else if let Some(tick) = line.strip_prefix("TICK ") {
                let mut fields = tick.split(' ');
                let count = fields.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                log.say(&format!("{id}: heartbeat, count {count}"));
                if let Ok(mut ticks) = self.0.lock() {
                    ticks.push((id, count));
                }
            }
        }
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn last_runner(&self) -> Option<&'static str> {
        self.snapshot().last().map(|(id, _)| *id)
    }

    fn count(&self) -> u64 {
        self.snapshot().last().map_or(0, |(_, count)| *count)
    }

    /// Waits (at most 15 s) until `n` more ticks arrived, from `runner` if given.
    async fn wait_for(&self, log: &Log, n: usize, runner: Option<&str>) -> Fallible {
        let matching = || {
            self.snapshot()
                .iter()
                .filter(|(id, _)| runner.is_none_or(|r| r == *id))
                .count()
        };
        let target = matching() + n;
        let deadline = Instant::now() + Duration::from_secs(15);
        while matching() < target {
            if Instant::now() > deadline {
                log.say(&format!("ticks so far: {:?}", self.snapshot()));
                return Err(format!("no {n} ticks within 15 s").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// Prints lines stamped with the time since the demo started.
#[derive(Clone)]
struct Log(Instant);

impl Log {
    fn new() -> Self {
        Self(Instant::now())
    }

    fn say(&self, line: &str) {
        println!("[{:5.1}s] {line}", self.0.elapsed().as_secs_f64());
    }
}
