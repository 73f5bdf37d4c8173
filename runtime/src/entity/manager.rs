//! The per-type runtime of entities: activation, mailboxes, serial handling,
//! passivation, panic isolation and persisted completion.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::cluster::ReplyWait;
use crate::cluster::Services;
use crate::codec;
use crate::context::{self, ClusterContext, Sender, TraceContext};
use crate::entity::mailbox::{Mailbox, SendError};
use crate::entity::{Entity, EntityContext, EntityOptions, RequestInfo};
use crate::error::ClusterError;
use crate::sharding::{DEFAULT_GROUP, EntityAddress, ShardId};
use crate::snowflake::now_unix_ms;
use crate::storage::{
    Completion, CompletionOutcome, EntityState, Fence, Headers, MessageId, MessageKey, NewMessage,
    SaveOutcome, StoredMessage, StoredReply,
};

/// What an entity's mailbox carries.
enum Envelope<E: Entity> {
    Volatile {
        request: E::Request,
        reply: oneshot::Sender<Result<E::Reply, ClusterError>>,
        span: tracing::Span,
        incoming: Incoming,
    },
    Persisted {
        id: MessageId,
        request: E::Request,
        span: tracing::Span,
        incoming: Incoming,
    },
}

/// Where a message comes from: the handler's trace (a child of the
/// sender's span) and the sender.
pub(crate) struct Incoming {
    trace: TraceContext,
    sender: Option<Sender>,
}

impl Incoming {
    /// A message with `headers` (from storage or another runner).
    pub(crate) fn from_headers(headers: &Headers) -> Self {
        Self {
            trace: TraceContext::for_message(headers),
            sender: Sender::from_headers(headers),
        }
    }

    /// A call made now in this process by the current task on `runner`.
    fn here(runner: &crate::sharding::RunnerId) -> Self {
        match context::current() {
            Some(caller) => Self {
                trace: caller.trace().child(),
                sender: Some(Sender {
                    runner: Some(caller.runner_id().clone()),
                    shard: caller.shard_id().cloned(),
                }),
            },
            None => Self {
                trace: TraceContext::root(),
                sender: Some(Sender {
                    runner: Some(runner.clone()),
                    shard: None,
                }),
            },
        }
    }
}

/// Mailbox slots hold a pointer: a channel allocates its slots in blocks, and
/// an idle entity's memory should not grow with the size of its requests.
type Mail<E> = Box<Envelope<E>>;

/// The mailboxes of the active entities of one type, by entity id.
type Mailboxes<E> = HashMap<Arc<str>, Arc<Mailbox<Mail<E>>>>;

/// Type-erased view of a manager, for the delivery loop.
pub(crate) trait StoredDispatch: Send + Sync {
    /// Hands a stored message to its entity. False if it could not be
    /// enqueued now (full mailbox); it stays stored and is retried.
    fn dispatch_stored(&self, message: StoredMessage) -> bool;
    /// Number of active entities.
    fn active(&self) -> usize;
    /// Stops every active entity once its current handler returns.
    fn stop_all(&self);
    /// Passivates the entities idle for the type's `max_idle`.
    fn passivate_idle(&self);
    /// The type's `max_idle`.
    fn max_idle(&self) -> std::time::Duration;
    /// Stops the entities of `shards` once their current handler returns
    /// (the shards are moving away, or their locks were lost).
    fn stop_shards(&self, shards: &HashSet<ShardId>);
    /// Active entities in `shards`.
    fn active_in(&self, shards: &HashSet<ShardId>) -> usize;
    /// A volatile call from another runner: decodes the request, runs it,
    /// encodes the reply.
    fn call_volatile_encoded(
        &self,
        address: EntityAddress,
        payload: Vec<u8>,
        headers: Headers,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, ClusterError>>;
}

/// The entity's shard is not owned by this runner (any more).
#[derive(Debug)]
pub(crate) struct NotOwned;

/// Cached metric handles of one entity type.
struct TypeMetrics {
    active: metrics::Gauge,
    mailbox_depth: metrics::Gauge,
    volatile: metrics::Counter,
    persisted: metrics::Counter,
    handler_seconds: metrics::Histogram,
    panics: metrics::Counter,
}

impl TypeMetrics {
    fn new(entity_type: &'static str) -> Self {
        Self {
            active: metrics::gauge!("flotilla_active_entities", "entity_type" => entity_type),
            mailbox_depth: metrics::gauge!("flotilla_mailbox_depth", "entity_type" => entity_type),
            volatile: metrics::counter!("flotilla_messages_total", "entity_type" => entity_type, "delivery" => "volatile"),
            persisted: metrics::counter!("flotilla_messages_total", "entity_type" => entity_type, "delivery" => "persisted"),
            handler_seconds: metrics::histogram!("flotilla_handler_duration_seconds", "entity_type" => entity_type),
            panics: metrics::counter!("flotilla_handler_panics_total", "entity_type" => entity_type),
        }
    }
}

/// All active entities of one type on this runner.
pub(crate) struct EntityManager<E: Entity> {
    svc: Arc<Services>,
    options: EntityOptions,
    entities: Mutex<Mailboxes<E>>,
    metrics: TypeMetrics,
}

impl<E: Entity> EntityManager<E> {
    pub(crate) fn new(svc: Arc<Services>) -> Arc<Self> {
        Arc::new(Self {
            svc,
            options: E::options(),
            entities: Mutex::new(HashMap::new()),
            metrics: TypeMetrics::new(E::NAME),
        })
    }

