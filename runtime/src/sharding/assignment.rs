//! Which runner owns which shard: a pure function of the live-runner set.
//!
//! There is no coordinator. Every runner reads the same set of live runners
//! from storage and calls [`assign`]; because the function is deterministic
//! and does not depend on the order of its input, every runner computes the
//! same map.
//!
//! # The algorithm: rendezvous hashing with bounded loads
//!
//! Every (shard, runner) pair gets a *key* from a fixed hash; a smaller key
//! means the shard prefers that runner more. Each runner has a *quota*
//! proportional to its weight. Pairs are then taken in ascending key order,
//! and a pair is used when its shard is still unplaced and its runner is
//! still under quota. The result is stable: if a shard prefers another
//! runner over its owner, that runner was already full of shards it prefers.
//!
//! Why rendezvous hashing and not a ring with virtual nodes: rendezvous needs
//! no tuning (no virtual-node count trading memory for balance), weights are
//! exact rather than rounded to a number of ring points, and with a few
//! hundred shards and at most a few hundred runners computing every pair is
//! cheap (300 shards × 100 runners: about 0.3 ms in a release build). Why
//! the bounded-load pass goes in key order rather than in shard order: the
//! outcome then does not depend on the numbering of shards, and it is
//! characterised by a property a test can check (stability), not by a loop.
//!
//! # Bounds (each checked by a property test below)
//!
//! * Every shard has exactly one owner (when there is at least one runner).
//! * Balance: a runner of weight `w` out of a total `W` owns either
//!   `floor(shards * w / W)` or `ceil(shards * w / W)` shards. With equal
//!   weights that is `floor(shards / n)` or `ceil(shards / n)`.
//! * Movement on a join (`n` → `n + 1` runners): at most
//!   `5 * ceil(shards / (n + 1)) + 24` shards change owner. Measured worst
//!   over 10 000 random cases: `4 * ceil(shards / (n + 1)) + 17`. On
//!   average, with 300 shards, a join moves 1.07 × the new runner's ideal
//!   share with 3 runners, 1.3 × with 10, 1.8 × with 30, 2.5 × with 100.
//! * Movement on a leave (`n + 1` → `n`): every shard of the leaver moves; of
//!   the others at most `4 * ceil(shards / n) + 24` move (measured worst:
//!   `3 * ceil(shards / n) + 18`).
//!
//! Exact balance is what costs movement: as quotas shrink or grow by one,
//! pushed-out shards take their next choice and may push out another. Plain
//! rendezvous (no quotas) would move exactly the ideal share but leave the
//! busiest runner with 2.8 × the average load at 300 shards on 100 runners
//! (1.7 × on 30). Quotas with slack (`floor + 1`, `+ 2`, `+ 3`, measured)
//! do worse where it matters: when the floor itself drops, every quota
//! drops at once (300 shards, 100 → 101 runners: 19 ×, 9 × and 4 × the
//! ideal share move on average, against 2.5 × here). Exact quotas always add
//! up to `shards`, so a join takes from the others only the places the new
//! runner fills.
//!
//! # The hash (never change it)
//!
//! It decides ownership across versions of the binary: runners on two
//! versions must agree. It is FNV-1a (64-bit) over the runner id's UTF-8
//! bytes and over `group`, a `0xff` byte (which UTF-8 never contains) and the
//! shard index as 4 little-endian bytes; the pair hash is the splitmix64
//! finaliser of `shard_hash ^ splitmix64(runner_hash)`. Weighted rendezvous
//! compares `-log2(u) / w` with `u` the pair hash read as a fraction; the
//! logarithm is an integer approximation (`assignment/hash.rs`) so no float
//! library or platform can change a result. Golden tests pin all of it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use super::{RunnerId, ShardId};

mod hash;

use hash::{PreparedRunner, pair_key, shard_hash};

/// One live runner as seen by the assignment: its id and its relative
/// capacity.
///
/// ```
/// use flotilla::RunnerId;
/// use flotilla::sharding::assignment::Runner;
/// let big = Runner::new(RunnerId::new("10.0.0.7:7400"), 2);
/// assert_eq!(big.weight, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Runner {
    /// The runner's id.
    pub id: RunnerId,
    /// Relative capacity, at least 1: a runner of weight 2 gets about twice
    /// the shards of a runner of weight 1. A weight of 0 counts as 1 (a live
    /// runner always takes its share; drain it by removing it).
    pub weight: u32,
}

impl Runner {
    /// A runner with `weight` (0 counts as 1).
    pub fn new(id: RunnerId, weight: u32) -> Self {
        Self { id, weight }
    }
}

/// The shard → runner map of one shard group, with lookups both ways.
///
/// Built by [`assign`]. With no runners (or no shards) it is empty: no shard
/// has an owner, and every lookup answers `None` or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    group: Arc<str>,
    /// Distinct runners, sorted by id.
    runners: Vec<RunnerId>,
    /// `owner[index]` is a position in `runners`; empty when `runners` is.
    owner: Vec<u32>,
    /// `by_runner[position]` lists that runner's shard indices, ascending.
    by_runner: Vec<Vec<u32>>,
}

