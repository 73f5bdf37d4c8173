//! The membership task of a cluster runner: keeps the routing table in step
//! with the live runners, acquires the shards assigned to this runner,
//! hands over the ones assigned elsewhere, and fences itself when it cannot
//! confirm its locks.
//!
//! Each round: confirm the lock connection (at most every `fence_after / 4`,
//! each confirmation bounded by what is left of `fence_after`), read the live
//! runners, compute the assignment, release what moved away (after its
//! handlers finish), acquire what moved here (and resume its messages). A
//! round runs every `membership_poll` and at once on a signal (a runner
//! joined or left, or messages wait on an owned shard).
//!
//! During a graceful shutdown the task goes on confirming the locks (and
//! does nothing else) until the last handlers have recorded their
//! completions; then the runner unregisters.
//!
//! Fencing: if the lock connection fails, or no confirmation succeeded for
//! `fence_after`, every shard is dropped from the table at once, so no
//! entity of them starts and no new message of them is dispatched; handlers
//! under way finish, but storage refuses their completions if another runner
//! has acquired the shard since (epoch check). `fence_after` is below
//! `lock_timeout`, after which PostgreSQL ends a silent lock session, so a
//! runner that is merely slow stops itself before others can take over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ClusterCore;
use crate::sharding::DEFAULT_GROUP;
use crate::sharding::assignment::{Runner, assign};
use crate::sharding::{RunnerId, ShardId};
use crate::storage::{RunnerInfo, RunnerStorage, Signal};

/// The membership state of one runner (or client-only process: `me` is
/// `None`, it only follows the live set for routing).
pub(crate) struct Membership {
    core: Arc<ClusterCore>,
    runners: Arc<dyn RunnerStorage>,
    me: Option<RunnerInfo>,
    registered: bool,
    last_confirmed: Instant,
    next_confirm: Instant,
    metrics: Metrics,
}

struct Metrics {
    owned: metrics::Gauge,
    live: metrics::Gauge,
    fenced: metrics::Counter,
}

impl Membership {
    /// A membership for `me`, registered just now (or a client-only follower).
    pub(crate) fn new(
        core: Arc<ClusterCore>,
        runners: Arc<dyn RunnerStorage>,
        me: Option<RunnerInfo>,
    ) -> Self {
        let now = Instant::now();
        Self {
            registered: me.is_some(),
            core,
            runners,
            me,
            last_confirmed: now,
            next_confirm: now,
            metrics: Metrics {
                owned: metrics::gauge!("flotilla_shards_owned"),
                live: metrics::gauge!("flotilla_runners_live"),
                fenced: metrics::counter!("flotilla_fencing_events_total"),
            },
        }
    }

    fn confirm_every(&self) -> Duration {
        self.core.config.fence_after / 4
    }

    /// Runs rounds until shutdown.
    pub(crate) async fn run(mut self, mut signals: Option<mpsc::Receiver<Signal>>) {
        loop {
            if self.core.membership_stop.is_cancelled() {
                return;
            }
            self.round().await;
            let now = Instant::now();
            let mut wake = now + self.core.config.membership_poll;
            if self.me.is_some() {
                wake = wake.min(self.next_confirm.max(now));
            }
            loop {
                let signal = async {
                    match &mut signals {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = self.core.membership_stop.cancelled() => return,
                    () = tokio::time::sleep_until(wake) => break,
                    signal = signal => match signal {
                        Some(Signal::MessagesReady(shard)) => {
                            if self.core.ownership.fence(&shard).is_some() {
                                self.core.wake_delivery.notify_one();
                            }
                        }
                        Some(Signal::MembershipChanged) => break,
                        Some(Signal::Lagged) => {
                            self.core.wake_delivery.notify_one();
                            break;
                        }
                        None => signals = None,
                    },
                }
            }
        }
    }

    /// One round: locks, live set, assignment, hand-over.
    pub(crate) async fn round(&mut self) {
        if self.me.is_some() && !self.check_locks().await {
            return;
        }
        if self.core.shutdown.is_cancelled() {
            // Shutting down: only keep the locks confirmed while the last
            // handlers record their completions; take nothing new.
            return;
        }
        let budget = self.core.config.fence_after;
        let live = match tokio::time::timeout(budget, self.runners.live_runners()).await {
            Ok(Ok(live)) => live,
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading the live runners failed");
                return;
            }
            Err(_) => {
                tracing::warn!(?budget, "reading the live runners timed out");
                return;
            }
        };
        let weighted: Vec<Runner> = live
            .iter()
            .map(|r| Runner::new(r.id.clone(), r.weight))
            .collect();
        let assignment = assign(DEFAULT_GROUP, self.core.config.shards, &weighted);
        let addresses: HashMap<RunnerId, std::net::SocketAddr> =
            live.iter().map(|r| (r.id.clone(), r.address)).collect();
        self.metrics.live.set(live.len() as f64);
        self.core.ownership.set_assignment(assignment, addresses);
        if self.registered {
            self.hand_over().await;
        }
        self.metrics
            .owned
            .set(self.core.ownership.owned().len() as f64);
    }

