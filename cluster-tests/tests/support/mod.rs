//! What the scenarios share: starting a cluster, picking entity ids on
//! chosen shards, sending many persisted calls and counting what came back.
#![allow(dead_code, unreachable_pub)]

pub mod raw_transport;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flotilla::prelude::*;
use flotilla_cluster_tests::{ClusterSettings, Probe, Receipt, TestCluster, Work};

/// The runner binary of this package.
pub const NODE: &str = env!("CARGO_BIN_EXE_flotilla-test-node");

/// How long ownership may take to settle after runners start.
pub const SETTLE: Duration = Duration::from_secs(20);

/// Starts a cluster of the test node.
pub async fn start(settings: ClusterSettings) -> TestCluster {
    TestCluster::start(NODE, settings)
        .await
        .expect("start the test cluster")
}

/// `count` entity ids `<prefix>-<n>` whose shard is in `shards`.
pub fn entities_on(
    shards: &BTreeSet<u32>,
    total_shards: u32,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .filter(|id| shards.contains(&flotilla::sharding::shard_index(id, total_shards)))
        .take(count)
        .collect()
}

/// The shards `runner` owns in `owners`.
pub fn shards_of(owners: &BTreeMap<u32, String>, runner: &str) -> BTreeSet<u32> {
    owners
        .iter()
        .filter(|(_, o)| o.as_str() == runner)
        .map(|(s, _)| *s)
        .collect()
}

/// The variant name of an error, for counting retries by kind.
pub fn kind<E: std::fmt::Debug>(error: &E) -> String {
    let text = format!("{error:?}");
    text.split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One persisted call, retried with the same key (so it stays one message)
/// after an infrastructure error, until `deadline`. Returns the reply (or
/// the last error) and the kinds of the errors retried.
pub async fn record_until_ok(
    probe: &flotilla_cluster_tests::ProbeClient,
    key: &str,
    work: Work,
    deadline: Instant,
) -> (Result<Receipt, String>, Vec<String>) {
    let mut retried = Vec::new();
    loop {
        match probe.record(key.to_owned(), work).await {
            Ok(receipt) => return (Ok(receipt), retried),
            Err(ClusterError::Handler(e)) => return (Err(format!("handler error: {e}")), retried),
            Err(e) if Instant::now() >= deadline => {
                return (
                    Err(format!("{e} (after {} retries)", retried.len())),
                    retried,
                );
            }
            Err(e) => {
                retried.push(kind(&e));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a batch of sends came back with.
#[derive(Debug, Default)]
pub struct Sent {
    /// Key → reply.
    pub receipts: BTreeMap<String, Receipt>,
    /// Key → the error it ended with.
    pub failures: BTreeMap<String, String>,
    /// Error kind → how many times a call was retried after it.
    pub retries: BTreeMap<String, usize>,
    /// Key → the errors its call was retried after (keys with none are absent).
    pub retried_keys: BTreeMap<String, Vec<String>>,
}

impl Sent {
    /// Adds one call's outcome.
    pub fn add(&mut self, key: String, result: Result<Receipt, String>, retried: Vec<String>) {
        for kind in &retried {
            *self.retries.entry(kind.clone()).or_default() += 1;
        }
        if !retried.is_empty() {
            self.retried_keys.insert(key.clone(), retried);
        }
        match result {
            Ok(receipt) => {
                assert_eq!(receipt.key, key, "a caller got another message's reply");
                self.receipts.insert(key, receipt);
            }
            Err(error) => {
                self.failures.insert(key, error);
            }
        }
    }

    /// Asserts that every call got its reply, the first time: the runtime
    /// retries within the call's deadline by itself, so a caller never needs
    /// to. (A retry with the same key is still one message; the helper
    /// retries so that a failure here tells a lost message from a lost or
    /// late reply.)
    pub fn assert_all_replied_first_time(&self, expected: usize) {
        assert!(
            self.failures.is_empty(),
            "{} sends never got a reply, e.g. {:?}",
            self.failures.len(),
            self.failures.iter().next()
        );
        assert_eq!(self.receipts.len(), expected);
        assert!(
            self.retried_keys.is_empty(),
            "{} calls failed before a retry with the same key got the reply (so the message \
             was handled, but its first call was not answered): {:?}, e.g. {:?}",
            self.retried_keys.len(),
            self.retries,
            self.retried_keys.iter().next()
        );
    }
}

/// Sends `(entity, key)` messages as persisted `record` calls from
/// `senders` concurrent tasks of `client`, each retried until `within`
/// from now; bumps `done` after each reply.
pub async fn send_all(
    client: Cluster,
    messages: Vec<(String, String)>,
    senders: usize,
    work: Work,
    done: Arc<AtomicUsize>,
    within: Duration,
) -> Sent {
    let deadline = Instant::now() + within;
    let messages = Arc::new(messages);
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            let client = client.clone();
            let messages = messages.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for (entity, key) in messages.iter().skip(sender).step_by(senders) {
                    let probe = client.client::<Probe>(entity);
                    let (result, retried) = record_until_ok(&probe, key, work, deadline).await;
                    if result.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    out.push((key.clone(), result, retried));
                }
                out
            })
        })
        .collect();
    let mut sent = Sent::default();
    for task in tasks {
        for (key, result, retried) in task.await.expect("a sender panicked") {
            sent.add(key, result, retried);
        }
    }
    sent
}

/// Polls `condition` every 20 ms; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that every key of `keys` has exactly one audit row and that no
/// other key has any.
pub fn assert_exactly_once(counts: &BTreeMap<String, usize>, keys: &BTreeSet<String>) {
    let missing: Vec<&String> = keys.iter().filter(|k| !counts.contains_key(*k)).collect();
    let doubled: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let strangers: Vec<&String> = counts.keys().filter(|k| !keys.contains(*k)).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && strangers.is_empty(),
        "audit: {} of {} keys missing (first: {:?}), {} recorded more than once (first: {:?}), \
         {} unexpected (first: {:?})",
        missing.len(),
        keys.len(),
        missing.first(),
        doubled.len(),
        doubled.first(),
        strangers.len(),
        strangers.first()
    );
}