    /// The mailbox of the entity at `address`, activating it if needed.
    /// Activation needs this runner to own the entity's shard; the entity
    /// keeps the shard's fence for every completion it writes.
    fn mailbox(
        self: &Arc<Self>,
        address: &EntityAddress,
    ) -> Result<Arc<Mailbox<Mail<E>>>, NotOwned> {
        let mut entities = lock(&self.entities);
        if let Some(mailbox) = entities.get(&address.entity_id)
            && !mailbox.is_closed()
        {
            return Ok(mailbox.clone());
        }
        let fence = self.svc.ownership.fence(&address.shard).ok_or(NotOwned)?;
        let tx = Arc::new(Mailbox::new(self.options.mailbox));
        let rx = tx.clone();
        if self.svc.shutdown.is_cancelled() {
            // Shutdown stops every mailbox in the map; this one came too late for that.
            tx.stop();
        }
        entities.insert(address.entity_id.clone(), tx.clone());
        self.metrics.active.increment(1.0);
        let manager = self.clone();
        let address = address.clone();
        let active = self.metrics.active.clone();
        self.svc.entity_tasks.spawn(async move {
            manager.run_entity(address, fence, rx).await;
            active.decrement(1.0);
        });
        Ok(tx)
    }

    /// A volatile call: straight to the mailbox, no serialization. The
    /// caller is the current task (its context is the handler's parent).
    pub(crate) async fn call_volatile(
        self: &Arc<Self>,
        address: &EntityAddress,
        request: E::Request,
        span: tracing::Span,
    ) -> Result<E::Reply, ClusterError> {
        let incoming = Incoming::here(&self.svc.runner);
        self.call_volatile_from(address, request, span, incoming)
            .await
    }

    /// A volatile call from `incoming` (another runner's, by its headers).
    async fn call_volatile_from(
        self: &Arc<Self>,
        address: &EntityAddress,
        request: E::Request,
        span: tracing::Span,
        incoming: Incoming,
    ) -> Result<E::Reply, ClusterError> {
        let (reply, wait) = oneshot::channel();
        let mut envelope = Box::new(Envelope::Volatile {
            request,
            reply,
            span,
            incoming,
        });
        loop {
            let mailbox = self
                .mailbox(address)
                .map_err(|NotOwned| not_assigned(address))?;
            self.metrics.mailbox_depth.increment(1.0);
            match mailbox.try_send(envelope) {
                Ok(()) => break,
                Err(SendError::Full(_)) => {
                    self.metrics.mailbox_depth.decrement(1.0);
                    return Err(ClusterError::MailboxFull {
                        entity_type: E::NAME.to_owned(),
                        entity_id: address.entity_id.to_string(),
                        capacity: self.options.mailbox,
                    });
                }
                // The entity passivated between lookup and send: activate anew.
                Err(SendError::Closed(returned)) => {
                    self.metrics.mailbox_depth.decrement(1.0);
                    envelope = returned;
                }
            }
        }
        wait.await.unwrap_or(Err(ClusterError::ShuttingDown))
    }

