//! Flotilla's singleton benchmark on PostgreSQL: how long a singleton is
//! down when its runner is killed (SIGKILL) or stopped (SIGTERM), and how
//! late cron ticks run after their instant.
//!
//! `cargo bench -p flotilla --features postgres --bench singleton_pg` runs
//! the full measurement (5 failovers of each kind, 20 s of one-second
//! ticks); without `--bench` (as `cargo test --all-targets --all-features`
//! runs it) it does a quick smoke pass so the benchmark itself stays tested.
//! The database is `FLOTILLA_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); everything runs in a
//! fresh schema, dropped at the end.
//!
//! Layout: the bench process is runner A (a full runner, in process); it
//! re-runs its own binary as runner B (`FLOTILLA_BENCH_CHILD` set,
//! configured by `FLOTILLA_*` variables like any deployed runner). Both
//! register the same two singletons:
//!
//! - `bench-failover`, a plain singleton that announces its start and runs
//!   until asked to stop. Each failover round starts a fresh B whose id puts
//!   the singleton's shard on B, waits until B runs it, stops B (SIGKILL or
//!   SIGTERM), and times from the signal until the singleton starts on A.
//! - `bench-tick`, a cron every second. With A alone, each run records its
//!   lateness: the run's start minus the tick's scheduled instant.
//!
//! `cargo bench ... --bench singleton_pg -- <word>` runs the cases whose
//! name contains the word. The figures are in the book's Performance page.
//!
//! Targets (2-core machine): failover <= 1 s after SIGKILL, <= 100 ms after
//! SIGTERM (medians of 5); tick lateness p99 <= 50 ms.

// The shared modules of the cluster bench; this bench uses a part of them.
#[allow(dead_code)]
#[path = "cluster_pg/cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "cluster_pg/database.rs"]
mod database;

use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use flotilla::RunnerId;
use flotilla::prelude::*;
use flotilla::sharding::DEFAULT_GROUP;
use flotilla::sharding::assignment::{Runner, assign};
use flotilla::transport::ClusterSecret;
use flotilla::{ClusterConfig, Singleton};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use database::BenchDatabase;

/// Shards of the bench cluster (the default).
const SHARDS: u32 = 300;
/// The cluster secret every runner of the bench shares.
const SECRET: &str = "flotilla-bench-singleton-secret";
/// Set in the child's environment: run as runner B, not as the bench.
const CHILD_ENV: &str = "FLOTILLA_BENCH_CHILD";

/// When `bench-failover` started in this process (runner A), newest last.
static FAILOVER_STARTS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
/// Whether `bench-tick` runs record their lateness (in runner A).
static RECORD_TICKS: AtomicBool = AtomicBool::new(false);
/// The lateness of each recorded tick.
static TICK_LATENESS: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs until asked to stop; says when it starts (A: in memory, B: a
/// `STARTED` line on stdout, read by the bench).
#[singleton(name = "bench-failover")]
async fn bench_failover(ctx: SingletonContext) -> Result<(), String> {
    let started = Instant::now();
    if is_child() {
        println!("STARTED");
    } else {
        FAILOVER_STARTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(started);
    }
    ctx.stopped().await;
    Ok(())
}

/// Every second; records how late its run starts.
#[singleton(name = "bench-tick", cron = "* * * * * *")]
async fn bench_tick(ctx: SingletonContext) -> Result<(), String> {
    let now = SystemTime::now();
    let tick = ctx.scheduled_at().ok_or("a cron run has a tick")?;
    if !is_child() && RECORD_TICKS.load(Ordering::Relaxed) {
        // A run that starts before its instant (clock steps) counts as 0.
        let late = now.duration_since(tick).unwrap_or_default();
        TICK_LATENESS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(late);
    }
    Ok(())
}

/// How a child runner is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: PostgreSQL frees its locks when its sessions' sockets close.
    Kill,
    /// SIGTERM: the runner shuts down gracefully, handing its shards over.
    Term,
}

struct Scale {
    failovers: usize,
    tick_seconds: u64,
}

const FULL: Scale = Scale {
    failovers: 5,
    tick_seconds: 20,
};

