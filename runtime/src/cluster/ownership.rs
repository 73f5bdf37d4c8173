//! Which shards this runner owns (with their epochs) and where every other
//! shard is served: the routing table every call consults.
//!
//! One runner on SQLite or memory owns every shard with no fence. In a
//! cluster, the membership task fills this table: the shards it acquired
//! (locks held, epochs known) and the assignment of the rest to live runners.
//! Every change bumps a version on a `watch` channel, so a call waiting on a
//! shard that moves re-routes at once instead of at its deadline.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::context::LeaderStatus;
use crate::sharding::assignment::Assignment;
use crate::sharding::{DEFAULT_GROUP, RunnerId, ShardId};
use crate::storage::{Epoch, Fence, ShardFilter};

/// Where a call for a shard goes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// This runner owns the shard; completions carry the fence (none on a
    /// single runner).
    Local(Option<Fence>),
    /// Another live runner is assigned the shard.
    Remote {
        runner: RunnerId,
        address: SocketAddr,
    },
    /// No runner serves the shard right now (none live, or it is moving to
    /// this runner and not yet acquired).
    Unassigned,
}

#[derive(Debug, Default)]
struct Table {
    owned: HashMap<ShardId, Epoch>,
    assignment: Option<Assignment>,
    addresses: HashMap<RunnerId, SocketAddr>,
    live: Vec<RunnerId>,
}

/// The routing table.
#[derive(Debug)]
pub(crate) struct Ownership {
    /// `None`: a single runner owning every shard.
    cluster: Option<RwLock<Table>>,
    me: RunnerId,
    version: watch::Sender<u64>,
    /// The runner owning this shard is the cluster's leader.
    leader_shard: Option<ShardId>,
    leader: Arc<LeaderStatus>,
}

use crate::singleton::LEADER_NAME;

impl Ownership {
    /// One runner owns every shard (SQLite, memory): it leads.
    pub(crate) fn single(me: RunnerId, leader: Arc<LeaderStatus>) -> Self {
        leader.set(true);
        Self {
            cluster: None,
            me,
            version: watch::Sender::new(0),
            leader_shard: None,
            leader,
        }
    }

    /// A cluster member (or client-only process) that owns nothing yet:
    /// it leads while it owns the shard of [`LEADER_NAME`] (of `shards`).
    pub(crate) fn cluster(me: RunnerId, leader: Arc<LeaderStatus>, shards: u32) -> Self {
        leader.set(false);
        Self {
            cluster: Some(RwLock::new(Table::default())),
            me,
            version: watch::Sender::new(0),
            leader_shard: Some(ShardId::for_entity(DEFAULT_GROUP, LEADER_NAME, shards)),
            leader,
        }
    }

    /// Whether this runner leads now.
    pub(crate) fn is_leader(&self) -> bool {
        self.leader.get().unwrap_or(false)
    }

