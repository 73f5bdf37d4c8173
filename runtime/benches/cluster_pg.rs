//! Flotilla's cluster benchmark on PostgreSQL: calls across runner
//! processes, persisted calls on PostgreSQL, and failover after SIGKILL and
//! SIGTERM of a runner.
//!
//! `cargo bench -p flotilla --features postgres --bench cluster_pg` runs the
//! full measurement; without `--bench` (as `cargo test --all-targets
//! --all-features` runs it) it does a quick smoke pass so the benchmark
//! itself stays tested. The database is `FLOTILLA_TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`); everything runs
//! in a fresh schema, dropped at the end.
//!
//! Layout: the bench process is runner A (a full runner, in process); it
//! re-runs its own binary as runner B (`FLOTILLA_BENCH_CHILD` set, configured
//! by `FLOTILLA_*` variables like any deployed runner). Cross-runner cases
//! call, from A, entities whose shards B owns: one transport hop each way
//! (one case calls them from C, a `client_only` handle in the bench process).
//! Failover stops B (SIGKILL or SIGTERM) and times A until it owns every
//! shard and has itself answered a call to an entity of B's former shards.
//!
//! Beside the figures it prints the PostgreSQL commit latency (as the
//! single-runner bench prints fsync), runner A's group-commit transaction
//! sizes, and the CPU time per call of the runners and of their PostgreSQL
//! backends. `cargo bench ... --bench cluster_pg -- <word>` runs the cases
//! whose name contains the word. The figures and what makes them are in the
//! book's Performance page.
//!
//! Targets (2-core machine): cross-runner volatile p50 <= 30 us, p99 <= 100
//! us, >= 100,000 calls/s with 64 callers; persisted on PostgreSQL p50 <= 2
//! ms with one caller, >= 20,000 msgs/s with 64 callers over 1,000
//! entities; failover <= 1 s after SIGKILL, <= 100 ms after SIGTERM.

mod measure;

#[path = "cluster_pg/cpu.rs"]
mod cpu;
#[path = "cluster_pg/database.rs"]
mod database;
#[path = "cluster_pg/runner.rs"]
mod runner;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::RunnerId;
use flotilla::prelude::*;
use flotilla::sharding::DEFAULT_GROUP;
use flotilla::sharding::assignment::{Runner, assign};
use flotilla::transport::ClusterSecret;
use measure::{Run, report};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use cpu::CpuMeter;
use database::BenchDatabase;
use runner::{ChildRunner, Stop};

/// Shards of the bench cluster (the default).
const SHARDS: u32 = 300;
/// The cluster secret every runner of the bench shares.
const SECRET: &str = "flotilla-bench-cluster-secret";

#[derive(Debug, Default)]
struct Bench;

#[entity(max_idle = "1h", mailbox = 1024)]
impl Bench {
    #[rpc]
    async fn ping(&self, n: u64) -> u64 {
        n
    }

    #[rpc(persisted)]
    async fn store(&self, n: u64) -> u64 {
        n
    }

    /// The runner that handled the call.
    #[rpc]
    async fn runner(&self, ctx: &EntityContext) -> String {
        ctx.runner_id().to_string()
    }
}

struct Scale {
    commit_probes: usize,
    volatile_calls: u64,
    persisted_single: u64,
    persisted_many: u64,
    failovers: usize,
}

const FULL: Scale = Scale {
    commit_probes: 200,
    volatile_calls: 200_000,
    persisted_single: 1_000,
    persisted_many: 20_000,
    failovers: 5,
};

const SMOKE: Scale = Scale {
    commit_probes: 10,
    volatile_calls: 1_000,
    persisted_single: 20,
    persisted_many: 256,
    failovers: 1,
};

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if runner::is_child() {
        runner::child_main::<Bench>();
        return;
    }
    let batches = BatchSizes::install();
    let full = std::env::args().any(|a| a == "--bench");
    // `cargo bench ... --bench cluster_pg -- failover` runs the cases whose name contains the word.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let scale = if full { FULL } else { SMOKE };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Declared after the runtime, dropped before it: the schema goes first
    // (also on a panic), then the runner's connections.
    let db = runtime.block_on(BenchDatabase::create());
    runtime.block_on(run(&db, &scale, &filter, &batches));
}

