//! An in-process runner registry: several runners in one process (tests,
//! simulations) with the same semantics as the PostgreSQL one — sessions
//! that hold locks, epochs bumped on every acquisition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use super::{Epoch, RunnerInfo, RunnerStorage, Signal};
use crate::error::StorageError;
use crate::sharding::{RunnerId, ShardId};

/// A runner registry in memory, shared by the members [`join`](Self::join)ed
/// to it. Each member is one runner; its "session" plays the dedicated lock
/// connection: [`sever`](Self::sever) ends it as if that connection died.
///
/// Memory message storage does not check fences, so use it to test routing
/// and hand-over, and PostgreSQL to test fencing.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), flotilla::StorageError> {
/// use flotilla::RunnerId;
/// use flotilla::sharding::ShardId;
/// use flotilla::storage::{MemoryRunners, RunnerInfo, RunnerStorage};
/// let a = MemoryRunners::new();
/// let b = a.join();
/// for (member, id) in [(&a, "a"), (&b, "b")] {
///     member.register(&RunnerInfo {
///         id: RunnerId::new(id),
///         address: "127.0.0.1:7000".parse().unwrap(),
///         weight: 1,
///         groups: vec![],
///     }).await?;
/// }
/// let shard = ShardId::default_group(1);
/// assert_eq!(a.acquire(&[shard.clone()]).await?.len(), 1);
/// assert!(b.acquire(&[shard.clone()]).await?.is_empty());
/// a.release(&[shard.clone()]).await?;
/// assert_eq!(b.acquire(&[shard]).await?.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MemoryRunners {
    shared: Arc<Shared>,
    /// This member's session and runner, once registered.
    member: Mutex<Option<(u64, RunnerId)>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    signals: broadcast::Sender<Signal>,
}

#[derive(Debug, Default)]
struct State {
    /// Registered runners and the session holding each one's liveness lock.
    runners: BTreeMap<RunnerId, (RunnerInfo, Option<u64>)>,
    /// Shard → session holding its lock.
    locks: HashMap<ShardId, u64>,
    epochs: HashMap<ShardId, i64>,
    /// Machine id → session leasing it.
    machine_ids: HashMap<u16, u64>,
    live_sessions: HashSet<u64>,
    next_session: u64,
}

impl State {
    fn end_session(&mut self, session: u64) {
        self.live_sessions.remove(&session);
        self.locks.retain(|_, s| *s != session);
        self.machine_ids.retain(|_, s| *s != session);
        for (_, holder) in self.runners.values_mut() {
            if *holder == Some(session) {
                *holder = None;
            }
        }
    }
}

impl Default for MemoryRunners {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryRunners {
    /// A new registry, and its first member.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                signals: broadcast::channel(1024).0,
            }),
            member: Mutex::new(None),
        }
    }

    /// Another member (runner) of the same registry.
    pub fn join(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            member: Mutex::new(None),
        }
    }

    /// Ends this member's session as if its lock connection died: every
    /// lock it held is free, and [`confirm`](RunnerStorage::confirm) fails
    /// until it registers again.
    pub fn sever(&self) {
        if let Some((session, _)) = *lock(&self.member) {
            lock(&self.shared.state).end_session(session);
        }
    }

    /// The session, if it is still live.
    fn session(&self) -> Result<u64, StorageError> {
        let member = lock(&self.member);
        let (session, _) = member.as_ref().ok_or(StorageError::Closed)?;
        if lock(&self.shared.state).live_sessions.contains(session) {
            Ok(*session)
        } else {
            Err(StorageError::InUse(
                "the lock session ended; register again".to_owned(),
            ))
        }
    }

    fn send(&self, signal: Signal) {
        // No receivers is fine: nobody listens yet.
        let _ = self.shared.signals.send(signal);
    }
}