    /// Whether this is a cluster member (as opposed to a single runner).
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    fn read(&self) -> Option<std::sync::RwLockReadGuard<'_, Table>> {
        self.cluster
            .as_ref()
            .map(|t| t.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn update(&self, change: impl FnOnce(&mut Table)) {
        if let Some(table) = &self.cluster {
            let mut table = table
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            change(&mut table);
            if let Some(shard) = &self.leader_shard {
                self.leader.set(table.owned.contains_key(shard));
            }
            drop(table);
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Where a call for `shard` goes now.
    pub(crate) fn route(&self, shard: &ShardId) -> Route {
        let Some(table) = self.read() else {
            return Route::Local(None);
        };
        if let Some(epoch) = table.owned.get(shard) {
            return Route::Local(Some(Fence {
                shard: shard.clone(),
                epoch: *epoch,
            }));
        }
        let owner = table.assignment.as_ref().and_then(|a| a.owner(shard));
        match owner {
            Some(runner) if *runner != self.me => match table.addresses.get(runner) {
                Some(address) => Route::Remote {
                    runner: runner.clone(),
                    address: *address,
                },
                None => Route::Unassigned,
            },
            _ => Route::Unassigned,
        }
    }

    /// The fence of `shard` if this runner owns it: `Some(None)` on a single
    /// runner, `Some(Some(fence))` in a cluster, `None` when not owned.
    pub(crate) fn fence(&self, shard: &ShardId) -> Option<Option<Fence>> {
        match self.read() {
            None => Some(None),
            Some(table) => table.owned.get(shard).map(|epoch| {
                Some(Fence {
                    shard: shard.clone(),
                    epoch: *epoch,
                })
            }),
        }
    }

    /// The storage filter of the shards this runner owns.
    pub(crate) fn filter(&self) -> ShardFilter {
        match self.read() {
            None => ShardFilter::All,
            Some(table) => {
                let mut shards: Vec<ShardId> = table.owned.keys().cloned().collect();
                shards.sort();
                ShardFilter::Only(shards)
            }
        }
    }

    /// The shards owned now, sorted.
    pub(crate) fn owned(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self
            .read()
            .map(|t| t.owned.keys().cloned().collect())
            .unwrap_or_default();
        shards.sort();
        shards
    }

    /// The live runners as last read.
    pub(crate) fn live(&self) -> Vec<RunnerId> {
        match self.read() {
            None => vec![self.me.clone()],
            Some(table) => table.live.clone(),
        }
    }

    /// The shards the current assignment gives this runner.
    pub(crate) fn assigned_to_me(&self) -> HashSet<ShardId> {
        self.read()
            .and_then(|t| {
                t.assignment
                    .as_ref()
                    .map(|a| a.shards_of(&self.me).collect())
            })
            .unwrap_or_default()
    }

    /// Installs a new assignment and the addresses of the live runners.
    pub(crate) fn set_assignment(
        &self,
        assignment: Assignment,
        addresses: HashMap<RunnerId, SocketAddr>,
    ) {
        let changed = self.read().is_some_and(|t| {
            t.assignment.as_ref() != Some(&assignment) || t.addresses != addresses
        });
        if changed {
            self.update(|t| {
                t.live = assignment.runners().to_vec();
                t.assignment = Some(assignment);
                t.addresses = addresses;
            });
        }
    }

    /// Records shards acquired with their epochs.
    pub(crate) fn add_owned(&self, shards: impl IntoIterator<Item = (ShardId, Epoch)>) {
        self.update(|t| t.owned.extend(shards));
    }

    /// Forgets ownership of `shards` (before their locks are released).
    pub(crate) fn remove_owned(&self, shards: &HashSet<ShardId>) {
        self.update(|t| t.owned.retain(|s, _| !shards.contains(s)));
    }

    /// Forgets every owned shard (lock connection lost); returns them.
    pub(crate) fn clear_owned(&self) -> HashSet<ShardId> {
        let mut lost = HashSet::new();
        self.update(|t| lost = t.owned.drain().map(|(s, _)| s).collect());
        lost
    }

    /// A receiver that sees every change of the table.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharding::assignment::{Runner, assign};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_single_runner_owns_every_shard_without_a_fence() {
        let o = Ownership::single(RunnerId::new("me"), Arc::default());
        assert!(o.is_leader());
        assert_eq!(o.route(&ShardId::default_group(3)), Route::Local(None));
        assert_eq!(o.fence(&ShardId::default_group(3)), Some(None));
        assert_eq!(o.filter(), ShardFilter::All);
    }

    #[test]
    fn a_cluster_member_routes_by_ownership_then_assignment() {
        let me = RunnerId::new("a");
        let o = Ownership::cluster(me.clone(), Arc::default(), 8);
        assert!(!o.is_leader());
        let shard = ShardId::default_group(0);
        assert_eq!(o.route(&shard), Route::Unassigned);
        let runners = [
            Runner::new(me.clone(), 1),
            Runner::new(RunnerId::new("b"), 1),
        ];
        let map = assign("default", 8, &runners);
        let theirs = map.shards_of(&RunnerId::new("b")).next().unwrap();
        let mine = map.shards_of(&me).next().unwrap();
        let rx = o.subscribe();
        o.set_assignment(
            map,
            HashMap::from([(me.clone(), addr(1)), (RunnerId::new("b"), addr(2))]),
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            o.route(&theirs),
            Route::Remote {
                runner: RunnerId::new("b"),
                address: addr(2)
            }
        );
        // Assigned to me but not acquired yet: nobody serves it.
        assert_eq!(o.route(&mine), Route::Unassigned);
        o.add_owned([(mine.clone(), Epoch(4))]);
        let fence = Fence {
            shard: mine.clone(),
            epoch: Epoch(4),
        };
        assert_eq!(o.route(&mine), Route::Local(Some(fence.clone())));
        assert_eq!(o.fence(&mine), Some(Some(fence)));
        assert_eq!(o.filter(), ShardFilter::Only(vec![mine.clone()]));
        let leader_shard = ShardId::for_entity(DEFAULT_GROUP, LEADER_NAME, 8);
        o.add_owned([(leader_shard.clone(), Epoch(1))]);
        assert!(
            o.is_leader(),
            "owning the leader shard makes this runner lead"
        );
        o.remove_owned(&HashSet::from([leader_shard]));
        assert!(!o.is_leader());
        assert_eq!(o.clear_owned(), HashSet::from([mine.clone()]));
        assert_eq!(o.fence(&mine), None);
        assert_eq!(o.route(&mine), Route::Unassigned);
    }
}
