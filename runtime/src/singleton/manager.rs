//! The runtime of singletons: one manager task per registered singleton,
//! which starts it when its shard becomes owned here and stops it when the
//! shard moves away; the cron chain of persisted ticks; health.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::cron::{Schedule, ScheduleError};
use super::{
    LEADER_NAME, SINGLETON_TYPE, Singleton, SingletonContext, SingletonError, SingletonHealth,
    SingletonOptions,
};
use crate::cluster::Services;
use crate::codec;
use crate::entity::manager::StoredDispatch;
use crate::error::{ClusterError, StorageError};
use crate::sharding::{DEFAULT_GROUP, EntityAddress, ShardId};
use crate::snowflake::now_unix_ms;
use crate::storage::{
    Completion, CompletionOutcome, EntityState, Fence, Headers, MessageId, MessageKey, NewMessage,
    SaveOutcome, Statement, StoredMessage, StoredReply,
};
use crate::time::Clock;

/// The tag of the messages that carry a plain singleton's state saves.
const STATE_TAG: &str = "state";

/// First delay before a failed plain singleton runs again; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What is stored for a singleton (as its entity state): where the cron
/// chain stands, when it last ran, and the user's encoded state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The next tick is the first occurrence after this instant (unix ms):
    /// the last tick run, or the moment a stale tick was skipped.
    pub(crate) cursor_ms: Option<i64>,
    /// When the last run ended (unix ms).
    pub(crate) last_execution_ms: Option<i64>,
    /// The user's state, encoded.
    pub(crate) state: Vec<u8>,
}

/// The recorded reply of a tick.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum TickOutcome {
    Ran,
    Failed(String),
    Skipped { late_ms: i64 },
}

/// Runs the manager task of one singleton type.
pub(crate) type Manage = fn(Arc<Services>, Arc<dyn Clock>, Arc<Slot>) -> BoxFuture<'static, ()>;

/// A singleton type as registered on the builder.
#[derive(Clone, Copy)]
pub(crate) struct Registration {
    pub(crate) name: &'static str,
    pub(crate) options: SingletonOptions,
    pub(crate) manage: Manage,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// The registration of `T`.
    pub(crate) fn of<T: Singleton>() -> Self {
        fn boxed<T: Singleton>(
            svc: Arc<Services>,
            clock: Arc<dyn Clock>,
            slot: Arc<Slot>,
        ) -> BoxFuture<'static, ()> {
            Box::pin(manage::<T>(svc, clock, slot))
        }
        Self {
            name: T::NAME,
            options: T::options(),
            manage: boxed::<T>,
        }
    }

    /// Parses the cron pattern and timezone.
    pub(crate) fn schedule(&self) -> Result<Option<Schedule>, ScheduleError> {
        self.options
            .cron
            .map(|cron| Schedule::parse(cron, self.options.timezone))
            .transpose()
    }
}

#[derive(Debug, Default)]
struct Status {
    /// A session runs here now (the shard is owned).
    owned: bool,
    last_execution: Option<SystemTime>,
    /// A plain singleton's last run failed; it is backing off.
    failing: bool,
    /// When the current session started.
    since: Option<SystemTime>,
    /// The record as last loaded or saved.
    saved: Record,
}

/// One registered singleton on this runner.
#[derive(Debug)]
pub(crate) struct Slot {
    name: &'static str,
    shard: ShardId,
    schedule: Option<Schedule>,
    skip_if_older_than: Duration,
    status: Mutex<Status>,
    /// Cancelled to stop the current session.
    session: Mutex<CancellationToken>,
    /// A session is under way (the hand-over waits for it).
    active: AtomicBool,
    last_execution_gauge: metrics::Gauge,
}

impl Slot {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn address(&self) -> EntityAddress {
        EntityAddress {
            entity_type: Arc::from(SINGLETON_TYPE),
            entity_id: Arc::from(self.name),
            shard: self.shard.clone(),
        }
    }

