//! A Flotilla runner process for the cluster tests.
//!
//! Reads its configuration from `FLOTILLA_*` variables, registers the test
//! entities, starts, prints `READY <runner_id> <transport address>` on stdout,
//! serves until SIGTERM or Ctrl-C, shuts down gracefully and exits 0.
//!
//! Commands on stdin, one per line:
//! - `BURST <entity> <key> <count>`: sends `count` concurrent persisted
//!   `Probe::record` calls with primary key `key` to `entity` from this
//!   process, then prints `BURST-DONE ok=<n> err=<n> distinct=<n> first=<reply>`
//!   (`first=` is the first reply, or the first error if none succeeded).
//!
//! With `FLOTILLA_TEST_PARENT_WATCH=1` the process exits (code 3) when its
//! stdin closes: the test that started it is gone.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;

use flotilla::prelude::*;
use flotilla_cluster_tests::{
    CLOCK_OFFSET_ENV, OffsetClock, PARENT_WATCH_ENV, Probe, SINGLETONS_ENV, TestCounter,
    TestTicker, Work,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = match ClusterConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotilla-test-node: bad configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let mut builder = Cluster::builder().config(config).register::<Probe>();
    if std::env::var(SINGLETONS_ENV).is_ok_and(|v| v == "1") {
        builder = builder.singleton::<TestTicker>().singleton::<TestCounter>();
    }
    if let Ok(ms) = std::env::var(CLOCK_OFFSET_ENV) {
        let Ok(ms) = ms.parse::<u64>() else {
            eprintln!("flotilla-test-node: bad {CLOCK_OFFSET_ENV}={ms:?}");
            return ExitCode::from(2);
        };
        builder = builder.clock(std::sync::Arc::new(OffsetClock::new(
            std::time::Duration::from_millis(ms),
        )));
    }
    let cluster = match builder.start().await {
        Ok(cluster) => cluster,
        Err(error) => {
            eprintln!("flotilla-test-node: start failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Listen for SIGTERM before saying READY: a SIGTERM sent right after
    // READY must stop the runner gracefully, not kill it by default action.
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(sigterm) => sigterm,
        Err(error) => {
            eprintln!("flotilla-test-node: cannot listen for SIGTERM: {error}");
            return ExitCode::FAILURE;
        }
    };
    let address = cluster
        .transport_address()
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    say(&format!("READY {} {address}", cluster.runner_id()));
    let watch_parent = std::env::var(PARENT_WATCH_ENV).is_ok_and(|v| v == "1");
    tokio::spawn(commands(cluster.clone(), watch_parent));
    tokio::select! {
        () = flotilla::shutdown_signal() => {}
        _ = sigterm.recv() => {}
    }
    tracing::info!("shutdown signal: stopping gracefully");
    let finished = cluster.shutdown().await;
    say(&format!("STOPPED finished={finished}"));
    // Not a return: the runtime would wait for the blocking read of stdin.
    std::process::exit(0)
}

/// One line on stdout, flushed at once (the harness reads it live).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads commands from stdin until it closes.
async fn commands(cluster: Cluster, watch_parent: bool) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["BURST", entity, key, count] => match count.parse::<usize>() {
                Ok(count) => {
                    tokio::spawn(burst(
                        cluster.clone(),
                        entity.to_string(),
                        key.to_string(),
                        count,
                    ));
                }
                Err(_) => say(&format!("ERROR bad count in {line:?}")),
            },
            _ => say(&format!("ERROR unknown command {line:?}")),
        }
    }
    if watch_parent {
        eprintln!("flotilla-test-node: stdin closed, the test is gone: exiting");
        std::process::exit(3);
    }
}

/// `count` concurrent sends of one key from this process.
async fn burst(cluster: Cluster, entity: String, key: String, count: usize) {
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let probe = cluster.client::<Probe>(&entity);
            let key = key.clone();
            tokio::spawn(async move { probe.record(key, Work::ANNOUNCED).await })
        })
        .collect();
    let mut ok = 0;
    let mut replies = BTreeSet::new();
    let mut errors = Vec::new();
    for call in calls {
        match call.await {
            Ok(Ok(receipt)) => {
                ok += 1;
                replies.insert(receipt.to_string());
            }
            Ok(Err(error)) => errors.push(error.to_string()),
            Err(join) => errors.push(format!("task failed: {join}")),
        }
    }
    let first = replies
        .iter()
        .next()
        .cloned()
        .or_else(|| errors.first().cloned())
        .unwrap_or_default();
    say(&format!(
        "BURST-DONE ok={ok} err={} distinct={} first={first}",
        errors.len(),
        replies.len()
    ));
}
