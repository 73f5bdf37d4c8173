//! What the SQLite backend sustains on this machine (run explicitly).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::storage::{Completion, MessageStorage, WriteBatch};

use super::fixtures::*;

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks of 10 ms.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Not a pass/fail test: prints what the backend sustains on this machine.
/// `cargo test --release -p flotilla --test storage_conformance -- --ignored --nocapture group_commit`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn group_commit_throughput_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage: Arc<dyn MessageStorage> = Arc::new(open_sqlite(&path).await);

    // One message's round trip: its save commits, then its completion.
    let mut latencies = Vec::new();
    for id in 1..=500_i64 {
        let started = Instant::now();
        save(&*storage, vec![keyed(id, "a", &id.to_string())]).await;
        complete(&*storage, vec![completion(id, b"ok")]).await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "one message alone (2 commits): p50 {:?}, p99 {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );

    // Steady state under 64 concurrent callers: each commit holds the saves
    // of 64 new messages and the completions of the 64 before them.
    let per_batch = 64_i64;
    let rounds = 400_i64;
    let new_messages = |round: i64| -> Vec<i64> {
        (0..per_batch)
            .map(|i| 1_000_000 + round * per_batch + i)
            .collect()
    };
    let mut batch_times = Vec::new();
    let cpu_before = cpu_time();
    let started = Instant::now();
    for round in 0..=rounds {
        let saves = if round < rounds {
            new_messages(round)
                .iter()
                .map(|id| keyed(*id, &format!("e{}", id % 97), &id.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let completions = if round > 0 {
            new_messages(round - 1)
                .iter()
                .map(|id| Completion {
                    state: Some(state(&format!("e{}", id % 97), b"state")),
                    ..completion(*id, b"ok")
                })
                .collect()
        } else {
            Vec::new()
        };
        let batch_started = Instant::now();
        storage
            .write(WriteBatch { saves, completions })
            .await
            .unwrap();
        batch_times.push(batch_started.elapsed());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    batch_times.sort();
    let messages = (rounds * per_batch) as f64;
    println!(
        "{per_batch} saves + {per_batch} completions per commit: {:.0} messages/s; \
         commit p50 {:?}, p99 {:?}; CPU {:.1} µs per message",
        messages / elapsed.as_secs_f64(),
        batch_times[batch_times.len() / 2],
        batch_times[batch_times.len() * 99 / 100],
        cpu.as_secs_f64() * 1e6 / messages,
    );
    storage.close().await;
}