#[async_trait]
impl RunnerStorage for MemoryRunners {
    async fn register(&self, runner: &RunnerInfo) -> Result<(), StorageError> {
        {
            let mut member = lock(&self.member);
            let mut state = lock(&self.shared.state);
            if let Some((old, _)) = member.take() {
                state.end_session(old);
            }
            if let Some((_, Some(holder))) = state.runners.get(&runner.id)
                && state.live_sessions.contains(holder)
            {
                return Err(StorageError::RunnerIdInUse(runner.id.to_string()));
            }
            state.next_session += 1;
            let session = state.next_session;
            state.live_sessions.insert(session);
            state
                .runners
                .insert(runner.id.clone(), (runner.clone(), Some(session)));
            *member = Some((session, runner.id.clone()));
        }
        self.send(Signal::MembershipChanged);
        Ok(())
    }

    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError> {
        let state = lock(&self.shared.state);
        Ok(state
            .runners
            .values()
            .filter(|(_, holder)| holder.is_some_and(|s| state.live_sessions.contains(&s)))
            .map(|(info, _)| info.clone())
            .collect())
    }

    async fn acquire(&self, shards: &[ShardId]) -> Result<Vec<(ShardId, Epoch)>, StorageError> {
        let session = self.session()?;
        let mut state = lock(&self.shared.state);
        let mut taken = Vec::new();
        for shard in shards {
            match state.locks.get(shard) {
                Some(holder) if *holder == session => {
                    let epoch = state.epochs.get(shard).copied().unwrap_or(0);
                    taken.push((shard.clone(), Epoch(epoch)));
                }
                Some(_) => {}
                None => {
                    state.locks.insert(shard.clone(), session);
                    let epoch = state.epochs.entry(shard.clone()).or_insert(0);
                    *epoch += 1;
                    let epoch = *epoch;
                    taken.push((shard.clone(), Epoch(epoch)));
                }
            }
        }
        Ok(taken)
    }

    async fn release(&self, shards: &[ShardId]) -> Result<(), StorageError> {
        let Ok(session) = self.session() else {
            return Ok(()); // nothing held
        };
        let mut state = lock(&self.shared.state);
        for shard in shards {
            if state.locks.get(shard) == Some(&session) {
                state.locks.remove(shard);
            }
        }
        Ok(())
    }

    async fn confirm(&self) -> Result<(), StorageError> {
        self.session().map(|_| ())
    }

    async fn unregister(&self) -> Result<(), StorageError> {
        let member = lock(&self.member).take();
        if let Some((session, id)) = member {
            let mut state = lock(&self.shared.state);
            state.end_session(session);
            state.runners.remove(&id);
        }
        self.send(Signal::MembershipChanged);
        Ok(())
    }

    async fn lease_machine_id(&self, holder: &RunnerId) -> Result<u16, StorageError> {
        let mut member = lock(&self.member);
        let mut state = lock(&self.shared.state);
        let session = match member.as_ref() {
            Some((session, _)) if state.live_sessions.contains(session) => *session,
            _ => {
                // A process that never registers gets a session of its own.
                state.next_session += 1;
                let session = state.next_session;
                state.live_sessions.insert(session);
                *member = Some((session, holder.clone()));
                session
            }
        };
        if let Some((id, _)) = state.machine_ids.iter().find(|(_, s)| **s == session) {
            return Ok(*id);
        }
        let free = (0..super::runners::MACHINE_IDS)
            .find(|id| !state.machine_ids.contains_key(id))
            .ok_or_else(|| StorageError::InUse("every machine id is leased".to_owned()))?;
        state.machine_ids.insert(free, session);
        Ok(free)
    }

    async fn signal(&self, signal: Signal) -> Result<(), StorageError> {
        self.send(signal);
        Ok(())
    }

    async fn listen(&self) -> Result<mpsc::Receiver<Signal>, StorageError> {
        let mut rx = self.shared.signals.subscribe();
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let signal = match rx.recv().await {
                    Ok(signal) => signal,
                    Err(broadcast::error::RecvError::Lagged(_)) => Signal::Lagged,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(signal).await.is_err() {
                    return;
                }
            }
        });
        Ok(out)
    }
}