const SMOKE: Scale = Scale {
    failovers: 1,
    tick_seconds: 3,
};

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if is_child() {
        runtime.block_on(child_main());
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    // `cargo bench ... --bench singleton_pg -- tick` runs the cases whose name contains the word.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let scale = if full { FULL } else { SMOKE };
    // Declared after the runtime, dropped before it: the schema goes first
    // (also on a panic), then the runner's connections.
    let db = runtime.block_on(BenchDatabase::create());
    runtime.block_on(run(&db, &scale, &filter, full));
}

async fn run(db: &BenchDatabase, scale: &Scale, filter: &str, full: bool) {
    let wanted = |name: &str| name.contains(filter);
    if full {
        println!("machine: {}", db.commit_latency(200).await);
    }
    let a = Cluster::builder()
        .postgres(db.url())
        .secret(ClusterSecret::new(SECRET).expect("secret is long enough"))
        .runner_id("bench-a")
        .shards(SHARDS)
        .singleton::<BenchFailover>()
        .singleton::<BenchTick>()
        .start()
        .await
        .expect("start runner A on PostgreSQL");
    wait_for(
        "runner A to own every shard",
        Duration::from_secs(30),
        || a.owned_shards().len() == SHARDS as usize,
    )
    .await;

    let name = "cron tick lateness, a cron every second";
    if wanted(name) {
        RECORD_TICKS.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(scale.tick_seconds)).await;
        RECORD_TICKS.store(false, Ordering::Relaxed);
        let mut late =
            std::mem::take(&mut *TICK_LATENESS.lock().unwrap_or_else(PoisonError::into_inner));
        assert!(!late.is_empty(), "no tick ran in {} s", scale.tick_seconds);
        late.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        println!(
            "{name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms after the scheduled instant ({} ticks)",
            ms(quantile(&late, 0.5)),
            ms(quantile(&late, 0.99)),
            ms(late[late.len() - 1]),
            late.len()
        );
    }

    for (how, name) in [
        (Stop::Kill, "singleton failover after SIGKILL"),
        (Stop::Term, "singleton failover after SIGTERM"),
    ] {
        if !wanted(name) {
            continue;
        }
        let mut runs = Vec::new();
        for round in 0..scale.failovers {
            // Runner A reads the live set every `membership_poll`: stop B at
            // evenly spread points of that period, not always just after a
            // read.
            let phase = a
                .config()
                .membership_poll
                .mul_f64(round as f64 / scale.failovers as f64);
            runs.push(failover(db, &a, how, round, phase).await);
        }
        let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1_000.0);
        let mut sorted = runs.clone();
        sorted.sort();
        println!(
            "{name}: median {} ms from the signal until the singleton runs on the other runner (runs: {})",
            ms(&sorted[sorted.len() / 2]),
            runs.iter().map(ms).collect::<Vec<_>>().join(", ")
        );
    }
    a.shutdown().await;
}

