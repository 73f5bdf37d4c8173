//! Singletons and cron on one runner (memory, SQLite) and on two runners in
//! one process (shared memory store, `MemoryRunners`): a plain singleton
//! runs once per acquisition and restarts after failures; cron ticks run
//! once per instant, keep their state across restarts, skip stale ticks
//! after downtime instead of replaying them; health; leadership; hand-over
//! on graceful shutdown with the state.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use flotilla::prelude::*;
use flotilla::singleton::SingletonFuture;
use flotilla::storage::{
    MemoryRunners, MemoryStorage, MessageId, MessageStorage, ShardFilter, StoredMessage,
    StoredReply, UnixMillis, UnprocessedQuery, WriteBatch, WriteOutcome,
};
use flotilla::time::{Clock, ManualClock};
use flotilla::transport::ClusterSecret;
use flotilla::{Singleton, SingletonContext, SingletonOptions, StorageError};
use tokio::sync::Notify;

async fn until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 2026-01-01T00:00:30Z: half a minute before a minute tick.
fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 30)
}

fn minute(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 60 * n)
}

// ---- plain singleton: runs once, restarts after failures -------------------

static PLAIN_RUNS: AtomicU32 = AtomicU32::new(0);

struct Plain;

impl Singleton for Plain {
    const NAME: &'static str = "plain";
    type State = ();
    fn options() -> SingletonOptions {
        SingletonOptions::DEFAULT
    }
    fn run(ctx: SingletonContext) -> SingletonFuture {
        Box::pin(async move {
            assert!(ctx.is_leader(), "a single runner leads");
            assert!(ctx.scheduled_at().is_none());
            // The run sees the cluster context like any handler.
            assert_eq!(flotilla::context::is_leader(), Some(true));
            assert!(flotilla::context::runner_id().is_some());
            assert_eq!(
                flotilla::context::shard_id(),
                Some(ShardId::for_entity("default", "plain", 300))
            );
            let n = PLAIN_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
            match n {
                1 => Err("first run fails".to_owned()),
                2 => panic!("second run panics"),
                _ => Ok(()),
            }
        })
    }
}

#[tokio::test]
async fn a_plain_singleton_restarts_after_errors_and_panics_then_stays_done() {
    let cluster = Cluster::builder()
        .memory()
        .singleton::<Plain>()
        .start()
        .await
        .unwrap();
    assert!(cluster.is_leader());
    until("three runs", Duration::from_secs(5), || {
        PLAIN_RUNS.load(Ordering::SeqCst) >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(PLAIN_RUNS.load(Ordering::SeqCst), 3, "done after Ok");
    let health = cluster.singleton_health();
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].name, "plain");
    assert!(health[0].owned_here && health[0].healthy, "{health:?}");
    assert!(health[0].last_execution.is_some());
    assert!(cluster.shutdown().await);
}

#[tokio::test]
async fn a_duplicate_singleton_name_or_bad_cron_is_refused_at_start() {
    let err = Cluster::builder()
        .memory()
        .singleton::<Plain>()
        .singleton::<Plain>()
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("registered twice"), "{err}");

    struct BadCron;
    impl Singleton for BadCron {
        const NAME: &'static str = "bad-cron";
        type State = ();
        fn options() -> SingletonOptions {
            SingletonOptions {
                cron: Some("every day"),
                ..SingletonOptions::DEFAULT
            }
        }
        fn run(_: SingletonContext) -> SingletonFuture {
            Box::pin(async { Ok(()) })
        }
    }
    let err = Cluster::builder()
        .memory()
        .singleton::<BadCron>()
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad-cron"), "{err}");
}

// ---- cron with a manual clock ----------------------------------------------

/// The ticks a cron singleton ran: (scheduled instant, state counter after).
type Ticks = Mutex<Vec<(SystemTime, u32)>>;