impl Assignment {
    /// The shard group this map is for.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// True when no shard has an owner (no runners, or no shards).
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// The number of shards that have an owner: all of them, or none.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// The distinct runners taking part, sorted by id.
    pub fn runners(&self) -> &[RunnerId] {
        &self.runners
    }

    /// The owner of `shard`, or `None` when the map is empty, the shard is
    /// of another group, or its index is out of range.
    pub fn owner(&self, shard: &ShardId) -> Option<&RunnerId> {
        if shard.group() != &*self.group {
            return None;
        }
        self.owner_of_index(shard.index())
    }

    /// The owner of the shard with `index` in this map's group.
    pub fn owner_of_index(&self, index: u32) -> Option<&RunnerId> {
        let position = *self.owner.get(index as usize)?;
        self.runners.get(position as usize)
    }

    /// The shard indices `runner` owns, ascending; empty for an unknown runner.
    pub fn shard_indices_of(&self, runner: &RunnerId) -> &[u32] {
        match self.runners.binary_search(runner) {
            Ok(position) => self.by_runner.get(position).map_or(&[], Vec::as_slice),
            Err(_) => &[],
        }
    }

    /// The shards `runner` owns, ascending by index.
    pub fn shards_of<'a>(&'a self, runner: &RunnerId) -> impl Iterator<Item = ShardId> + 'a {
        self.shard_indices_of(runner)
            .iter()
            .map(|&index| ShardId::new(self.group.clone(), index))
    }

    /// Every (shard index, owner) pair, ascending by index.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &RunnerId)> + '_ {
        (0u32..)
            .zip(&self.owner)
            .filter_map(|(index, &position)| Some((index, self.runners.get(position as usize)?)))
    }

    /// Indices of the shards whose owner differs between `previous` and
    /// `self` (a shard owned in only one of them counts as moved).
    pub fn moved_since(&self, previous: &Assignment) -> Vec<u32> {
        let shards = self.owner.len().max(previous.owner.len());
        (0..shards as u32)
            .filter(|&index| self.owner_of_index(index) != previous.owner_of_index(index))
            .collect()
    }
}

/// Assigns the `shards` shards of `group` to `runners`.
///
/// Deterministic and independent of the order of `runners`; a runner id
/// listed twice counts once, with the larger weight. See the [module
/// documentation](self) for the algorithm and its bounds.
///
/// ```
/// use flotilla::RunnerId;
/// use flotilla::sharding::assignment::{Runner, assign};
/// let runners = [
///     Runner::new(RunnerId::new("a"), 1),
///     Runner::new(RunnerId::new("b"), 1),
///     Runner::new(RunnerId::new("c"), 1),
/// ];
/// let map = assign("default", 300, &runners);
/// for runner in map.runners() {
///     assert_eq!(map.shard_indices_of(runner).len(), 100);
/// }
/// assert!(assign("default", 300, &[]).is_empty());
/// ```
pub fn assign(group: &str, shards: u32, runners: &[Runner]) -> Assignment {
    let runners = distinct_by_id(runners);
    let group: Arc<str> = Arc::from(group);
    if runners.is_empty() || shards == 0 {
        return Assignment {
            group,
            by_runner: vec![Vec::new(); runners.len()],
            runners: runners.into_iter().map(|runner| runner.id).collect(),
            owner: Vec::new(),
        };
    }
    let quotas = Quotas::new(shards, &runners);
    let prepared: Vec<PreparedRunner> = runners.iter().map(PreparedRunner::new).collect();
    let shard_hashes: Vec<u64> = (0..shards).map(|i| shard_hash(&group, i)).collect();
    let owner = place(&shard_hashes, &prepared, quotas);

    let mut by_runner = vec![Vec::new(); runners.len()];
    for (index, &position) in (0u32..).zip(&owner) {
        if let Some(shards) = by_runner.get_mut(position as usize) {
            shards.push(index);
        }
    }
    Assignment {
        group,
        runners: runners.into_iter().map(|runner| runner.id).collect(),
        owner,
        by_runner,
    }
}

/// Sorted by id, one entry per id (the larger weight), weights at least 1.
fn distinct_by_id(runners: &[Runner]) -> Vec<Runner> {
    let mut sorted: Vec<Runner> = runners
        .iter()
        .map(|runner| Runner::new(runner.id.clone(), runner.weight.max(1)))
        .collect();
    // Larger weight first within an id, so `dedup_by` keeps it.
    sorted.sort_by(|a, b| a.id.cmp(&b.id).then(b.weight.cmp(&a.weight)));
    sorted.dedup_by(|later, kept| later.id == kept.id);
    sorted
}

/// How many shards each runner may take.
///
/// Each runner first gets `floor(shards * w / W)`. The remainder `R` (fewer
/// than the number of runners) is handed out as `R` bonus places, one each,
/// in key order, to runners whose exact share has a fractional part; so every
/// load ends at the floor or the ceiling of its exact share.
struct Quotas {
    base: Vec<u32>,
    /// Whether the runner's exact share is fractional (may take a bonus).
    may_round_up: Vec<bool>,
    bonus_left: u32,
}