    /// The first half of a persisted call: stores the message (or finds the
    /// stored one with the same key) and registers this caller's wait for
    /// its reply. The cluster then routes it to the shard's owner.
    pub(crate) async fn store(
        self: &Arc<Self>,
        address: &EntityAddress,
        info: RequestInfo,
        request: E::Request,
        deliver_at: Option<SystemTime>,
    ) -> Result<Stored<E>, ClusterError> {
        let svc = &self.svc;
        let payload = codec::encode("request", &request)?;
        if payload.len() > svc.config.max_payload_bytes {
            return Err(ClusterError::PayloadTooLarge {
                size: payload.len(),
                limit: svc.config.max_payload_bytes,
            });
        }
        let id = MessageId::from(svc.ids.next_id());
        let now = now_unix_ms() as i64;
        let deliver_at = deliver_at.map(unix_ms).filter(|at| *at > now);
        let key = info
            .primary_key
            .as_deref()
            .map(|pk| MessageKey::new(E::NAME, &address.entity_id, info.tag, pk));
        let wait = svc.waiters.register(id);
        let message = NewMessage {
            id,
            address: address.clone(),
            tag: info.tag.to_owned(),
            key,
            payload,
            // The caller's trace and identity, stored with the message so
            // that a resumed or remote run continues the caller's trace.
            headers: context::outgoing_headers(&svc.runner),
            deliver_at,
            created_at: now,
        };
        match svc.writer.save(message.clone()).await? {
            SaveOutcome::Saved => Ok(Stored::Pending(Pending {
                id,
                message: Some(message),
                request: if deliver_at.is_none() {
                    Some(request)
                } else {
                    None
                },
                wait,
            })),
            SaveOutcome::Duplicate {
                reply: Some(reply), ..
            } => Ok(Stored::Replied(reply)),
            SaveOutcome::Duplicate {
                id: existing,
                reply: None,
            } => {
                drop(wait);
                let wait = svc.waiters.register(existing);
                // The reply may have been recorded between the save and the registration.
                if let Some(reply) = svc.storage.reply(existing).await? {
                    return Ok(Stored::Replied(reply));
                }
                Ok(Stored::Pending(Pending {
                    id: existing,
                    message: None,
                    request: None,
                    wait,
                }))
            }
        }
    }

    /// Hands a just-stored message to its entity on this runner. It is
    /// never refused for a full mailbox: it is stored, and this caller adds
    /// at most one. Fails when this runner does not own the shard (any
    /// more); the message stays stored for the owner.
    pub(crate) fn dispatch_new(
        self: &Arc<Self>,
        address: &EntityAddress,
        id: MessageId,
        request: E::Request,
        span: tracing::Span,
        headers: &Headers,
    ) -> Result<(), NotOwned> {
        // Claimed before dispatch so the delivery scan cannot dispatch it too.
        let Some(claim) = InFlightClaim::new(&self.svc, id) else {
            return Ok(()); // already under way (the scan or a deliver got it first)
        };
        let incoming = Incoming::from_headers(headers);
        let mut envelope = Box::new(Envelope::Persisted {
            id,
            request,
            span,
            incoming,
        });
        loop {
            let mailbox = self.mailbox(address)?;
            self.metrics.mailbox_depth.increment(1.0);
            match mailbox.send_stored(envelope) {
                Ok(()) => {
                    claim.keep();
                    return Ok(());
                }
                Err(SendError::Closed(returned) | SendError::Full(returned)) => {
                    self.metrics.mailbox_depth.decrement(1.0);
                    if self.svc.shutdown.is_cancelled() {
                        return Ok(());
                    }
                    envelope = returned;
                }
            }
        }
    }