macro_rules! minutely {
    ($ty:ident, $name:literal, $ticks:ident, $skip:expr) => {
        static $ticks: Ticks = Mutex::new(Vec::new());
        struct $ty;
        impl Singleton for $ty {
            const NAME: &'static str = $name;
            type State = u32;
            fn options() -> SingletonOptions {
                SingletonOptions {
                    cron: Some("0 * * * * *"),
                    timezone: Some("Europe/Paris"),
                    skip_if_older_than: $skip,
                }
            }
            fn run(ctx: SingletonContext<u32>) -> SingletonFuture {
                Box::pin(async move {
                    let n = ctx.with_state(|n| {
                        *n += 1;
                        *n
                    });
                    let at = ctx.scheduled_at().ok_or("no tick instant")?;
                    lock(&$ticks).push((at, n));
                    Ok(())
                })
            }
        }
    };
}

minutely!(Minutely, "minutely", MINUTELY, Duration::from_secs(60));

async fn tick(clock: &ManualClock, ticks: &Ticks, expected: usize) {
    // Wait for the singleton to sleep on the clock before moving it.
    until(
        "the singleton waits for its tick",
        Duration::from_secs(5),
        || clock.pending_sleepers() > 0,
    )
    .await;
    clock.advance(Duration::from_secs(60));
    until(&format!("{expected} ticks"), Duration::from_secs(5), || {
        lock(ticks).len() >= expected
    })
    .await;
}

#[tokio::test]
async fn cron_ticks_run_once_per_instant_with_their_state() {
    let clock = Arc::new(ManualClock::starting_at(start_time()));
    let cluster = Cluster::builder()
        .memory()
        .clock(clock.clone())
        .singleton::<Minutely>()
        .start()
        .await
        .unwrap();
    for n in 1..=4 {
        tick(&clock, &MINUTELY, n).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ticks = lock(&MINUTELY).clone();
    assert_eq!(
        ticks,
        (1..=4).map(|n| (minute(n), n as u32)).collect::<Vec<_>>()
    );
    let health = cluster.singleton_health();
    assert!(health[0].healthy, "{health:?}");
    assert!(cluster.shutdown().await);
}

minutely!(Restarted, "restarted", RESTARTED, Duration::from_secs(60));

#[tokio::test]
async fn a_restart_continues_the_chain_and_the_state_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("singletons.db");
    let clock = Arc::new(ManualClock::starting_at(start_time()));
    let cluster = Cluster::builder()
        .sqlite(&path)
        .clock(clock.clone())
        .singleton::<Restarted>()
        .start()
        .await
        .unwrap();
    tick(&clock, &RESTARTED, 1).await;
    tick(&clock, &RESTARTED, 2).await;
    assert!(cluster.shutdown().await);
    // Back 20 s later (within skip_if_older_than): the chain goes on.
    let clock = Arc::new(ManualClock::starting_at(
        clock.now() + Duration::from_secs(20),
    ));
    let cluster = Cluster::builder()
        .sqlite(&path)
        .clock(clock.clone())
        .singleton::<Restarted>()
        .start()
        .await
        .unwrap();
    tick(&clock, &RESTARTED, 3).await;
    tick(&clock, &RESTARTED, 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        lock(&RESTARTED).clone(),
        (1..=4).map(|n| (minute(n), n as u32)).collect::<Vec<_>>(),
        "no tick missing or doubled, the state counts on"
    );
    assert!(cluster.shutdown().await);
}

minutely!(Stale, "stale", STALE, Duration::from_secs(60));