    fn begin(&self, token: CancellationToken, now: SystemTime) {
        *self.session.lock().unwrap_or_else(PoisonError::into_inner) = token;
        self.active.store(true, Ordering::SeqCst);
        let mut status = self.status();
        status.owned = true;
        status.since = Some(now);
        status.failing = false;
    }

    fn end(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    fn stop(&self) {
        self.session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancel();
    }

    fn loaded(&self, record: &Record) {
        let mut status = self.status();
        status.last_execution = record.last_execution_ms.map(from_ms);
        status.saved = record.clone();
    }

    fn executed(&self, at: SystemTime) {
        self.status().last_execution = Some(at);
        self.last_execution_gauge.set(unix_secs(at));
    }
}

/// Every singleton registered on this runner. It is also the dispatch
/// target of the internal type `flotilla.singleton` in the delivery loop.
pub(crate) struct Registry {
    slots: Vec<(Arc<Slot>, Registration)>,
    clock: Arc<dyn Clock>,
    svc: Arc<Services>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "slots",
                &self.slots.iter().map(|(s, _)| s.name).collect::<Vec<_>>(),
            )
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Slots for `registrations` (schedules already validated by `parse`).
    pub(crate) fn new(
        registrations: &[Registration],
        svc: Arc<Services>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, (&'static str, ScheduleError)> {
        let shards = svc.config.shards;
        let mut slots = Vec::with_capacity(registrations.len());
        for registration in registrations {
            let schedule = registration
                .schedule()
                .map_err(|error| (registration.name, error))?;
            let slot = Slot {
                name: registration.name,
                shard: ShardId::for_entity(DEFAULT_GROUP, registration.name, shards),
                schedule,
                skip_if_older_than: registration.options.skip_if_older_than,
                status: Mutex::default(),
                session: Mutex::new(CancellationToken::new()),
                active: AtomicBool::new(false),
                last_execution_gauge: metrics::gauge!(
                    "flotilla_singleton_last_execution_seconds",
                    "name" => registration.name
                ),
            };
            slots.push((Arc::new(slot), *registration));
        }
        Ok(Self { slots, clock, svc })
    }

    /// Whether any singleton is registered.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Spawns the manager task of every singleton.
    pub(crate) fn start(&self, svc: &Arc<Services>) {
        for (slot, registration) in &self.slots {
            svc.entity_tasks.spawn((registration.manage)(
                svc.clone(),
                self.clock.clone(),
                slot.clone(),
            ));
        }
    }

    /// The health of every singleton as this runner sees it.
    pub(crate) fn health(&self, svc: &Services) -> Vec<SingletonHealth> {
        let now = self.clock.now();
        self.slots
            .iter()
            .map(|(slot, _)| {
                let owned_here = svc.ownership.fence(&slot.shard).is_some()
                    && slot.status().owned
                    && !svc.shutdown.is_cancelled();
                let status = slot.status();
                let healthy = if !owned_here {
                    true
                } else if let Some(schedule) = &slot.schedule {
                    let reference = status.last_execution.or(status.since);
                    match (reference, schedule.interval_after(to_ms(now))) {
                        (Some(last), Some(interval)) => {
                            now.duration_since(last).unwrap_or_default() <= interval * 2
                        }
                        _ => true,
                    }
                } else {
                    !status.failing
                };
                SingletonHealth {
                    name: slot.name,
                    last_execution: status.last_execution,
                    owned_here,
                    healthy,
                }
            })
            .collect()
    }
}

impl StoredDispatch for Registry {
    /// Ticks are handled by the singleton's own manager task (it knows
    /// their instants); the delivery loop leaves them be. A state message
    /// found unprocessed and not in flight is the remnant of a save whose
    /// completion never committed (a crash in between, or a fenced
    /// completion): it is closed as abandoned, so it does not linger.
    fn dispatch_stored(&self, message: StoredMessage) -> bool {
        if message.tag != STATE_TAG || !self.svc.in_flight.claim(message.id) {
            return true;
        }
        let id = message.id;
        let Some(fence) = self.svc.ownership.fence(&message.address.shard) else {
            self.svc.in_flight.release(id);
            return true;
        };
        let svc = self.svc.clone();
        self.svc.tasks.spawn(async move {
            let completion = Completion {
                message_id: id,
                reply: StoredReply::Rejected("singleton state save abandoned".to_owned()),
                state: None,
                effects: Vec::new(),
                fence,
            };
            match svc.writer.complete(completion).await {
                Ok(_) => svc.in_flight.completed(id),
                Err(error) => {
                    tracing::debug!(%error, "closing an abandoned singleton state save failed");
                    svc.in_flight.release(id);
                }
            }
        });
        true
    }

    fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|(s, _)| s.active.load(Ordering::SeqCst))
            .count()
    }

    fn stop_all(&self) {
        for (slot, _) in &self.slots {
            slot.stop();
        }
    }

    fn passivate_idle(&self) {}

    fn max_idle(&self) -> Duration {
        Duration::from_secs(3600)
    }

    fn stop_shards(&self, shards: &HashSet<ShardId>) {
        for (slot, _) in &self.slots {
            if shards.contains(&slot.shard) {
                slot.stop();
            }
        }
    }

    fn active_in(&self, shards: &HashSet<ShardId>) -> usize {
        self.slots
            .iter()
            .filter(|(s, _)| shards.contains(&s.shard) && s.active.load(Ordering::SeqCst))
            .count()
    }

    fn call_volatile_encoded(
        &self,
        _address: EntityAddress,
        _payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, ClusterError>> {
        Box::pin(std::future::ready(Err(ClusterError::UnknownEntityType(
            SINGLETON_TYPE.to_owned(),
        ))))
    }
}

/// Whether this runner owns the leader shard.
pub(crate) fn is_leader(svc: &Services) -> bool {
    let shard = ShardId::for_entity(DEFAULT_GROUP, LEADER_NAME, svc.config.shards);
    !svc.shutdown.is_cancelled() && svc.ownership.fence(&shard).is_some()
}

/// The manager task of singleton `T`: waits until its shard is owned here,
/// runs a session until the shard is lost or the runner stops, repeats.
async fn manage<T: Singleton>(svc: Arc<Services>, clock: Arc<dyn Clock>, slot: Arc<Slot>) {
    let mut changes = svc.ownership.subscribe();
    loop {
        if svc.shutdown.is_cancelled() {
            return;
        }
        changes.borrow_and_update();
        let Some(fence) = svc.ownership.fence(&slot.shard) else {
            slot.status().owned = false;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = svc.shutdown.cancelled() => return,
            }
            continue;
        };
        let token = svc.shutdown.child_token();
        slot.begin(token.clone(), clock.now());
        tracing::info!(singleton = slot.name, runner = %svc.runner, "singleton starting on this runner");
        svc.tasks.spawn(watch_loss(
            svc.clone(),
            slot.shard.clone(),
            fence.clone(),
            token.clone(),
        ));
        if slot.schedule.is_some() {
            run_cron::<T>(&svc, &clock, &slot, &fence, &token).await;
        } else {
            run_plain::<T>(&svc, &clock, &slot, &fence, &token).await;
        }
        slot.end();
        // A plain singleton that returned Ok is done until the next acquisition.
        token.cancelled().await;
        slot.status().owned = false;
        tracing::debug!(singleton = slot.name, "singleton stopped on this runner");
    }
}

/// Cancels `token` once this runner no longer owns `shard` under `fence`.
async fn watch_loss(
    svc: Arc<Services>,
    shard: ShardId,
    fence: Option<Fence>,
    token: CancellationToken,
) {
    let mut changes = svc.ownership.subscribe();
    loop {
        changes.borrow_and_update();
        if svc.ownership.fence(&shard).as_ref() != Some(&fence) {
            token.cancel();
            return;
        }
        tokio::select! {
            () = token.cancelled() => return,
            changed = changes.changed() => if changed.is_err() {
                token.cancel();
                return;
            },
        }
    }
}