impl Quotas {
    fn new(shards: u32, runners: &[Runner]) -> Self {
        let total: u128 = runners.iter().map(|r| u128::from(r.weight)).sum();
        let mut base = Vec::with_capacity(runners.len());
        let mut may_round_up = Vec::with_capacity(runners.len());
        for runner in runners {
            let exact = u128::from(shards) * u128::from(runner.weight);
            // exact / total ≤ shards, so it fits in u32.
            base.push(u32::try_from(exact / total).unwrap_or(shards));
            may_round_up.push(exact % total != 0);
        }
        let placed: u32 = base.iter().sum();
        Self {
            base,
            may_round_up,
            bonus_left: shards - placed,
        }
    }

    /// Whether `runner`, now holding `load` shards, may take one more.
    fn has_room(&self, runner: usize, load: u32) -> bool {
        load < self.base[runner]
            || (load == self.base[runner] && self.may_round_up[runner] && self.bonus_left > 0)
    }

    /// Records that `runner` took a shard while holding `load`.
    fn take(&mut self, runner: usize, load: u32) {
        if load == self.base[runner] {
            self.bonus_left -= 1;
        }
    }
}

/// How many of each shard's best runners are kept sorted; past them (rare:
/// all of them full) the shard's best runner with room is found by a scan.
const CANDIDATES: usize = 4;

/// The bounded-load pass: pairs in ascending (key, shard, runner) order, each
/// used when the shard is unplaced and the runner has room.
///
/// Instead of sorting all pairs, a heap holds each unplaced shard's best pair
/// among runners that had room when it was pushed. Runners never regain room,
/// so a popped entry whose runner is now full is only an optimistic bound:
/// take that shard's next candidate with room and push it again.
fn place(shard_hashes: &[u64], runners: &[PreparedRunner], mut quotas: Quotas) -> Vec<u32> {
    let mut load = vec![0u32; runners.len()];
    let mut owner = vec![u32::MAX; shard_hashes.len()];
    let mut candidates = Candidates::new(shard_hashes, runners);
    let mut heap: BinaryHeap<Reverse<(u64, usize, usize)>> = (0..shard_hashes.len())
        .filter_map(|shard| candidates.best(shard, &load, &quotas).map(Reverse))
        .collect();
    while let Some(Reverse((key, shard, runner))) = heap.pop() {
        if quotas.has_room(runner, load[runner]) {
            quotas.take(runner, load[runner]);
            load[runner] += 1;
            owner[shard] = runner as u32;
        } else if let Some(next) = candidates.best(shard, &load, &quotas) {
            debug_assert!(next.0 >= key, "runners never regain room");
            heap.push(Reverse(next));
        }
        // A shard left with no runner with room cannot happen (the quotas add
        // up to `shards`); if it did, it would keep no owner, not panic.
    }
    debug_assert!(owner.iter().all(|&o| o != u32::MAX));
    owner
}

/// Each shard's best few runners, sorted, with a cursor past the full ones.
struct Candidates<'a> {
    shard_hashes: &'a [u64],
    runners: &'a [PreparedRunner],
    per_shard: usize,
    /// `per_shard` (key, runner) entries per shard, ascending.
    sorted: Vec<(u64, usize)>,
    cursor: Vec<usize>,
}

impl<'a> Candidates<'a> {
    fn new(shard_hashes: &'a [u64], runners: &'a [PreparedRunner]) -> Self {
        let per_shard = CANDIDATES.min(runners.len());
        let mut sorted = Vec::with_capacity(shard_hashes.len() * per_shard);
        let mut row: Vec<(u64, usize)> = Vec::with_capacity(per_shard + 1);
        for &hash in shard_hashes {
            row.clear();
            for (r, runner) in runners.iter().enumerate() {
                let pair = (pair_key(hash, runner), r);
                // Keep the `per_shard` smallest, sorted; most pairs lose to
                // the current worst kept one at the first comparison.
                if row.len() == per_shard && row.last().is_some_and(|&worst| pair > worst) {
                    continue;
                }
                let at = row.partition_point(|&kept| kept < pair);
                row.insert(at, pair);
                row.truncate(per_shard);
            }
            sorted.extend_from_slice(&row);
        }
        Self {
            shard_hashes,
            runners,
            per_shard,
            sorted,
            cursor: vec![0; shard_hashes.len()],
        }
    }

    /// The shard's best pair whose runner has room now.
    fn best(&mut self, shard: usize, load: &[u32], quotas: &Quotas) -> Option<(u64, usize, usize)> {
        let row = &self.sorted[shard * self.per_shard..(shard + 1) * self.per_shard];
        while let Some(&(key, r)) = row.get(self.cursor[shard]) {
            if quotas.has_room(r, load[r]) {
                return Some((key, shard, r));
            }
            self.cursor[shard] += 1;
        }
        // Every candidate is full: the best of the rest is the best with room.
        (0..self.runners.len())
            .filter(|&r| quotas.has_room(r, load[r]))
            .map(|r| {
                (
                    pair_key(self.shard_hashes[shard], &self.runners[r]),
                    shard,
                    r,
                )
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