    /// Confirms the lock connection when due; re-registers after a loss.
    /// Returns false when this runner holds no valid locks now.
    async fn check_locks(&mut self) -> bool {
        let Some(me) = self.me.clone() else {
            self.keep_lease().await;
            return true;
        };
        let fence_after = self.core.config.fence_after;
        if !self.registered && self.core.shutdown.is_cancelled() {
            return false; // never join again while leaving
        }
        if !self.registered {
            match self.runners.register(&me).await {
                Ok(()) => {
                    tracing::info!(runner = %me.id, "registered again after losing the lock connection");
                    if !self.lease().await {
                        return false;
                    }
                    self.registered = true;
                    self.last_confirmed = Instant::now();
                    self.next_confirm = self.last_confirmed + self.confirm_every();
                }
                Err(error) => {
                    tracing::warn!(%error, "registering the runner failed; retrying");
                    return false;
                }
            }
        }
        if self.last_confirmed.elapsed() >= fence_after {
            self.fence("shard locks not confirmed within fence_after");
            return false;
        }
        if Instant::now() >= self.next_confirm {
            let budget = fence_after.saturating_sub(self.last_confirmed.elapsed());
            match tokio::time::timeout(budget, self.runners.confirm()).await {
                Ok(Ok(())) => {
                    self.last_confirmed = Instant::now();
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "the lock connection failed");
                    self.fence("the lock connection failed");
                    return false;
                }
                Err(_) => {
                    self.fence("shard locks not confirmed within fence_after");
                    return false;
                }
            }
            self.next_confirm = Instant::now() + self.confirm_every();
        }
        true
    }

    /// Leases a snowflake machine id on the current lock session and makes
    /// the generator use it. False if that failed (tried again next round).
    async fn lease(&mut self) -> bool {
        match self.runners.lease_machine_id(&self.core.runner).await {
            Ok(id) => {
                self.core.ids.set_machine_id(id);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "leasing a snowflake machine id failed");
                false
            }
        }
    }

    /// A client-only process keeps the session of its machine id lease
    /// alive (PostgreSQL ends a silent one after `lock_timeout`), and leases
    /// again if it was lost.
    async fn keep_lease(&mut self) {
        if Instant::now() < self.next_confirm {
            return;
        }
        self.next_confirm = Instant::now() + self.confirm_every();
        if let Err(error) = self.runners.confirm().await {
            tracing::debug!(%error, "the machine id lease was lost; leasing again");
            self.lease().await;
        }
    }

    /// Stops serving every shard at once: the locks may be gone.
    fn fence(&mut self, reason: &str) {
        self.registered = false;
        let lost = self.core.ownership.clear_owned();
        self.metrics.fenced.increment(1);
        self.metrics.owned.set(0.0);
        if !lost.is_empty() {
            tracing::error!(
                shards = lost.len(),
                reason,
                "fenced: stopping the handlers of every shard"
            );
            for registered in self.core.types.values() {
                registered.erased.stop_shards(&lost);
            }
        }
    }

    /// Releases the shards assigned elsewhere (after their handlers finish)
    /// and acquires the ones assigned here.
    async fn hand_over(&mut self) {
        let core = &self.core;
        let desired = core.ownership.assigned_to_me();
        let owned: HashSet<ShardId> = core.ownership.owned().into_iter().collect();
        let leaving: HashSet<ShardId> = owned.difference(&desired).cloned().collect();
        if !leaving.is_empty() {
            core.ownership.remove_owned(&leaving);
            for registered in core.types.values() {
                registered.erased.stop_shards(&leaving);
            }
            // Let handlers under way record their completions while the
            // locks are still held; bounded so the locks stay confirmed.
            let bound = Instant::now()
                + core
                    .config
                    .shutdown_timeout
                    .min(core.config.fence_after / 2);
            while Instant::now() < bound
                && core
                    .types
                    .values()
                    .any(|t| t.erased.active_in(&leaving) > 0)
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut shards: Vec<ShardId> = leaving.into_iter().collect();
            shards.sort();
            // Bounded: a lock call that hangs (a lock wait in the database)
            // must not stop the loop that confirms the locks. Dropping it
            // drops the lock session, which the fence below accounts for.
            let bound = core.config.fence_after / 2;
            let released = tokio::time::timeout(bound, self.runners.release(&shards))
                .await
                .unwrap_or_else(|_| Err(timed_out("releasing shards", bound)));
            match released {
                Ok(()) => {
                    tracing::debug!(shards = shards.len(), "released shards assigned elsewhere");
                    // The new owners take them now rather than at their next poll.
                    if let Err(error) = self.runners.signal(Signal::MembershipChanged).await {
                        tracing::debug!(%error, "signalling the release failed");
                    }
                }
                Err(error) => {
                    // The lock connection failed: every lock may be gone.
                    tracing::warn!(%error, "releasing shards failed");
                    self.fence("the lock connection failed while releasing shards");
                    return;
                }
            }
        }
        let mut wanted: Vec<ShardId> = desired.difference(&owned).cloned().collect();
        if wanted.is_empty() {
            return;
        }
        wanted.sort();
        let bound = core.config.fence_after / 2;
        let acquired = tokio::time::timeout(bound, self.runners.acquire(&wanted))
            .await
            .unwrap_or_else(|_| Err(timed_out("acquiring shards", bound)));
        match acquired {
            Ok(taken) if !taken.is_empty() => {
                tracing::debug!(shards = taken.len(), "acquired shards");
                core.ownership.add_owned(taken);
                // Resume their stored messages now.
                core.wake_delivery.notify_one();
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "acquiring shards failed");
                self.fence("the lock connection failed while acquiring shards");
            }
        }
    }
}

/// The error of a lock call that did not finish within `bound`.
fn timed_out(what: &str, bound: Duration) -> crate::error::StorageError {
    crate::error::StorageError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} took longer than {bound:?}"),
    ))
}