    /// Loads the entity: stored state for `state = persisted`, else a fresh one.
    async fn load(&self, ctx: &EntityContext) -> Result<E, ClusterError> {
        if self.options.persisted_state
            && let Some(bytes) = self
                .svc
                .storage
                .load_state(E::NAME, ctx.entity_id())
                .await?
            && let Some(decoded) = E::decode_state(&bytes)
        {
            return Ok(decoded?);
        }
        Ok(E::create(ctx))
    }

    fn context(
        &self,
        address: &EntityAddress,
        message: Option<MessageId>,
        fence: &Option<Fence>,
        trace: Option<TraceContext>,
    ) -> EntityContext {
        EntityContext::new(
            address.clone(),
            self.svc.runner.clone(),
            message,
            fence.as_ref().map(|f| f.epoch),
            self.svc.ids.clone(),
            self.svc.leader.clone(),
            trace,
        )
    }

    /// The current context of one handler run; records its trace on `span`.
    fn current(
        &self,
        address: &EntityAddress,
        incoming: Incoming,
        span: &tracing::Span,
    ) -> ClusterContext {
        incoming.trace.record_on(span);
        ClusterContext::new(
            self.svc.runner.clone(),
            Some(address.shard.clone()),
            self.svc.leader.clone(),
            self.svc.ids.clone(),
            incoming.trace,
            incoming.sender,
        )
    }

    /// The entity's task: one message at a time until idle, shutdown or failure.
    async fn run_entity(
        self: Arc<Self>,
        address: EntityAddress,
        fence: Option<Fence>,
        rx: Arc<Mailbox<Mail<E>>>,
    ) {
        let mut instance =
            match Box::pin(self.load(&self.context(&address, None, &fence, None))).await {
                Ok(instance) => instance,
                Err(error) => return self.give_up(&address, &rx, &error),
            };
        // Passivation is the idle sweeper's job (`passivate_idle`): it closes
        // the mailbox, and `recv` returns `None`. No timer per entity.
        while let Some(envelope) = rx.recv().await {
            self.metrics.mailbox_depth.decrement(1.0);
            let healthy = Box::pin(self.handle(&address, &fence, &mut instance, *envelope)).await;
            rx.done();
            if !healthy {
                // A panic, or a completion that was not recorded: the in-memory
                // state may differ from what is stored. Start again from storage.
                match Box::pin(self.load(&self.context(&address, None, &fence, None))).await {
                    Ok(fresh) => instance = fresh,
                    Err(error) => return self.give_up(&address, &rx, &error),
                }
            }
        }
        // Passivated (nothing queued), or stopped by shutdown after the handler
        // under way finished: queued volatile calls fail, queued persisted
        // messages stay stored and are resumed on the next start.
        self.passivate(&address, &rx);
        while let Some(envelope) = rx.try_recv() {
            self.metrics.mailbox_depth.decrement(1.0);
            match *envelope {
                Envelope::Volatile { reply, .. } => {
                    let _ = reply.send(Err(ClusterError::ShuttingDown));
                }
                Envelope::Persisted { id, .. } => self.svc.in_flight.release(id),
            }
        }
    }

    /// The entity cannot be (re)loaded: retire it and fail what it holds.
    fn give_up(&self, address: &EntityAddress, rx: &Mailbox<Mail<E>>, error: &ClusterError) {
        tracing::warn!(%address, %error, "entity could not be activated");
        self.passivate(address, rx);
        let reason = error.to_string();
        while let Some(envelope) = rx.try_recv() {
            self.metrics.mailbox_depth.decrement(1.0);
            self.fail(*envelope, &reason);
        }
    }

