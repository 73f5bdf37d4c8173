//! Delivery of stored messages: resume on start, scheduled delivery on a
//! timer, and a slow safety scan; plus the bookkeeping that keeps each message
//! dispatched once (`InFlight`) and routes replies to waiting callers
//! (`ReplyWaiters`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::cluster::ClusterCore;
use crate::snowflake::now_unix_ms;
use crate::storage::{MessageId, ShardFilter, StoredReply, UnprocessedQuery};

/// Messages handed to an entity and not yet completed. A message is
/// dispatched only if it can be claimed here, so the delivery scan never
/// dispatches a message a second time while its first run is under way.
///
/// The scan reads a page of unprocessed messages and then claims them; a
/// message completed in between would look unclaimed although it is already
/// processed. So while a scan runs, released ids are remembered and cannot be
/// claimed until the scan ends (its next page is read after their commit).
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<InFlightSets>);

#[derive(Debug, Default)]
struct InFlightSets {
    active: HashSet<MessageId>,
    scanning: bool,
    released_during_scan: HashSet<MessageId>,
    /// Messages completed here recently, oldest first: a late `Deliver`
    /// for one of them (its sender retried, or raced the resume scan) must
    /// not run it again.
    recent: HashSet<MessageId>,
    recent_order: VecDeque<(Instant, MessageId)>,
}

/// How long, and how many, completed ids are remembered.
const RECENT_FOR: Duration = Duration::from_secs(60);
const RECENT_MAX: usize = 100_000;

impl InFlight {
    /// Claims `id`; false if it is in flight, completed during the current
    /// scan, or completed here recently.
    pub(crate) fn claim(&self, id: MessageId) -> bool {
        let mut sets = lock(&self.0);
        !sets.released_during_scan.contains(&id)
            && !sets.recent.contains(&id)
            && sets.active.insert(id)
    }

    /// Whether `id` is being handled here now.
    pub(crate) fn contains(&self, id: MessageId) -> bool {
        lock(&self.0).active.contains(&id)
    }

    /// Releases `id` after its completion was recorded (or found recorded).
    pub(crate) fn completed(&self, id: MessageId) {
        let now = Instant::now();
        let mut sets = lock(&self.0);
        while let Some((at, old)) = sets.recent_order.front().copied() {
            if now.duration_since(at) < RECENT_FOR && sets.recent_order.len() < RECENT_MAX {
                break;
            }
            sets.recent_order.pop_front();
            sets.recent.remove(&old);
        }
        if sets.recent.insert(id) {
            sets.recent_order.push_back((now, id));
        }
        drop(sets);
        self.release(id);
    }

    pub(crate) fn release(&self, id: MessageId) {
        let mut sets = lock(&self.0);
        sets.active.remove(&id);
        if sets.scanning {
            sets.released_during_scan.insert(id);
        }
    }

    fn begin_scan(&self) {
        let mut sets = lock(&self.0);
        sets.scanning = true;
        sets.released_during_scan.clear();
    }

    fn end_scan(&self) {
        let mut sets = lock(&self.0);
        sets.scanning = false;
        sets.released_during_scan.clear();
    }
}

/// Callers waiting for the reply of a persisted message.
#[derive(Debug, Default)]
pub(crate) struct ReplyWaiters(Mutex<HashMap<MessageId, Vec<oneshot::Sender<StoredReply>>>>);

impl ReplyWaiters {
    /// Registers a waiter. The returned guard removes it if the caller gives up.
    pub(crate) fn register(self: &Arc<Self>, id: MessageId) -> ReplyWait {
        let (tx, rx) = oneshot::channel();
        lock(&self.0).entry(id).or_default().push(tx);
        ReplyWait {
            waiters: self.clone(),
            id,
            rx,
        }
    }

    /// Hands `reply` to every waiter of `id`.
    pub(crate) fn complete(&self, id: MessageId, reply: &StoredReply) {
        let senders = lock(&self.0).remove(&id).unwrap_or_default();
        for sender in senders {
            let _ = sender.send(reply.clone());
        }
    }
}

/// One caller's wait for a reply.
#[derive(Debug)]
pub(crate) struct ReplyWait {
    waiters: Arc<ReplyWaiters>,
    id: MessageId,
    rx: oneshot::Receiver<StoredReply>,
}

impl ReplyWait {
    /// The reply; `None` if the waiters were dropped (shutdown). Cancel safe.
    pub(crate) async fn wait(&mut self) -> Option<StoredReply> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for ReplyWait {
    fn drop(&mut self) {
        let mut map = lock(&self.waiters.0);
        if let Some(senders) = map.get_mut(&self.id) {
            senders.retain(|s| !s.is_closed());
            self.rx.close();
            senders.retain(|s| !s.is_closed());
            if senders.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Messages read per storage round trip by the scan.
const SCAN_PAGE: usize = 512;
/// Retry delay after a mailbox was full or storage failed.
const RETRY: Duration = Duration::from_millis(50);

/// The delivery loop: scans ready messages, dispatches those not in flight,
/// sleeps until the earliest scheduled delivery or the safety poll, and wakes
/// early when a caller schedules a message (`ClusterCore::wake_delivery`).
pub(crate) async fn run(core: Arc<ClusterCore>) {
    let shutdown = core.shutdown.clone();
    loop {
        let retry_soon = scan(&core).await;
        let now = now_unix_ms() as i64;
        let mut wait = if retry_soon {
            RETRY
        } else {
            core.config.safety_poll
        };
        let shards = core.ownership.filter();
        let next = if matches!(&shards, ShardFilter::Only(s) if s.is_empty()) {
            Ok(None)
        } else {
            core.storage.next_delivery(now, &shards).await
        };
        match next {
            Ok(Some(at)) => {
                wait = wait.min(Duration::from_millis((at - now).max(0) as u64));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "reading the next scheduled delivery failed");
                wait = wait.min(RETRY * 10);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = core.wake_delivery.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Dispatches every ready, unprocessed message that is not in flight.
/// Returns true when something should be retried soon.
async fn scan(core: &Arc<ClusterCore>) -> bool {
    core.in_flight.begin_scan();
    let retry_soon = scan_pages(core).await;
    core.in_flight.end_scan();
    retry_soon
}

async fn scan_pages(core: &Arc<ClusterCore>) -> bool {
    let mut after = None;
    let mut retry_soon = false;
    let shards = core.ownership.filter();
    if matches!(&shards, ShardFilter::Only(s) if s.is_empty()) {
        return false; // a cluster member that owns nothing (yet)
    }
    loop {
        if core.shutdown.is_cancelled() {
            return false;
        }
        let query = UnprocessedQuery {
            ready_at: now_unix_ms() as i64,
            after,
            limit: SCAN_PAGE,
            shards: shards.clone(),
        };
        let page = match core.storage.unprocessed(query).await {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%error, "scanning stored messages failed; retrying");
                return true;
            }
        };
        let full_page = page.len() == SCAN_PAGE;
        after = page.last().map(|m| m.id);
        for message in page {
            match core.types.get(&*message.address.entity_type) {
                Some(registered) => {
                    if !registered.erased.dispatch_stored(message) {
                        retry_soon = true;
                    }
                }
                None => {
                    tracing::warn!(
                        entity_type = %message.address.entity_type,
                        message_id = %message.id,
                        "stored message for an entity type this runner does not register; left stored"
                    );
                }
            }
        }
        if !full_page {
            return retry_soon;
        }
    }
}