/// How many `STARTED <key> ...` lines (handler runs) each key has across
/// `cluster`'s runners, for keys starting with `prefix`.
pub fn handler_runs(cluster: &TestCluster, prefix: &str) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for runner in cluster.runners() {
        for line in runner.stdout_lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("STARTED")
                && let Some(key) = words.next()
                && key.starts_with(prefix)
            {
                *runs.entry(key.to_owned()).or_default() += 1;
            }
        }
    }
    runs
}

/// Every `STARTED <key> ...` line for `key`, for diagnostics.
pub fn started_lines(cluster: &TestCluster, key: &str) -> Vec<String> {
    let prefix = format!("STARTED {key} ");
    cluster
        .runners()
        .iter()
        .flat_map(|r| r.stdout_lines())
        .filter(|l| l.starts_with(&prefix))
        .collect()
}

/// Keys whose handler started more than once on the same runner under the
/// same epoch (a double dispatch: a re-run is only allowed after the
/// ownership moved), with their `STARTED` lines.
pub fn runs_repeated_under_one_owner(cluster: &TestCluster, prefix: &str) -> Vec<Vec<String>> {
    let mut by_owner: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    for runner in cluster.runners() {
        for line in runner.stdout_lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["STARTED", key, runner, epoch, ..] = words.as_slice()
                && key.starts_with(prefix)
            {
                by_owner
                    .entry((key.to_string(), runner.to_string(), epoch.to_string()))
                    .or_default()
                    .push(line.clone());
            }
        }
    }
    by_owner
        .into_values()
        .filter(|lines| lines.len() > 1)
        .collect()
}