    /// Runs one message. Returns false if the entity must be restarted.
    async fn handle(
        &self,
        address: &EntityAddress,
        fence: &Option<Fence>,
        instance: &mut E,
        envelope: Envelope<E>,
    ) -> bool {
        match envelope {
            Envelope::Volatile {
                request,
                reply,
                span,
                incoming,
            } => {
                if reply.is_closed() {
                    return true; // the caller gave up before the entity got to it
                }
                let current = self.current(address, incoming, &span);
                let ctx = self.context(address, None, fence, Some(*current.trace()));
                let started = Instant::now();
                let result = context::scoped(
                    current,
                    AssertUnwindSafe(instance.handle(&ctx, request)).catch_unwind(),
                )
                .instrument(span)
                .await;
                self.metrics
                    .handler_seconds
                    .record(started.elapsed().as_secs_f64());
                self.metrics.volatile.increment(1);
                match result {
                    Ok(value) => {
                        let _ = reply.send(Ok(value));
                        true
                    }
                    Err(panic) => {
                        self.metrics.panics.increment(1);
                        let message = panic_message(&*panic);
                        tracing::error!(%address, panic = %message, "handler panicked; entity restarted");
                        let _ = reply.send(Err(ClusterError::HandlerPanicked(message)));
                        false
                    }
                }
            }
            Envelope::Persisted {
                id,
                request,
                span,
                incoming,
            } => {
                let current = self.current(address, incoming, &span);
                let ctx = self.context(address, Some(id), fence, Some(*current.trace()));
                let started = Instant::now();
                let result = context::scoped(
                    current,
                    AssertUnwindSafe(instance.handle(&ctx, request)).catch_unwind(),
                )
                .instrument(span.clone())
                .await;
                self.metrics
                    .handler_seconds
                    .record(started.elapsed().as_secs_f64());
                self.metrics.persisted.increment(1);
                let mut healthy = true;
                let mut reply = match result {
                    Ok(value) => match codec::encode("reply", &value) {
                        Ok(bytes) => StoredReply::Ok(bytes),
                        Err(error) => {
                            healthy = false;
                            StoredReply::Rejected(error.to_string())
                        }
                    },
                    Err(panic) => {
                        self.metrics.panics.increment(1);
                        let message = panic_message(&*panic);
                        tracing::error!(parent: &span, %address, panic = %message, "handler panicked; entity restarted");
                        healthy = false;
                        StoredReply::Panicked(message)
                    }
                };
                let mut state = None;
                if healthy && self.options.persisted_state {
                    match instance.encode_state() {
                        Some(Ok(bytes)) => {
                            state = Some(EntityState {
                                entity_type: E::NAME.to_owned(),
                                entity_id: address.entity_id.to_string(),
                                bytes,
                            })
                        }
                        Some(Err(error)) => {
                            healthy = false;
                            reply = StoredReply::Rejected(error.to_string());
                        }
                        None => {}
                    }
                }
                let effects = if healthy {
                    ctx.take_staged()
                } else {
                    Vec::new()
                };
                let completion = Completion {
                    message_id: id,
                    reply: reply.clone(),
                    state,
                    effects,
                    fence: fence.clone(),
                };
                let mut recorded = true;
                match self.svc.writer.complete(completion).await {
                    Ok(CompletionOutcome::Recorded) => self.svc.waiters.complete(id, &reply),
                    Ok(CompletionOutcome::EffectsFailed(message)) => {
                        healthy = false;
                        self.svc
                            .waiters
                            .complete(id, &StoredReply::EffectsFailed(message));
                    }
                    Ok(CompletionOutcome::AlreadyProcessed(earlier)) => {
                        healthy = false;
                        if let Some(earlier) = earlier {
                            self.svc.waiters.complete(id, &earlier);
                        }
                    }
                    Ok(CompletionOutcome::Fenced { stale, current }) => {
                        // This runner lost the shard: the new owner runs it.
                        healthy = false;
                        recorded = false;
                        tracing::warn!(parent: &span, %address, %stale, ?current, "completion fenced: the shard has a newer owner");
                    }
                    Err(error) => {
                        // Nothing was recorded: the message stays stored and the
                        // delivery loop runs it again.
                        healthy = false;
                        recorded = false;
                        tracing::warn!(parent: &span, %address, %error, "completion not recorded; message will be retried");
                    }
                }
                if recorded {
                    self.svc.in_flight.completed(id);
                } else {
                    self.svc.in_flight.release(id);
                }
                healthy
            }
        }
    }