#[tokio::test]
async fn ten_minutes_of_downtime_skip_the_stale_ticks_instead_of_a_burst() {
    let storage = Arc::new(MemoryStorage::new());
    let clock = Arc::new(ManualClock::starting_at(start_time()));
    let cluster = Cluster::builder()
        .storage(Arc::new(storage.share()))
        .clock(clock.clone())
        .singleton::<Stale>()
        .start()
        .await
        .unwrap();
    tick(&clock, &STALE, 1).await;
    tick(&clock, &STALE, 2).await;
    assert!(cluster.shutdown().await);
    // Ten minutes later (minute 12:30): ticks 3..=12 were missed.
    let clock = Arc::new(ManualClock::starting_at(
        clock.now() + Duration::from_secs(600),
    ));
    let cluster = Cluster::builder()
        .storage(Arc::new(storage.share()))
        .clock(clock.clone())
        .singleton::<Stale>()
        .start()
        .await
        .unwrap();
    // The stored tick of minute 3 is skipped; the next one is minute 13.
    until(
        "the singleton waits for minute 13",
        Duration::from_secs(5),
        || clock.pending_sleepers() > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lock(&STALE).len(), 2, "no burst of missed ticks");
    tick(&clock, &STALE, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        lock(&STALE).clone(),
        vec![(minute(1), 1), (minute(2), 2), (minute(13), 3)]
    );
    // The skipped tick is recorded as processed: nothing is left to replay.
    let left = storage
        .unprocessed(UnprocessedQuery {
            ready_at: i64::MAX,
            after: None,
            limit: 100,
            shards: ShardFilter::All,
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "only the next tick waits: {left:?}");
    assert_eq!(left[0].tag, "tick");
    assert_eq!(
        left[0].deliver_at,
        Some(minute(14).duration_since(UNIX_EPOCH).unwrap().as_millis() as i64)
    );
    assert!(cluster.shutdown().await);
}

// ---- health of a cron singleton that does not run --------------------------

static STUCK_RELEASE: Notify = Notify::const_new();
static STUCK_STARTED: AtomicU32 = AtomicU32::new(0);

struct Stuck;

impl Singleton for Stuck {
    const NAME: &'static str = "stuck";
    type State = ();
    fn options() -> SingletonOptions {
        SingletonOptions {
            cron: Some("* * * * *"),
            ..SingletonOptions::DEFAULT
        }
    }
    fn run(_: SingletonContext) -> SingletonFuture {
        Box::pin(async {
            if STUCK_STARTED.fetch_add(1, Ordering::SeqCst) == 0 {
                STUCK_RELEASE.notified().await;
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_cron_singleton_without_a_run_in_twice_its_interval_is_unhealthy() {
    let clock = Arc::new(ManualClock::starting_at(start_time()));
    let cluster = Cluster::builder()
        .memory()
        .clock(clock.clone())
        .singleton::<Stuck>()
        .start()
        .await
        .unwrap();
    until("waiting for its tick", Duration::from_secs(5), || {
        clock.pending_sleepers() > 0
    })
    .await;
    assert!(cluster.singleton_health()[0].healthy);
    // The first tick starts and hangs; two more minutes pass.
    clock.advance(Duration::from_secs(60));
    until("the first tick starts", Duration::from_secs(5), || {
        STUCK_STARTED.load(Ordering::SeqCst) == 1
    })
    .await;
    clock.advance(Duration::from_secs(90));
    assert!(!cluster.singleton_health()[0].healthy, "stuck for 2.5 min");
    assert!(cluster.singleton_health()[0].last_execution.is_none());
    STUCK_RELEASE.notify_one();
    until("the run ends", Duration::from_secs(5), || {
        cluster.singleton_health()[0].last_execution.is_some()
    })
    .await;
    assert!(cluster.singleton_health()[0].healthy);
    assert!(cluster.shutdown().await);
}

// ---- two runners in one process ----------------------------------------------

const SHARDS: u32 = 16;

/// Who runs the counter now, and its count there.
static COUNTER_RUNS: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
static COUNTER_ACTIVE: AtomicU32 = AtomicU32::new(0);
static COUNTER_OVERLAPS: AtomicU32 = AtomicU32::new(0);

#[derive(Default, Serialize, Deserialize)]
struct Count {
    n: u64,
}

struct Counter;

impl Singleton for Counter {
    const NAME: &'static str = "counter";
    type State = Count;
    fn options() -> SingletonOptions {
        SingletonOptions::DEFAULT
    }
    fn run(ctx: SingletonContext<Count>) -> SingletonFuture {
        Box::pin(async move {
            if COUNTER_ACTIVE.fetch_add(1, Ordering::SeqCst) > 0 {
                COUNTER_OVERLAPS.fetch_add(1, Ordering::SeqCst);
            }
            while !ctx.is_stopping() {
                let n = ctx.with_state(|c| {
                    c.n += 1;
                    c.n
                });
                lock(&COUNTER_RUNS).push((ctx.runner_id().to_string(), n));
                tokio::select! {
                    () = ctx.stopped() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            COUNTER_ACTIVE.fetch_sub(1, Ordering::SeqCst);
            // Returning Ok saves the state for the next runner.
            Ok(())
        })
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new("in-process singleton test secret").unwrap()
}

async fn runner(storage: &Arc<MemoryStorage>, registry: &MemoryRunners, id: &str) -> Cluster {
    Cluster::builder()
        .storage(Arc::new(storage.share()))
        .runner_storage(Arc::new(registry.join()))
        .runner_id(id)
        .secret(secret())
        .shards(SHARDS)
        .membership_poll(Duration::from_millis(50))
        .singleton::<Counter>()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_runs_on_one_runner_and_moves_with_its_state_on_shutdown() {
    let storage = Arc::new(MemoryStorage::new());
    let registry = MemoryRunners::new();
    let a = runner(&storage, &registry, "a").await;
    let b = runner(&storage, &registry, "b").await;
    until("both runners own shards", Duration::from_secs(5), || {
        a.owned_shards().len() + b.owned_shards().len() == SHARDS as usize
            && !a.owned_shards().is_empty()
            && !b.owned_shards().is_empty()
    })
    .await;
    let shard = flotilla::ShardId::for_entity("default", "counter", SHARDS);
    let (owner, other) = if a.owned_shards().contains(&shard) {
        (a, b)
    } else {
        (b, a)
    };
    // It may have started on the first runner and moved when the second
    // joined: from now on it runs on the owner only.
    until(
        "the counter runs on the owner",
        Duration::from_secs(5),
        || {
            lock(&COUNTER_RUNS)
                .last()
                .is_some_and(|(r, _)| r == owner.runner_id().as_str())
        },
    )
    .await;
    let settled = lock(&COUNTER_RUNS).len();
    until("the counter counts", Duration::from_secs(5), || {
        lock(&COUNTER_RUNS).len() >= settled + 5
    })
    .await;
    let leaders = [owner.is_leader(), other.is_leader()];
    assert_eq!(
        leaders.iter().filter(|l| **l).count(),
        1,
        "one leader: {leaders:?}"
    );
    let health = owner.singleton_health();
    assert!(health[0].owned_here && health[0].healthy, "{health:?}");
    assert!(!other.singleton_health()[0].owned_here);
    let before = lock(&COUNTER_RUNS)[settled..].to_vec();
    assert!(
        before.iter().all(|(r, _)| r == owner.runner_id().as_str()),
        "only the owner ran it: {before:?}"
    );
    assert!(owner.shutdown().await);
    let last = lock(&COUNTER_RUNS).last().unwrap().1;
    let moved_at = lock(&COUNTER_RUNS).len();
    until(
        "the counter resumes on the other runner",
        Duration::from_secs(5),
        || lock(&COUNTER_RUNS).len() > moved_at,
    )
    .await;
    let (runner, n) = lock(&COUNTER_RUNS)[moved_at].clone();
    assert_eq!(runner, other.runner_id().as_str());
    assert_eq!(n, last + 1, "the state moved with it");
    until("the survivor leads", Duration::from_secs(5), || {
        other.is_leader()
    })
    .await;
    let all = lock(&COUNTER_RUNS).clone();
    assert!(
        all.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "the count never restarts or repeats, whoever runs it: {all:?}"
    );
    assert_eq!(
        COUNTER_OVERLAPS.load(Ordering::SeqCst),
        0,
        "never two at once"
    );
    assert!(other.shutdown().await);
}

// ---- metrics and leftovers ------------------------------------------------------

static GAUGED_RUNS: AtomicU32 = AtomicU32::new(0);

struct Gauged;

impl Singleton for Gauged {
    const NAME: &'static str = "gauged";
    type State = ();
    fn options() -> SingletonOptions {
        SingletonOptions::DEFAULT
    }
    fn run(_: SingletonContext) -> SingletonFuture {
        Box::pin(async {
            GAUGED_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

#[tokio::test]
async fn each_run_sets_the_last_execution_gauge_and_a_leftover_state_save_is_closed() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    // The only test of this file that installs a recorder (one per process).
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // A state save whose completion never committed (a crash in between).
    let storage = Arc::new(MemoryStorage::new());
    let leftover = StoredMessage {
        id: MessageId(42),
        address: flotilla::EntityAddress {
            entity_type: "flotilla.singleton".into(),
            entity_id: "gauged".into(),
            shard: flotilla::ShardId::for_entity("default", "gauged", 300),
        },
        tag: "state".to_owned(),
        key: None,
        payload: Vec::new(),
        headers: Default::default(),
        deliver_at: None,
        created_at: 1,
    };
    storage
        .write(WriteBatch {
            saves: vec![leftover],
            completions: Vec::new(),
        })
        .await
        .unwrap();

    let cluster = Cluster::builder()
        .storage(Arc::new(storage.share()))
        .safety_poll(Duration::from_millis(50))
        .singleton::<Gauged>()
        .start()
        .await
        .unwrap();
    until("the run ends", Duration::from_secs(5), || {
        cluster.singleton_health()[0].last_execution.is_some()
    })
    .await;
    let last = cluster.singleton_health()[0].last_execution.unwrap();
    let expected = last.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let snapshot = snapshotter.snapshot().into_vec();
    let gauge = snapshot.iter().find(|(key, _, _, _)| {
        key.key().name() == "flotilla_singleton_last_execution_seconds"
            && key
                .key()
                .labels()
                .any(|l| l.key() == "name" && l.value() == "gauged")
    });
    match gauge {
        Some((_, _, _, DebugValue::Gauge(v))) => assert_eq!(v.into_inner(), expected),
        other => panic!("no last-execution gauge: {other:?}"),
    }
    let query = || UnprocessedQuery {
        ready_at: i64::MAX,
        after: None,
        limit: 100,
        shards: ShardFilter::All,
    };
    let start = Instant::now();
    while !storage.unprocessed(query()).await.unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the leftover state save is still unprocessed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        storage.reply(MessageId(42)).await.unwrap(),
        Some(StoredReply::Rejected(_))
    ));
    assert_eq!(GAUGED_RUNS.load(Ordering::SeqCst), 1);
    assert!(cluster.shutdown().await);
}

// ---- a completion that fails to commit -------------------------------------------

/// Memory storage whose next write with a completion fails, when armed.
#[derive(Debug)]
struct FailOnce {
    inner: Arc<MemoryStorage>,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl MessageStorage for FailOnce {
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError> {
        if !batch.completions.is_empty() && self.armed.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Corrupt("injected failure".to_owned()));
        }
        self.inner.write(batch).await
    }
    async fn unprocessed(&self, q: UnprocessedQuery) -> Result<Vec<StoredMessage>, StorageError> {
        self.inner.unprocessed(q).await
    }
    async fn next_delivery(
        &self,
        after: UnixMillis,
        shards: &ShardFilter,
    ) -> Result<Option<UnixMillis>, StorageError> {
        self.inner.next_delivery(after, shards).await
    }
    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError> {
        self.inner.reply(id).await
    }
    async fn load_state(&self, t: &str, id: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.load_state(t, id).await
    }
    async fn purge_processed(&self, before: UnixMillis) -> Result<u64, StorageError> {
        self.inner.purge_processed(before).await
    }
    async fn close(&self) {}
}

minutely!(Retried, "retried", RETRIED, Duration::from_secs(60));

#[tokio::test]
async fn a_tick_whose_completion_fails_runs_again_from_the_stored_state() {
    let storage = Arc::new(FailOnce {
        inner: Arc::new(MemoryStorage::new()),
        armed: std::sync::atomic::AtomicBool::new(false),
    });
    let clock = Arc::new(ManualClock::starting_at(start_time()));
    let cluster = Cluster::builder()
        .storage(storage.clone())
        .clock(clock.clone())
        .singleton::<Retried>()
        .start()
        .await
        .unwrap();
    tick(&clock, &RETRIED, 1).await;
    storage.armed.store(true, Ordering::SeqCst);
    tick(&clock, &RETRIED, 2).await;
    // The completion of minute 2 failed: after a backoff it runs again,
    // from the stored state (not from the failed run's).
    until("the retry backs off", Duration::from_secs(5), || {
        clock.pending_sleepers() > 0
    })
    .await;
    clock.advance(Duration::from_millis(100));
    until("the retry", Duration::from_secs(5), || {
        lock(&RETRIED).len() >= 3
    })
    .await;
    tick(&clock, &RETRIED, 4).await;
    assert_eq!(
        lock(&RETRIED).clone(),
        vec![
            (minute(1), 1),
            (minute(2), 2),
            (minute(2), 2),
            (minute(3), 3)
        ]
    );
    assert!(cluster.shutdown().await);
}
