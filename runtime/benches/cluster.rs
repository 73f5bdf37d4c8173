//! Flotilla's single-runner benchmark: latency (p50/p99) and throughput of
//! volatile and persisted calls, and memory per idle entity.
//!
//! `cargo bench -p flotilla --bench cluster` runs the full measurement;
//! without `--bench` (as `cargo test --all-targets` runs it) it does a quick
//! smoke pass so the benchmark itself stays tested.
//!
//! Targets (2-core machine): volatile p50 <= 5 us, p99 <= 30 us, >= 500,000
//! calls/s with 64 callers; persisted on SQLite p50 <= 2 ms with one caller,
//! >= 10,000 msgs/s with 64 callers; <= 1 KiB per idle entity.

mod measure;

use measure::{Run, report};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use flotilla::prelude::*;

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
}

struct Scale {
    volatile_calls: u64,
    persisted_single: u64,
    persisted_many: u64,
    idle_entities: u64,
}

const FULL: Scale = Scale {
    volatile_calls: 400_000,
    persisted_single: 2_000,
    persisted_many: 40_000,
    idle_entities: 100_000,
};

const SMOKE: Scale = Scale {
    volatile_calls: 2_000,
    persisted_single: 50,
    persisted_many: 500,
    idle_entities: 1_000,
};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // `cargo bench -p flotilla --bench cluster -- persisted` runs the cases whose name contains the word.
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
    runtime.block_on(run(&scale, full, &filter));
}

async fn run(scale: &Scale, full: bool, filter: &str) {
    let wanted = |name: &str| name.contains(filter);
    let dir = tempfile::tempdir().expect("temp dir");
    let (fsync_p50, fsync_p99) = fsync_latency(dir.path(), if full { 200 } else { 10 });
    println!(
        "machine: fsync p50 {fsync_p50:.3} ms, p99 {fsync_p99:.3} ms (persisted figures move with it)"
    );

    let cluster = Cluster::builder()
        .memory()
        .register::<Bench>()
        .start()
        .await
        .expect("start");
    let ids: Arc<Vec<String>> = Arc::new((0..1_000).map(|i| format!("e-{i}")).collect());
    // Warm up: activate the 1,000 entities.
    for id in ids.iter() {
        cluster.client::<Bench>(id).ping(0).await.expect("warm up");
    }
    let name = "volatile local call, 1 caller";
    if wanted(name) {
        report(
            name,
            drive(&cluster, &ids, 1, scale.volatile_calls / 4, false).await,
        );
    }
    let name = "volatile local call, 64 callers over 1,000 entities";
    if wanted(name) {
        report(
            name,
            drive(&cluster, &ids, 64, scale.volatile_calls, false).await,
        );
    }
    cluster.shutdown().await;

    let cluster = Cluster::builder()
        .sqlite(dir.path().join("bench.db"))
        .register::<Bench>()
        .start()
        .await
        .expect("start on SQLite");
    let name = "persisted call on SQLite, 1 caller";
    if wanted(name) {
        report(
            name,
            drive(&cluster, &ids, 1, scale.persisted_single, true).await,
        );
    }
    let name = "persisted call on SQLite, 64 callers over 1,000 entities";
    if wanted(name) {
        report(
            name,
            drive(&cluster, &ids, 64, scale.persisted_many, true).await,
        );
    }
    cluster.shutdown().await;

    if wanted("memory per idle active entity") {
        idle_entity_memory(scale.idle_entities).await;
    }
}

/// `callers` tasks make `calls` calls in all, each to entity `n % 1000`.
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

/// RSS growth per active idle entity.
async fn idle_entity_memory(count: u64) {
    let cluster = Cluster::builder()
        .memory()
        .register::<Bench>()
        .start()
        .await
        .expect("start");
    // Warm the allocator and the runtime first.
    cluster
        .client::<Bench>("warm")
        .ping(0)
        .await
        .expect("warm up");
    let before = rss_bytes();
    for i in 0..count {
        cluster
            .client::<Bench>(format!("idle-{i}"))
            .ping(0)
            .await
            .expect("activate");
    }
    let after = rss_bytes();
    assert_eq!(cluster.active_entities("Bench") as u64, count + 1);
    println!(
        "memory per idle active entity: {:.0} bytes ({count} entities, RSS +{:.1} MiB)",
        (after.saturating_sub(before)) as f64 / count as f64,
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0)
    );
    cluster.shutdown().await;
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// p50 and p99 of a 4 KiB write + fdatasync, in milliseconds.
fn fsync_latency(dir: &std::path::Path, rounds: usize) -> (f64, f64) {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("probe file");
    let block = [7u8; 4096];
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            file.write_all(&block).expect("write");
            file.sync_data().expect("fdatasync");
            t.elapsed().as_secs_f64() * 1_000.0
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}