    /// Closes the entity's mailbox and removes it from the map (retirement
    /// after shutdown or a failed load). Closing happens under the mailbox's
    /// lock, so no message can land after it: a sender that still holds the
    /// mailbox gets `Closed` and activates a new entity.
    fn passivate(&self, address: &EntityAddress, rx: &Mailbox<Mail<E>>) {
        let mut entities = lock(&self.entities);
        rx.close();
        if entities
            .get(&address.entity_id)
            .is_some_and(|m| std::ptr::eq(&**m, rx))
        {
            entities.remove(&address.entity_id);
        }
    }

    /// Passivates every entity idle for `max_idle`.
    fn passivate_idle(&self) {
        let now = std::time::Instant::now();
        let max_idle = self.options.max_idle;
        lock(&self.entities).retain(|_, mailbox| !mailbox.close_if_idle(max_idle, now));
    }

    /// Stops every active entity after its current handler (shutdown).
    fn stop_all(&self) {
        for mailbox in lock(&self.entities).values() {
            mailbox.stop();
        }
    }

    /// Fails a message that cannot be handled now. A persisted one stays
    /// stored and is retried by the delivery loop.
    fn fail(&self, envelope: Envelope<E>, reason: &str) {
        match envelope {
            Envelope::Volatile { reply, .. } => {
                let _ = reply.send(Err(ClusterError::Storage(
                    crate::error::StorageError::Corrupt(format!("entity unavailable: {reason}")),
                )));
            }
            Envelope::Persisted { id, .. } => {
                self.svc.in_flight.release(id);
                self.svc.wake_delivery.notify_one();
            }
        }
    }
}

impl<E: Entity> StoredDispatch for Arc<EntityManager<E>> {
    fn dispatch_stored(&self, message: StoredMessage) -> bool {
        let manager = self;
        // Not owned (any more): it stays stored for the shard's owner.
        let Some(fence) = self.svc.ownership.fence(&message.address.shard) else {
            return true;
        };
        let Some(claim) = InFlightClaim::new(&self.svc, message.id) else {
            return true;
        };
        let span = message_span(
            &message.address,
            &message.tag,
            "persisted",
            Some(message.id),
        );
        let request = match codec::decode::<E::Request>("request", &message.payload) {
            Ok(request) => request,
            Err(error) => {
                // A payload that no longer decodes would be retried forever:
                // record the rejection as its reply instead.
                tracing::error!(parent: &span, %error, "stored message does not decode; rejected");
                let svc = self.svc.clone();
                let id = message.id;
                let reply =
                    StoredReply::Rejected(format!("stored request does not decode: {error}"));
                claim.keep();
                self.svc.tasks.spawn(async move {
                    let completion = Completion {
                        message_id: id,
                        reply: reply.clone(),
                        state: None,
                        effects: Vec::new(),
                        fence,
                    };
                    if let Ok(CompletionOutcome::Recorded) = svc.writer.complete(completion).await {
                        svc.waiters.complete(id, &reply);
                    }
                    svc.in_flight.release(id);
                });
                return true;
            }
        };
        let incoming = Incoming::from_headers(&message.headers);
        let mut envelope = Box::new(Envelope::Persisted {
            id: message.id,
            request,
            span,
            incoming,
        });
        loop {
            let Ok(mailbox) = manager.mailbox(&message.address) else {
                return true; // the shard moved away since the check above
            };
            manager.metrics.mailbox_depth.increment(1.0);
            match mailbox.try_send(envelope) {
                Ok(()) => {
                    claim.keep();
                    return true;
                }
                Err(SendError::Closed(returned)) => {
                    manager.metrics.mailbox_depth.decrement(1.0);
                    envelope = returned;
                }
                Err(SendError::Full(_)) => {
                    manager.metrics.mailbox_depth.decrement(1.0);
                    return false;
                }
            }
        }
    }

    fn stop_shards(&self, shards: &HashSet<ShardId>) {
        let count = self.svc.config.shards;
        for (id, mailbox) in lock(&self.entities).iter() {
            if shards.contains(&ShardId::for_entity(DEFAULT_GROUP, id, count)) {
                mailbox.stop();
            }
        }
    }