async fn run(db: &BenchDatabase, scale: &Scale, filter: &str, batches: &BatchSizes) {
    let wanted = |name: &str| name.contains(filter);
    let commit = db.commit_latency(scale.commit_probes).await;
    println!("machine: {commit}");

    // Runner A alone owns every shard: persisted calls take the local path.
    let a = Cluster::builder()
        .postgres(db.url())
        .secret(ClusterSecret::new(SECRET).expect("secret is long enough"))
        .runner_id("bench-a")
        .shards(SHARDS)
        .register::<Bench>()
        .start()
        .await
        .expect("start runner A on PostgreSQL");
    let a_id = a.runner_id().clone();
    let a_pid = std::process::id();
    let probes = Probes { db, batches };
    wait_for("runner A to own every shard", || {
        a.owned_shards().len() == SHARDS as usize
    })
    .await;
    let local_ids = Arc::new(entity_ids("e", 1_000, |_| true));
    for id in local_ids.iter() {
        a.client::<Bench>(id).ping(0).await.expect("warm up");
    }
    let name = "persisted call on PostgreSQL, local, 1 caller";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid],
                drive(&a, &local_ids, 1, scale.persisted_single, true),
            )
            .await;
    }
    let name = "persisted call on PostgreSQL, local, 64 callers over 1,000 entities";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid],
                drive(&a, &local_ids, 64, scale.persisted_many, true),
            )
            .await;
    }

    // Runner B joins; A calls the entities on B's shards.
    let b = ChildRunner::spawn(db, "bench-b-0", SECRET, SHARDS).await;
    let b_pid = b.pid();
    let b_shards = wait_balanced(&a, &a_id, b.id()).await;
    let remote_ids = Arc::new(entity_ids("r", 1_000, |shard| b_shards.contains(&shard)));
    for id in remote_ids.iter() {
        a.client::<Bench>(id).ping(0).await.expect("warm up on B");
    }
    let name = "volatile cross-runner call (A -> B), 1 caller";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid, b_pid],
                drive(&a, &remote_ids, 1, scale.volatile_calls / 4, false),
            )
            .await;
    }
    let name = "volatile cross-runner call (A -> B), 64 callers over 1,000 entities";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid, b_pid],
                drive(&a, &remote_ids, 64, scale.volatile_calls, false),
            )
            .await;
    }
    let name = "volatile call from a client-only handle (C -> B), 1 caller";
    if wanted(name) {
        // C: `client_only` in the bench process; it owns nothing and routes
        // every call over the transport, as a web front end would.
        let c = Cluster::builder()
            .postgres(db.url())
            .secret(ClusterSecret::new(SECRET).expect("secret is long enough"))
            .runner_id("bench-client")
            .client_only()
            .shards(SHARDS)
            .register::<Bench>()
            .start()
            .await
            .expect("start the client-only handle");
        c.client::<Bench>(&remote_ids[0])
            .ping(0)
            .await
            .expect("warm up C");
        probes
            .case(
                name,
                &[a_pid, b_pid],
                drive(&c, &remote_ids, 1, scale.volatile_calls / 4, false),
            )
            .await;
        c.shutdown().await;
    }
    let name = "persisted cross-runner call (A -> B), 1 caller";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid, b_pid],
                drive(&a, &remote_ids, 1, scale.persisted_single, true),
            )
            .await;
    }
    let name = "persisted cross-runner call (A -> B), 64 callers over 1,000 entities";
    if wanted(name) {
        probes
            .case(
                name,
                &[a_pid, b_pid],
                drive(&a, &remote_ids, 64, scale.persisted_many, true),
            )
            .await;
    }

    let mut b = Some(b);
    for (how, name) in [
        (Stop::Kill, "failover after SIGKILL"),
        (Stop::Term, "failover after SIGTERM"),
    ] {
        if !wanted(name) {
            continue;
        }
        let mut owned_all = Vec::new();
        let mut answered = Vec::new();
        for round in 0..scale.failovers {
            let child = match b.take() {
                Some(child) => child,
                None => {
                    let id = format!("bench-b-{}-{round}", how.word());
                    ChildRunner::spawn(db, &id, SECRET, SHARDS).await
                }
            };
            // Runner A reads the live set every `membership_poll`: stop B at
            // evenly spread points of that period, not always just after a
            // read (which would time the worst case only).
            let phase = a
                .config()
                .membership_poll
                .mul_f64(round as f64 / scale.failovers as f64);
            let (owned, call) = failover(&a, &a_id, child, how, phase).await;
            owned_all.push(owned);
            answered.push(call);
        }
        report_failover(name, &owned_all, &answered);
    }
    if let Some(b) = b {
        b.stop(Stop::Term).await;
    }
    a.shutdown().await;
}

/// What is printed beside each case's figures.
struct Probes<'a> {
    db: &'a BenchDatabase,
    batches: &'a BatchSizes,
}

impl Probes<'_> {
    /// Runs one case's `calls` and reports them, with runner A's group-commit
    /// transactions and the CPU per call of the processes `runners` and of
    /// their PostgreSQL backends.
    async fn case(&self, name: &str, runners: &[u32], calls: impl Future<Output = Run>) {
        self.batches.take();
        let cpu = CpuMeter::start(runners, self.db.url(), self.db.application_name()).await;
        let run = calls.await;
        let count = run.calls;
        report(name, run);
        self.batches.report();
        if let Some(cpu) = cpu.per_call(count).await {
            println!("  {cpu}");
        }
    }
}

/// The sizes of runner A's group-commit transactions (its
/// `flotilla_group_commit_batch_size` histogram), per case.
struct BatchSizes(Option<Snapshotter>);