/// The value at quantile `q` of sorted `values` (nearest rank).
fn quantile(values: &[Duration], q: f64) -> Duration {
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Starts a B that the singleton's shard is assigned to, waits until B runs
/// the singleton, stops B after `phase`, and returns the time from the
/// signal until the singleton started on A.
async fn failover(
    db: &BenchDatabase,
    a: &Cluster,
    how: Stop,
    round: usize,
    phase: Duration,
) -> Duration {
    let shard = ShardId::for_entity(DEFAULT_GROUP, BenchFailover::NAME, SHARDS);
    let word = match how {
        Stop::Kill => "kill",
        Stop::Term => "term",
    };
    let b_id = (0..)
        .map(|n| RunnerId::new(format!("bench-b-{word}-{round}-{n}")))
        .find(|b| {
            assign(
                DEFAULT_GROUP,
                SHARDS,
                &[
                    Runner::new(a.runner_id().clone(), 1),
                    Runner::new(b.clone(), 1),
                ],
            )
            .shards_of(b)
            .any(|s| s == shard)
        })
        .expect("some runner id takes the singleton's shard");
    let mut b = ChildRunner::spawn(db, &b_id).await;
    b.wait_for_line("STARTED", "runner B to run the singleton")
        .await;
    tokio::time::sleep(phase).await;
    let started = Instant::now();
    b.signal(how);
    wait_for(
        "the singleton to start on runner A",
        Duration::from_secs(30),
        || {
            FAILOVER_STARTS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last()
                .is_some_and(|at| *at > started)
        },
    )
    .await;
    let took = FAILOVER_STARTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .last()
        .map(|at| at.duration_since(started))
        .unwrap_or_default();
    b.wait_exit(how).await;
    took
}

/// Polls `done` every millisecond; panics after `limit`.
async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runner B: the bench binary re-run as a child process.
struct ChildRunner {
    id: RunnerId,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ChildRunner {
    /// Starts runner `id` on the bench database and waits until it serves.
    async fn spawn(db: &BenchDatabase, id: &RunnerId) -> Self {
        let exe = std::env::current_exe().expect("the bench binary's path");
        let mut command = tokio::process::Command::new(exe);
        // Only the settings below: a FLOTILLA_* variable of the caller's
        // environment must not make B differ from A.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FLOTILLA_") {
                command.env_remove(name);
            }
        }
        let child = command
            .env(CHILD_ENV, "1")
            .env("FLOTILLA_STORAGE", db.url())
            .env("FLOTILLA_SECRET", SECRET)
            .env("FLOTILLA_RUNNER_ID", id.to_string())
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_SHARDS", SHARDS.to_string())
            // The child exits when this pipe closes: a bench that dies
            // leaves no runner behind.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child runner");
        let mut runner = Self::new(id.clone(), child);
        runner
            .wait_for_line("READY", "the child runner to start")
            .await;
        runner
    }

    fn new(id: RunnerId, mut child: Child) -> Self {
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Self { id, child, stdout }
    }

    /// Reads stdout until a line starting with `prefix` (at most 30 s).
    async fn wait_for_line(&mut self, prefix: &str, what: &str) {
        let read = async {
            while let Some(line) = self
                .stdout
                .next_line()
                .await
                .expect("read the child's stdout")
            {
                if line.starts_with(prefix) {
                    return true;
                }
            }
            false
        };
        let found = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        assert!(found, "child runner {} exited before {what}", self.id);
    }

    /// Sends the signal of `how`, without waiting for the exit.
    fn signal(&mut self, how: Stop) {
        match how {
            Stop::Kill => self.child.start_kill().expect("SIGKILL the child runner"),
            Stop::Term => {
                let pid = self.child.id().expect("the child runner is running");
                // `kill` (the program): the bench forbids unsafe code, so no
                // libc::kill. The clock of a measurement starts before this
                // fork/exec, so it counts against the runtime.
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .expect("run kill -TERM");
                assert!(status.success(), "kill -TERM {pid} failed");
            }
        }
    }

    /// Waits for the process to exit after `signal(how)`; a SIGTERM must end
    /// in a clean shutdown.
    async fn wait_exit(mut self, how: Stop) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the child runner exited within 30 s")
            .expect("wait for the child runner");
        if how == Stop::Term {
            assert!(
                status.success(),
                "child runner {} failed: {status}",
                self.id
            );
            let mut stopped = false;
            while let Ok(Some(line)) = self.stdout.next_line().await {
                stopped |= line == "STOPPED";
            }
            assert!(stopped, "child runner {} did not shut down", self.id);
        }
    }
}

/// The child's `main`: a runner with the bench's singletons, configured from
/// `FLOTILLA_*`, serving until SIGTERM (or until the bench closes its stdin).
async fn child_main() {
    // SIGTERM's handler is installed before READY: a SIGTERM right after
    // must reach `shutdown_signal`, not kill the process.
    let _term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("watch SIGTERM");
    let config = ClusterConfig::from_env().expect("FLOTILLA_* settings");
    let cluster = Cluster::builder()
        .config(config)
        .singleton::<BenchFailover>()
        .singleton::<BenchTick>()
        .start()
        .await
        .expect("start the child runner");
    println!("READY {}", cluster.runner_id());
    let (parent_gone, gone) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = parent_gone.send(());
    });
    tokio::select! {
        () = flotilla::shutdown_signal() => {}
        _ = gone => {}
    }
    cluster.shutdown().await;
    println!("STOPPED");
}
