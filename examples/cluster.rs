//! A cluster on one machine: three runners on PostgreSQL, one killed and
//! restarted while traffic flows.
//!
//! ```text
//! cargo run --example cluster
//! ```
//!
//! The program starts three runner processes of itself (`cluster runner`),
//! each a full Flotilla runner on loopback, against PostgreSQL
//! (`FLOTILLA_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) in a schema of its own,
//! dropped at the end. A client-only cluster in this process sends persisted
//! deposits and volatile balance reads to 40 accounts. Then:
//!
//! 1. the runner serving `acct-0` is killed with `SIGKILL`;
//! 2. the two others take its shards over (the ownership line printed every
//!    second shows it), and its accounts are served again, with their
//!    persisted state;
//! 3. it is started again and takes its share back;
//! 4. every account's balance is checked against the deposits acknowledged to
//!    it: each one counted exactly once, none lost, none doubled;
//! 5. the runners are stopped with `SIGTERM` (a graceful leave).
//!
//! It exits 0 with a summary, in well under 30 seconds.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::prelude::*;
use flotilla::transport::ClusterSecret;
use sqlx::AssertSqlSafe;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

type Fallible<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

const RUNNERS: [&str; 3] = ["runner-1", "runner-2", "runner-3"];
/// Shards of the cluster (the default); every process must agree on it.
const SHARDS: usize = 300;
const ACCOUNTS: u64 = 40;
const SENDERS: u64 = 8;
/// Shared by every process of this demo cluster. A real one comes from a
/// secret store, through `FLOTILLA_SECRET`.
const SECRET: &str = "cluster-example-secret-not-for-production";

/// A bank account whose balance is saved with every persisted reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    balance: i64,
}

#[entity(state = persisted)]
impl Account {
    /// Persisted and deduplicated by `transfer_id`: retrying a deposit whose
    /// reply was lost is safe.
    #[rpc(persisted, primary_key = transfer_id)]
    async fn deposit(&mut self, transfer_id: u64, amount: i64) -> i64 {
        tracing::debug!(transfer_id, amount, "deposit");
        self.balance += amount;
        self.balance
    }

    /// Volatile: the balance, and which runner answered.
    #[rpc]
    async fn balance(&self, ctx: &EntityContext) -> (i64, String) {
        (self.balance, ctx.runner_id().to_string())
    }
}