/// Loads the stored record, retrying storage errors until `token` ends.
async fn load(
    svc: &Services,
    clock: &Arc<dyn Clock>,
    slot: &Slot,
    token: &CancellationToken,
) -> Option<Record> {
    let mut delay = FIRST_BACKOFF;
    loop {
        match svc.storage.load_state(SINGLETON_TYPE, slot.name).await {
            Ok(None) => return Some(Record::default()),
            Ok(Some(bytes)) => match codec::decode::<Record>("singleton record", &bytes) {
                Ok(record) => return Some(record),
                Err(error) => {
                    tracing::error!(singleton = slot.name, %error, "stored singleton record does not decode; starting afresh");
                    return Some(Record::default());
                }
            },
            Err(error) => {
                tracing::warn!(singleton = slot.name, %error, "loading singleton state failed; retrying");
            }
        }
        tokio::select! {
            () = clock.sleep(delay) => {}
            () = token.cancelled() => return None,
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

fn decode_state<S: serde::de::DeserializeOwned + Default>(name: &str, bytes: &[u8]) -> S {
    if bytes.is_empty() {
        return S::default();
    }
    codec::decode("singleton state", bytes).unwrap_or_else(|error| {
        tracing::error!(singleton = name, %error, "stored singleton state does not decode; starting from the default");
        S::default()
    })
}

/// Statements staged by a run, committed with its record.
type Staged = Arc<Mutex<Vec<Statement>>>;

fn take(staged: &Staged) -> Vec<Statement> {
    std::mem::take(&mut *staged.lock().unwrap_or_else(PoisonError::into_inner))
}

fn context<S>(
    svc: &Arc<Services>,
    slot: &Arc<Slot>,
    fence: &Option<Fence>,
    token: &CancellationToken,
    state: &Arc<Mutex<S>>,
    scheduled: Option<SystemTime>,
    staged: &Staged,
) -> SingletonContext<S> {
    SingletonContext {
        staged: staged.clone(),
        name: slot.name,
        shard: slot.shard.clone(),
        scheduled,
        state: state.clone(),
        svc: svc.clone(),
        fence: fence.clone(),
        stop: token.clone(),
        slot: slot.clone(),
    }
}

fn encode_state<S: Serialize>(name: &str, state: &Mutex<S>) -> Option<Vec<u8>> {
    let state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match codec::encode("singleton state", &*state) {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::error!(singleton = name, %error, "singleton state does not encode; not saved");
            None
        }
    }
}

/// A plain singleton's session: run, restart with backoff on failure,
/// stop after `Ok` or when the session is cancelled.
async fn run_plain<T: Singleton>(
    svc: &Arc<Services>,
    clock: &Arc<dyn Clock>,
    slot: &Arc<Slot>,
    fence: &Option<Fence>,
    token: &CancellationToken,
) {
    let Some(record) = load(svc, clock, slot, token).await else {
        return;
    };
    slot.loaded(&record);
    let state = Arc::new(Mutex::new(decode_state::<T::State>(
        slot.name,
        &record.state,
    )));
    let grace = svc.config.fence_after / 4;
    let mut delay = FIRST_BACKOFF;
    loop {
        let staged = Staged::default();
        let ctx = context(svc, slot, fence, token, &state, None, &staged);
        let mut run = AssertUnwindSafe(T::run(ctx)).catch_unwind();
        let outcome = tokio::select! {
            outcome = &mut run => outcome,
            () = token.cancelled() => match tokio::time::timeout(grace, run).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::warn!(singleton = slot.name, ?grace, "singleton did not return after being asked to stop; dropped");
                    return;
                }
            },
        };
        slot.executed(clock.now());
        match outcome {
            Ok(Ok(())) => {
                if let Some(bytes) = encode_state(slot.name, &state)
                    && let Err(error) = save_state(svc, slot, fence, bytes, &staged).await
                {
                    tracing::warn!(singleton = slot.name, %error, "saving singleton state failed");
                }
                slot.status().failing = false;
                tracing::info!(singleton = slot.name, "singleton finished");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(singleton = slot.name, %error, ?delay, "singleton failed; restarting after a backoff");
            }
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(singleton = slot.name, panic = %message, ?delay, "singleton panicked; restarting after a backoff");
            }
        }
        slot.status().failing = true;
        tokio::select! {
            () = clock.sleep(delay) => {}
            () = token.cancelled() => return,
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// Saves `state` with the slot's record: a state message stored and
/// completed (fenced) with the new record.
pub(crate) async fn save_state(
    svc: &Services,
    slot: &Slot,
    fence: &Option<Fence>,
    state: Vec<u8>,
    staged: &Staged,
) -> Result<(), SingletonError> {
    let mut record = {
        let status = slot.status();
        let mut record = status.saved.clone();
        record.last_execution_ms = status.last_execution.map(to_ms);
        record
    };
    record.state = state;
    let id = MessageId::from(svc.ids.next_id());
    let message = NewMessage {
        id,
        address: slot.address(),
        tag: STATE_TAG.to_owned(),
        key: None,
        payload: Vec::new(),
        headers: Headers::new(),
        deliver_at: None,
        created_at: now_unix_ms() as i64,
    };
    let effects = take(staged);
    // In flight from the start: the delivery scan must not take it for abandoned.
    svc.in_flight.claim(id);
    let (saved, outcome) = complete(
        svc,
        slot,
        fence,
        Some(message),
        id,
        StoredReply::Ok(Vec::new()),
        &record,
        effects,
    )
    .await;
    let outcome = saved.map_err(SingletonError::from).and(outcome);
    match &outcome {
        Ok(CompletionOutcome::Recorded | CompletionOutcome::EffectsFailed(_)) => {
            svc.in_flight.completed(id);
        }
        _ => svc.in_flight.release(id),
    }
    let outcome = outcome?;
    match outcome {
        CompletionOutcome::Recorded => {
            slot.status().saved = record;
            Ok(())
        }
        CompletionOutcome::EffectsFailed(message) => Err(SingletonError::EffectsFailed(message)),
        CompletionOutcome::Fenced { .. } | CompletionOutcome::AlreadyProcessed(_) => {
            Err(SingletonError::Moved(slot.name.to_owned()))
        }
    }
}

/// Stores `save` (if any) and then records the completion of `id` with
/// `record` as the singleton's state. The save is queued first, so a
/// crash in between leaves it stored and the completion undone (the tick
/// runs again), never the reverse. Returns the save's result and the
/// completion's outcome.
#[allow(clippy::too_many_arguments)]
async fn complete(
    svc: &Services,
    slot: &Slot,
    fence: &Option<Fence>,
    save: Option<NewMessage>,
    id: MessageId,
    reply: StoredReply,
    record: &Record,
    effects: Vec<Statement>,
) -> (
    Result<Option<SaveOutcome>, StorageError>,
    Result<CompletionOutcome, SingletonError>,
) {
    let bytes = match codec::encode("singleton record", record) {
        Ok(bytes) => bytes,
        Err(error) => return (Ok(None), Err(error.into())),
    };
    let completion = Completion {
        message_id: id,
        reply,
        state: Some(EntityState {
            entity_type: SINGLETON_TYPE.to_owned(),
            entity_id: slot.name.to_owned(),
            bytes,
        }),
        effects,
        fence: fence.clone(),
    };
    let saved = async {
        match save {
            Some(message) => svc.writer.save(message).await.map(Some),
            None => Ok(None),
        }
    };
    // `join` polls the save first: it is queued to the writer before the completion.
    let (saved, completed) = futures::join!(saved, svc.writer.complete(completion));
    (saved, completed.map_err(SingletonError::from))
}

/// The tick message of `slot` at `at_ms`.
fn tick_message(svc: &Services, slot: &Slot, at_ms: i64) -> NewMessage {
    NewMessage {
        id: MessageId::from(svc.ids.next_id()),
        address: slot.address(),
        tag: "tick".to_owned(),
        key: Some(tick_key(slot.name, at_ms)),
        payload: Vec::new(),
        headers: Headers::new(),
        deliver_at: Some(at_ms),
        created_at: now_unix_ms() as i64,
    }
}

/// The dedup key of a tick: (name, scheduled instant).
pub(crate) fn tick_key(name: &str, at_ms: i64) -> MessageKey {
    MessageKey::new(SINGLETON_TYPE, name, "tick", &at_ms.to_string())
}

/// Makes sure the first tick after `from_ms` not yet processed is stored;
/// returns its id and instant. `None` when stopped or no tick remains.
async fn ensure_tick(
    svc: &Services,
    clock: &Arc<dyn Clock>,
    slot: &Slot,
    schedule: &Schedule,
    mut from_ms: i64,
    token: &CancellationToken,
) -> Option<(MessageId, i64)> {
    let mut delay = FIRST_BACKOFF;
    loop {
        let Some(at) = schedule.next_after(from_ms) else {
            tracing::warn!(
                singleton = slot.name,
                "cron pattern has no further occurrence; singleton idle"
            );
            return None;
        };
        let message = tick_message(svc, slot, at);
        let id = message.id;
        match svc.writer.save(message).await {
            Ok(SaveOutcome::Saved) => return Some((id, at)),
            Ok(SaveOutcome::Duplicate { id, reply: None }) => return Some((id, at)),
            Ok(SaveOutcome::Duplicate { reply: Some(_), .. }) => {
                // Already processed (by this chain before a restart): go on.
                from_ms = at;
                continue;
            }
            Err(error) => {
                tracing::warn!(singleton = slot.name, %error, "storing the next tick failed; retrying");
            }
        }
        tokio::select! {
            () = clock.sleep(delay) => {}
            () = token.cancelled() => return None,
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// A cron singleton's session: tick after tick until cancelled. A tick
/// under way is always finished (and recorded, if the shard is still
/// owned) before the session ends.
async fn run_cron<T: Singleton>(
    svc: &Arc<Services>,
    clock: &Arc<dyn Clock>,
    slot: &Arc<Slot>,
    fence: &Option<Fence>,
    token: &CancellationToken,
) {
    let Some(schedule) = slot.schedule.clone() else {
        return;
    };
    let Some(mut record) = load(svc, clock, slot, token).await else {
        return;
    };
    slot.loaded(&record);
    let state = Arc::new(Mutex::new(decode_state::<T::State>(
        slot.name,
        &record.state,
    )));
    let skip_ms = slot.skip_if_older_than.as_millis() as i64;
    loop {
        if token.is_cancelled() {
            return;
        }
        let from = record.cursor_ms.unwrap_or_else(|| to_ms(clock.now()));
        let Some((id, at)) = ensure_tick(svc, clock, slot, &schedule, from, token).await else {
            token.cancelled().await;
            return;
        };
        let now = to_ms(clock.now());
        if at > now {
            tokio::select! {
                () = clock.sleep(Duration::from_millis((at - now) as u64)) => {}
                () = token.cancelled() => return,
            }
        }
        let now = to_ms(clock.now());
        let late_ms = now - at;
        let mut next_record = record.clone();
        let staged = Staged::default();
        let reply = if late_ms > skip_ms {
            tracing::warn!(
                singleton = slot.name,
                tick = %humantime::format_rfc3339_millis(from_ms(at)),
                late = ?Duration::from_millis(late_ms as u64),
                "cron tick older than skip_if_older_than; skipped, the next tick is computed from now"
            );
            next_record.cursor_ms = Some(now);
            StoredReply::Ok(encode_outcome(&TickOutcome::Skipped { late_ms }))
        } else {
            let ctx = context(svc, slot, fence, token, &state, Some(from_ms(at)), &staged);
            let outcome = AssertUnwindSafe(T::run(ctx)).catch_unwind().await;
            let ended = clock.now();
            slot.executed(ended);
            next_record.cursor_ms = Some(at);
            next_record.last_execution_ms = Some(to_ms(ended));
            match outcome {
                Ok(Ok(())) => {
                    if let Some(bytes) = encode_state(slot.name, &state) {
                        next_record.state = bytes;
                    }
                    StoredReply::Ok(encode_outcome(&TickOutcome::Ran))
                }
                Ok(Err(error)) => {
                    take(&staged);
                    tracing::warn!(singleton = slot.name, %error, "cron tick failed; its state changes are dropped");
                    *state.lock().unwrap_or_else(PoisonError::into_inner) =
                        decode_state(slot.name, &record.state);
                    StoredReply::Ok(encode_outcome(&TickOutcome::Failed(error)))
                }
                Err(panic) => {
                    take(&staged);
                    let message = panic_message(&*panic);
                    tracing::error!(singleton = slot.name, panic = %message, "cron tick panicked; its state changes are dropped");
                    *state.lock().unwrap_or_else(PoisonError::into_inner) =
                        decode_state(slot.name, &record.state);
                    StoredReply::Panicked(message)
                }
            }
        };
        let next = next_record
            .cursor_ms
            .and_then(|cursor| schedule.next_after(cursor))
            .map(|at| tick_message(svc, slot, at));
        let effects = take(&staged);
        let (saved, completed) =
            complete(svc, slot, fence, next, id, reply, &next_record, effects).await;
        if let Err(error) = saved {
            // The chain does not depend on it: the next tick is stored again
            // (or found stored) before it is awaited.
            tracing::warn!(singleton = slot.name, %error, "storing the next tick failed");
        }
        let reload = match completed {
            Ok(CompletionOutcome::Recorded) => {
                record = next_record;
                slot.status().saved = record.clone();
                false
            }
            Ok(
                outcome @ (CompletionOutcome::AlreadyProcessed(_)
                | CompletionOutcome::EffectsFailed(_)),
            ) => {
                // Effects failed: the tick is recorded as failed and the
                // record rolled back; already processed: another run
                // recorded it. Either way storage knows best.
                tracing::warn!(
                    singleton = slot.name,
                    ?outcome,
                    "cron tick not recorded as run; reloading the stored record"
                );
                true
            }
            Ok(CompletionOutcome::Fenced { .. }) => {
                // Another runner owns the shard now; the routing table
                // follows shortly and ends this session.
                tracing::warn!(
                    singleton = slot.name,
                    "cron tick completion fenced: the shard has a newer owner"
                );
                token.cancelled().await;
                return;
            }
            Err(error) => {
                tracing::warn!(singleton = slot.name, %error, "recording the cron tick failed; it runs again");
                tokio::select! {
                    () = clock.sleep(FIRST_BACKOFF) => {}
                    () = token.cancelled() => return,
                }
                true
            }
        };
        if reload {
            // The run's state changes were not recorded: start again from
            // what storage holds (the run is then repeated or skipped as
            // the stored chain says).
            let Some(reloaded) = load(svc, clock, slot, token).await else {
                return;
            };
            record = reloaded;
            slot.loaded(&record);
            *state.lock().unwrap_or_else(PoisonError::into_inner) =
                decode_state(slot.name, &record.state);
        }
    }
}

fn encode_outcome(outcome: &TickOutcome) -> Vec<u8> {
    // A plain enum always encodes; an empty reply would do if it did not.
    codec::encode("tick outcome", outcome).unwrap_or_default()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn to_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn unix_secs(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