    fn active_in(&self, shards: &HashSet<ShardId>) -> usize {
        let count = self.svc.config.shards;
        lock(&self.entities)
            .keys()
            .filter(|id| shards.contains(&ShardId::for_entity(DEFAULT_GROUP, id, count)))
            .count()
    }

    fn call_volatile_encoded(
        &self,
        address: EntityAddress,
        payload: Vec<u8>,
        headers: Headers,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, ClusterError>> {
        let manager = self.clone();
        Box::pin(async move {
            let request = codec::decode::<E::Request>("request", &payload)?;
            let info = E::describe(&request);
            if info.persisted {
                return Err(ClusterError::Rejected(format!(
                    "rpc `{}` is persisted; it cannot be called as a volatile call",
                    info.tag
                )));
            }
            let span = message_span(&address, info.tag, "volatile", None);
            let incoming = Incoming::from_headers(&headers);
            let reply = manager
                .call_volatile_from(&address, request, span, incoming)
                .await?;
            Ok(codec::encode("reply", &reply)?)
        })
    }

    fn active(&self) -> usize {
        lock(&self.entities).len()
    }

    fn stop_all(&self) {
        EntityManager::stop_all(self);
    }

    fn passivate_idle(&self) {
        EntityManager::passivate_idle(self);
    }

    fn max_idle(&self) -> std::time::Duration {
        self.options.max_idle
    }
}

/// The span of one message.
pub(crate) fn message_span(
    address: &EntityAddress,
    rpc: &str,
    delivery: &'static str,
    message_id: Option<MessageId>,
) -> tracing::Span {
    tracing::info_span!(
        "flotilla.message",
        entity_type = %address.entity_type,
        entity_id = %address.entity_id,
        shard = %address.shard,
        rpc,
        delivery,
        message_id = message_id.map(|id| id.0),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    )
}

/// A message claimed in `InFlight`; released on drop unless kept.
struct InFlightClaim<'a> {
    svc: &'a Services,
    id: MessageId,
    kept: bool,
}

impl<'a> InFlightClaim<'a> {
    fn new(svc: &'a Services, id: MessageId) -> Option<Self> {
        // Not `then_some(Self { .. })`: that builds the claim even when
        // `claim` failed, and dropping it would release the message another
        // dispatch holds, which would then run a second time.
        if svc.in_flight.claim(id) {
            Some(Self {
                svc,
                id,
                kept: false,
            })
        } else {
            None
        }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for InFlightClaim<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.svc.in_flight.release(self.id);
        }
    }
}

/// The outcome of [`EntityManager::store`].
pub(crate) enum Stored<E: Entity> {
    /// A message with the same key was processed already: its reply.
    Replied(StoredReply),
    /// Stored (or attached to the stored one with the same key): waiting.
    Pending(Pending<E>),
}

/// A stored message whose reply a caller waits for.
pub(crate) struct Pending<E: Entity> {
    /// The message id (of the earlier message, for a duplicate key).
    pub(crate) id: MessageId,
    /// The message, when this caller stored it.
    pub(crate) message: Option<StoredMessage>,
    /// The request, when this caller stored it and it is due now: the
    /// owner-is-local path hands it over without decoding.
    pub(crate) request: Option<E::Request>,
    /// This caller's registration for the reply.
    pub(crate) wait: ReplyWait,
}

/// The error of a call whose shard this runner does not own.
pub(crate) fn not_assigned(address: &EntityAddress) -> ClusterError {
    ClusterError::EntityNotAssigned {
        entity_type: address.entity_type.to_string(),
        entity_id: address.entity_id.to_string(),
        shard: address.shard.to_string(),
    }
}

/// Decodes a recorded reply into the rpc's reply enum.
pub(crate) fn decode_reply<E: Entity>(reply: StoredReply) -> Result<E::Reply, ClusterError> {
    match reply {
        StoredReply::Ok(bytes) => Ok(codec::decode("reply", &bytes)?),
        StoredReply::Panicked(message) => Err(ClusterError::HandlerPanicked(message)),
        StoredReply::EffectsFailed(message) => Err(ClusterError::EffectsFailed(message)),
        StoredReply::Rejected(message) => Err(ClusterError::Rejected(message)),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