#[tokio::main]
async fn main() -> Fallible {
    if std::env::args().nth(1).as_deref() == Some("runner") {
        return runner().await;
    }
    let database = std::env::var("FLOTILLA_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let schema = format!("flotilla_cluster_example_{}", std::process::id());
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

    // Every process of the demo works in that schema: the connection option
    // sets the `search_path`, so Flotilla's tables land there.
    let separator = if database.contains('?') { '&' } else { '?' };
    let url = format!("{database}{separator}options=-c%20search_path%3D{schema}");
    let outcome = tokio::select! {
        outcome = demo(&url) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };

    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await?;
    admin.close().await;
    outcome
}

// ANCHOR: runner
/// One runner process: its whole configuration comes from `FLOTILLA_*`
/// variables, as it would in a container.
async fn runner() -> Fallible {
    let cluster = Cluster::builder()
        .config(ClusterConfig::from_env()?)
        .register::<Account>()
        .start()
        .await?;
    let address = cluster
        .transport_address()
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    println!("READY {} {address}", cluster.runner_id());

    // The parent reads these lines to draw its ownership table.
    let report = async {
        let mut last = None;
        loop {
            let owned = cluster.owned_shards().len();
            if last != Some(owned) {
                println!("OWNS {owned}");
                last = Some(owned);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = flotilla::shutdown_signal() => {}
        () = parent_gone() => {}
        () = report => {}
    }
    cluster.shutdown().await; // finish handlers, release shards, leave
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

/// The demo, driven from the parent process.
async fn demo(url: &str) -> Fallible {
    let log = Log::new();
    let board = Board::default();
    let mut runners = BTreeMap::new();
    for id in RUNNERS {
        runners.insert(id, Runner::spawn(id, url, &board).await?);
    }
    log.say("3 runners started; waiting until they own every shard");
    board.wait_until(&log, |b| b.live_owned() == SHARDS).await?;
    log.say(&format!("every shard owned: {}", board.ownership()));

    // ANCHOR: client
    // A client-only cluster: routes calls, owns no shards, runs no entities.
    let client = Cluster::builder()
        .postgres(url)
        .secret(ClusterSecret::new(SECRET)?)
        .client_only()
        .shards(SHARDS as u32)
        .call_timeout(Duration::from_secs(5))
        .register::<Account>()
        .start()
        .await?;
    // ANCHOR_END: client

    let traffic = Traffic::start(&client, &log);
    // A `JoinSet` aborts its tasks when dropped, also when the demo stops early.
    let mut monitor = tokio::task::JoinSet::new();
    monitor.spawn(show_ownership(
        board.clone(),
        traffic.stats.clone(),
        log.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Kill the runner that serves acct-0, without warning.
    let (_, victim) = client.client::<Account>("acct-0").balance().await?;
    let victim = RUNNERS
        .into_iter()
        .find(|id| *id == victim)
        .ok_or("acct-0 answered from an unknown runner")?;
    let shards_before = board.owned_by(victim);
    let runner = runners.remove(victim).ok_or("no such runner")?;
    log.say(&format!(
        "SIGKILL {victim} (serves acct-0 and {shards_before} shards)"
    ));
    let killed_at = Instant::now();
    runner.kill().await?;
    board.wait_until(&log, |b| b.live_owned() == SHARDS).await?;
    let healed_in = killed_at.elapsed();
    log.say(&format!(
        "healed in {} ms: {}",
        healed_in.as_millis(),
        board.ownership()
    ));
    let (_, now_on) = client.client::<Account>("acct-0").balance().await?;
    log.say(&format!("acct-0 is now served by {now_on}"));
    tokio::time::sleep(Duration::from_secs(2)).await;

    log.say(&format!("restarting {victim}"));
    let restarted_at = Instant::now();
    runners.insert(victim, Runner::spawn(victim, url, &board).await?);
    board
        .wait_until(&log, |b| {
            // Same runners, same weights: the same map as before the kill.
            b.live_owned() == SHARDS && b.owned_by(victim) == shards_before
        })
        .await?;
    let rebalanced_in = restarted_at.elapsed();
    log.say(&format!(
        "{victim} back with its share in {} ms: {}",
        rebalanced_in.as_millis(),
        board.ownership()
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stats = traffic.stop().await?;
    monitor.abort_all();
    let checked = check_balances(&client, &stats).await?;
    client.shutdown().await;

    log.say("SIGTERM to every runner (graceful leave)");
    for (_, runner) in runners {
        runner.terminate().await?;
    }

    println!();
    println!("summary");
    println!(
        "  calls ok:                       {} ({} persisted deposits, {} volatile reads)",
        stats.deposits.load(Ordering::Relaxed) + stats.reads.load(Ordering::Relaxed),
        stats.deposits.load(Ordering::Relaxed),
        stats.reads.load(Ordering::Relaxed),
    );
    println!(
        "  calls that needed a retry:      {} (the runtime itself retries a call that meets a moving shard, within its deadline)",
        stats.retried.load(Ordering::Relaxed)
    );
    println!(
        "  calls slower than 100 ms:       {} (the slowest: {} ms)",
        stats.slow.load(Ordering::Relaxed),
        stats.slowest_ms.load(Ordering::Relaxed)
    );
    println!(
        "  time to heal after the SIGKILL: {} ms",
        healed_in.as_millis()
    );
    println!(
        "  time to take the share back:    {} ms",
        rebalanced_in.as_millis()
    );
    println!("  balances checked:               {checked} accounts, every deposit counted once");
    Ok(())
}

/// Every account's balance must equal the deposits acknowledged to it: a
/// lost deposit would make it smaller, a doubled one larger.
async fn check_balances(client: &Cluster, stats: &Stats) -> Fallible<u64> {
    let acknowledged = stats.per_account.lock().map_err(|_| "poisoned")?.clone();
    for account in 0..ACCOUNTS {
        let id = format!("acct-{account}");
        let (balance, _) = client.client::<Account>(&id).balance().await?;
        let expected = acknowledged.get(&account).copied().unwrap_or(0);
        if balance != expected as i64 {
            return Err(
                format!("{id}: balance {balance}, acknowledged deposits {expected}").into(),
            );
        }
    }
    Ok(ACCOUNTS)
}

/// Senders that deposit 1 into a random-ish account, and read a balance
/// every fourth call, until stopped.
struct Traffic {
    stats: Arc<Stats>,
    senders: tokio::task::JoinSet<Fallible>,
}

#[derive(Default)]
struct Stats {
    stop: AtomicBool,
    next_transfer: AtomicU64,
    deposits: AtomicU64,
    reads: AtomicU64,
    retried: AtomicU64,
    slow: AtomicU64,
    slowest_ms: AtomicU64,
    /// Acknowledged deposits per account.
    per_account: Mutex<BTreeMap<u64, u64>>,
}

impl Traffic {
    fn start(client: &Cluster, log: &Log) -> Self {
        let stats = Arc::new(Stats::default());
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..SENDERS {
            senders.spawn(send(client.clone(), stats.clone(), log.clone()));
        }
        Self { stats, senders }
    }

    async fn stop(mut self) -> Fallible<Arc<Stats>> {
        self.stats.stop.store(true, Ordering::Relaxed);
        while let Some(sent) = self.senders.join_next().await {
            sent??;
        }
        Ok(self.stats)
    }
}

async fn send(client: Cluster, stats: Arc<Stats>, log: Log) -> Fallible {
    while !stats.stop.load(Ordering::Relaxed) {
        let transfer = stats.next_transfer.fetch_add(1, Ordering::Relaxed);
        let account = transfer % ACCOUNTS;
        let entity = client.client::<Account>(format!("acct-{account}"));
        let started = Instant::now();
        let mut attempt = 1;
        // The same transfer id on every attempt: if an earlier attempt was
        // stored (or even handled) before its reply was lost, the retry gets
        // the stored reply and the deposit still counts once.
        while let Err(error) = entity.deposit(transfer, 1).await {
            if attempt == 1 {
                stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            if attempt == 5 {
                return Err(format!("deposit {transfer} failed 5 times: {error}").into());
            }
            if stats.retried.load(Ordering::Relaxed) <= 10 {
                log.say(&format!(
                    "deposit {transfer} to acct-{account}: {error}; retrying"
                ));
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stats.deposits.fetch_add(1, Ordering::Relaxed);
        *stats
            .per_account
            .lock()
            .map_err(|_| "poisoned")?
            .entry(account)
            .or_default() += 1;

        if transfer.is_multiple_of(4) {
            // A read is volatile: at most once, so a failed one is simply
            // asked again.
            let mut attempt = 1;
            while let Err(error) = entity.balance().await {
                if attempt == 1 {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                }
                if attempt == 5 {
                    return Err(format!("balance of acct-{account} failed 5 times: {error}").into());
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            stats.reads.fetch_add(1, Ordering::Relaxed);
        }
        let took = started.elapsed().as_millis() as u64;
        stats.slowest_ms.fetch_max(took, Ordering::Relaxed);
        if took > 100 {
            stats.slow.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Prints who owns how many shards, and the calls so far, every second.
async fn show_ownership(board: Board, stats: Arc<Stats>, log: Log) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        log.say(&format!(
            "{} | calls ok {}, retried {}",
            board.ownership(),
            stats.deposits.load(Ordering::Relaxed) + stats.reads.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
        ));
    }
}

/// A runner process and the task reading its stdout.
struct Runner {
    id: &'static str,
    child: Child,
    reader: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// Starts `cluster runner` with its settings in the environment, and
    /// waits for its `READY` line.
    async fn spawn(id: &'static str, url: &str, board: &Board) -> Fallible<Self> {
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
        let reader = tokio::spawn(board.clone().follow(id, stdout, ready));
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

/// What each runner last said it owns; `None` once its process is gone.
#[derive(Clone, Default)]
struct Board(Arc<Mutex<BTreeMap<&'static str, Option<usize>>>>);

impl Board {
    /// Reads `READY` and `OWNS <n>` lines of runner `id` until it exits.
    async fn follow(
        self,
        id: &'static str,
        stdout: tokio::process::ChildStdout,
        ready: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut ready = Some(ready);
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("READY ") {
                self.set(id, Some(0));
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            } else if let Some(n) = line.strip_prefix("OWNS ") {
                self.set(id, n.parse().ok());
            }
        }
        self.set(id, None);
    }

    fn set(&self, id: &'static str, owned: Option<usize>) {
        if let Ok(mut board) = self.0.lock() {
            board.insert(id, owned);
        }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, Option<usize>> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Shards owned by runners that are alive.
    fn live_owned(&self) -> usize {
        self.snapshot().values().flatten().sum()
    }

    fn owned_by(&self, id: &str) -> usize {
        self.snapshot().get(id).copied().flatten().unwrap_or(0)
    }

    /// `runner-1: 100  runner-2: dead  runner-3: 200`
    fn ownership(&self) -> String {
        self.snapshot()
            .into_iter()
            .map(|(id, owned)| match owned {
                Some(n) => format!("{id}: {n:>3}"),
                None => format!("{id}: dead"),
            })
            .collect::<Vec<_>>()
            .join("  ")
    }

    /// Waits until `done` holds (checked every 20 ms), for at most 15 s.
    async fn wait_until(&self, log: &Log, done: impl Fn(&Self) -> bool) -> Fallible {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done(self) {
            if Instant::now() > deadline {
                log.say(&self.ownership());
                return Err("the cluster did not settle within 15 s".into());
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