impl BatchSizes {
    /// Installs a recorder for this process's metrics (none if another is
    /// installed already).
    fn install() -> Self {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        Self(recorder.install().ok().map(|()| snapshotter))
    }

    /// The batch sizes recorded since the last call.
    fn take(&self) -> Vec<f64> {
        let Some(snapshotter) = &self.0 else {
            return Vec::new();
        };
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "flotilla_group_commit_batch_size")
            .flat_map(|(.., value)| match value {
                DebugValue::Histogram(values) => values.into_iter().map(|v| v.0).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Prints how many transactions runner A committed since the last call
    /// and how many writes (saves and completions) they held on average.
    fn report(&self) {
        let sizes = self.take();
        if !sizes.is_empty() {
            println!(
                "  runner A: {} transactions, {:.1} writes each on average",
                sizes.len(),
                sizes.iter().sum::<f64>() / sizes.len() as f64
            );
        }
    }
}

/// `count` entity ids `<prefix>-<n>` whose shards pass `keep`.
fn entity_ids(prefix: &str, count: usize, keep: impl Fn(ShardId) -> bool) -> Vec<String> {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .filter(|id| keep(ShardId::for_entity(DEFAULT_GROUP, id, SHARDS)))
        .take(count)
        .collect()
}

/// Polls `done` every millisecond; panics after 30 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until A owns exactly its share of {A, B} and B answers for its
/// share; returns B's shards.
async fn wait_balanced(a: &Cluster, a_id: &RunnerId, b_id: &RunnerId) -> HashSet<ShardId> {
    let map = assign(
        DEFAULT_GROUP,
        SHARDS,
        &[Runner::new(a_id.clone(), 1), Runner::new(b_id.clone(), 1)],
    );
    let mine: Vec<ShardId> = map.shards_of(a_id).collect();
    let theirs: HashSet<ShardId> = map.shards_of(b_id).collect();
    wait_for("runner A to hand B its shards", || {
        let mut owned = a.owned_shards();
        owned.sort();
        owned == mine
    })
    .await;
    // B serves its shards once a call there succeeds.
    let probe = entity_ids("balance", 1, |shard| theirs.contains(&shard));
    a.client::<Bench>(&probe[0])
        .ping(1)
        .await
        .expect("runner B answers for its shards");
    theirs
}

/// Stops B (`how`) `phase` after the cluster is balanced, and measures how
/// long until A owns every shard, and until A itself answers a call to an
/// entity of B's former shards (calls made one after another from the stop).
async fn failover(
    a: &Cluster,
    a_id: &RunnerId,
    mut b: ChildRunner,
    how: Stop,
    phase: Duration,
) -> (Duration, Duration) {
    let b_shards = wait_balanced(a, a_id, b.id()).await;
    let probe = entity_ids("probe", 1, |shard| b_shards.contains(&shard)).remove(0);
    // The link to B is open: the probe entity is active there.
    a.client::<Bench>(&probe).ping(1).await.expect("probe on B");
    tokio::time::sleep(phase).await;
    let started = Instant::now();
    b.signal(how);
    // Calls one after another from the stop on, until one is answered by
    // A: B may still answer the first ones after a SIGTERM.
    let call = {
        let a = a.clone();
        let a_id = a_id.to_string();
        tokio::spawn(async move {
            loop {
                let runner = a
                    .client::<Bench>(&probe)
                    .runner()
                    .await
                    .expect("a call to B's former shard succeeds");
                if runner == a_id {
                    return started.elapsed();
                }
            }
        })
    };
    wait_for("runner A to own every shard", || {
        a.owned_shards().len() == SHARDS as usize
    })
    .await;
    let owned = started.elapsed();
    let answered = call.await.expect("probe call task");
    b.wait_exit(how).await;
    (owned, answered)
}

fn report_failover(name: &str, owned: &[Duration], answered: &[Duration]) {
    let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1_000.0);
    let failover: Vec<Duration> = owned
        .iter()
        .zip(answered)
        .map(|(o, c)| (*o).max(*c))
        .collect();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "{name}: median {} ms until A owns every shard and has answered a call there (owned {} ms, answered {} ms; runs: {})",
        ms(&median(failover.clone())),
        ms(&median(owned.to_vec())),
        ms(&median(answered.to_vec())),
        failover.iter().map(ms).collect::<Vec<_>>().join(", ")
    );
}

/// `callers` tasks make `calls` calls in all, each to entity `n % ids.len()`.
async fn drive(
    cluster: &Cluster,
    ids: &Arc<Vec<String>>,
    callers: u64,
    calls: u64,
    persisted: bool,
) -> Run {
    let (cluster, ids) = (cluster.clone(), ids.clone());
    measure::drive(callers, calls, move |n| {
        let client = cluster.client::<Bench>(&ids[(n % ids.len() as u64) as usize]);
        async move {
            let reply = if persisted {
                client.store(n).await
            } else {
                client.ping(n).await
            };
            assert_eq!(reply.expect("call"), n);
        }
    })
    .await
}
