//! Routing of calls to shard owners, and the owner's side of the runner
//! protocol.
//!
//! A call resolves its shard's route ([`Route`]). Local: straight to the
//! entity's mailbox. Remote: one transport request ([`WireRequest`]).
//! Unassigned, or an owner that says "not here" or cannot be reached: wait
//! for the routing table to change (or a short backoff) and try again, until
//! the call's deadline; then a typed error (`EntityNotAssigned`,
//! `RunnerUnavailable`).
//!
//! A persisted call is stored first (by the caller's own process), then the
//! owner is told over the runner link and answers with the recorded reply.
//! With no link (no transport, or the owner unreachable) the caller sends a
//! `MessagesReady` signal after the commit and waits for the reply through
//! its own waiters or, as a safety net, by reading it from storage.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::ClusterCore;
use super::ownership::Route;
use super::wire::{self, RemoteError, WireAddress, WireMessage, WireReply, WireRequest};
use crate::entity::Entity;
use crate::entity::manager::{Pending, Stored, decode_reply, message_span, not_assigned};
use crate::error::ClusterError;
use crate::sharding::{EntityAddress, ShardId};
use crate::snowflake::now_unix_ms;
use crate::storage::{Signal, StoredReply};
use crate::transport::{Handler, Incoming, Request, TransportError, WireError, handler_fn};

/// First wait after a failed attempt; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How often a caller that cannot reach the owner reads its reply from storage.
const REPLY_CHECK: Duration = Duration::from_millis(500);

/// Why the last attempt of a call failed (reported at the deadline).
enum LastFailure {
    None,
    NotAssigned,
    Unavailable { runner: String, reason: String },
}

impl LastFailure {
    fn into_error(self, address: &EntityAddress, timeout: Duration) -> ClusterError {
        match self {
            Self::None => ClusterError::Timeout(timeout),
            Self::NotAssigned => not_assigned(address),
            Self::Unavailable { runner, reason } => {
                ClusterError::RunnerUnavailable { runner, reason }
            }
        }
    }
}

/// What one remote attempt came to.
enum Attempt<T> {
    Done(Result<T, ClusterError>),
    Retry(LastFailure),
}

impl ClusterCore {
    /// Waits for a routing change, `backoff` or the deadline, whichever
    /// comes first; doubles `backoff`.
    async fn pause(
        &self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        backoff: &mut Duration,
        deadline: Instant,
    ) {
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(*backoff) => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    /// One request to a remote owner.
    async fn remote(
        &self,
        runner: &crate::sharding::RunnerId,
        peer: std::net::SocketAddr,
        request: &WireRequest,
        deadline: Instant,
    ) -> Attempt<WireReply> {
        let Some(transport) = &self.transport else {
            return Attempt::Retry(LastFailure::Unavailable {
                runner: runner.to_string(),
                reason: "this process has no runner transport (no cluster secret)".to_owned(),
            });
        };
        let body = match wire::encode("cluster request", request) {
            Ok(body) => body,
            Err(e) => return Attempt::Done(Err(e.into())),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        match transport.call(peer, Request::new(body), remaining).await {
            Ok(bytes) => Attempt::Done(
                wire::decode::<WireReply>("cluster reply", &bytes).map_err(ClusterError::from),
            ),
            Err(TransportError::Remote(WireError::NotHere(_) | WireError::ShuttingDown)) => {
                Attempt::Retry(LastFailure::NotAssigned)
            }
            Err(e @ TransportError::Unavailable { .. }) => {
                Attempt::Retry(LastFailure::Unavailable {
                    runner: runner.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(TransportError::Timeout { after, .. }) => {
                Attempt::Done(Err(ClusterError::Timeout(after)))
            }
            Err(TransportError::FrameTooLarge { size, max }) => {
                Attempt::Done(Err(ClusterError::PayloadTooLarge { size, limit: max }))
            }
            Err(e) => Attempt::Done(Err(ClusterError::RunnerUnavailable {
                runner: runner.to_string(),
                reason: e.to_string(),
            })),
        }
    }

    /// A volatile call in a cluster: to the owner, wherever it is.
    pub(crate) async fn call_volatile_routed<E: Entity>(
        &self,
        manager: &Arc<crate::entity::manager::EntityManager<E>>,
        address: &EntityAddress,
        request: E::Request,
        timeout: Duration,
    ) -> Result<E::Reply, ClusterError> {
        let deadline = Instant::now() + timeout;
        let info = E::describe(&request);
        let payload = crate::codec::encode("request", &request)?;
        if payload.len() > self.config.max_payload_bytes {
            return Err(ClusterError::PayloadTooLarge {
                size: payload.len(),
                limit: self.config.max_payload_bytes,
            });
        }
        let mut request = Some(request);
        let mut changes = self.ownership.subscribe();
        let mut backoff = MIN_BACKOFF;
        let mut last = LastFailure::None;
        loop {
            if Instant::now() >= deadline {
                return Err(last.into_error(address, timeout));
            }
            changes.borrow_and_update();
            match self.ownership.route(&address.shard) {
                Route::Local(_) => {
                    let request = match request.take() {
                        Some(request) => request,
                        None => crate::codec::decode("request", &payload)?,
                    };
                    let span = message_span(address, info.tag, "volatile", None);
                    match manager.call_volatile(address, request, span).await {
                        // The shard moved away between the route and the mailbox.
                        Err(ClusterError::EntityNotAssigned { .. }) => {
                            last = LastFailure::NotAssigned;
                        }
                        Err(ClusterError::ShuttingDown) if !self.shutdown.is_cancelled() => {
                            last = LastFailure::NotAssigned;
                        }
                        other => return other,
                    }
                }
                Route::Remote {
                    runner,
                    address: peer,
                } => {
                    let wire_request = WireRequest::Volatile {
                        target: WireAddress::new(address),
                        payload: payload.clone(),
                        headers: crate::context::outgoing_headers(&self.runner),
                    };
                    match self.remote(&runner, peer, &wire_request, deadline).await {
                        Attempt::Done(Ok(WireReply::Volatile(bytes))) => {
                            return Ok(crate::codec::decode("reply", &bytes)?);
                        }
                        Attempt::Done(Ok(WireReply::Failed(e))) => {
                            return Err(e.into_cluster(timeout));
                        }
                        Attempt::Done(Ok(WireReply::Recorded(_))) => {
                            return Err(ClusterError::Rejected(
                                "the owner answered a volatile call with a stored reply".to_owned(),
                            ));
                        }
                        Attempt::Done(Err(e)) => return Err(e),
                        Attempt::Retry(failure) => last = failure,
                    }
                }
                Route::Unassigned => last = LastFailure::NotAssigned,
            }
            self.pause(&mut changes, &mut backoff, deadline).await;
        }
    }

    /// A persisted call: store, route to the owner, wait for the reply.
    pub(crate) async fn call_persisted_routed<E: Entity>(
        &self,
        manager: &Arc<crate::entity::manager::EntityManager<E>>,
        address: &EntityAddress,
        request: E::Request,
        deliver_at: Option<std::time::SystemTime>,
        timeout: Duration,
    ) -> Result<E::Reply, ClusterError> {
        let info = E::describe(&request);
        let span = message_span(address, info.tag, "persisted", None);
        let pending = match manager.store(address, info, request, deliver_at).await? {
            Stored::Replied(reply) => return decode_reply::<E>(reply),
            Stored::Pending(pending) => pending,
        };
        // A scheduled message's deadline runs from its delivery time.
        let delay = deliver_at
            .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or_default();
        let deadline = Instant::now() + timeout + delay;
        let reply = self
            .await_reply(manager, address, pending, span, deadline, timeout)
            .await?;
        decode_reply::<E>(reply)
    }

    /// Routes a stored message to its owner until its reply arrives.
    async fn await_reply<E: Entity>(
        &self,
        manager: &Arc<crate::entity::manager::EntityManager<E>>,
        address: &EntityAddress,
        pending: Pending<E>,
        span: tracing::Span,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<StoredReply, ClusterError> {
        let Pending {
            id,
            mut message,
            mut request,
            mut wait,
        } = pending;
        let scheduled = message
            .as_ref()
            .is_some_and(|m| m.deliver_at.is_some_and(|at| at > now_unix_ms() as i64));
        let mut changes = self.ownership.subscribe();
        let mut backoff = MIN_BACKOFF;
        let mut last = LastFailure::None;
        let mut signalled = false;
        let mut next_check = Instant::now();
        loop {
            if Instant::now() >= deadline {
                return Err(last.into_error(address, timeout));
            }
            changes.borrow_and_update();
            match self.ownership.route(&address.shard) {
                Route::Local(_) => {
                    if let Some(request) = request.take() {
                        let headers = message
                            .as_ref()
                            .map(|m| m.headers.clone())
                            .unwrap_or_default();
                        // Err: the shard was lost just now; the next owner
                        // resumes the message, and the routing change below
                        // sends this caller there.
                        let _ = manager.dispatch_new(address, id, request, span.clone(), &headers);
                    } else if scheduled || !self.in_flight.contains(id) {
                        self.wake_delivery.notify_one();
                    }
                    message = None;
                    // The reply comes from this runner's handler; a routing
                    // change (the shard moving) sends us round again.
                    tokio::select! {
                        reply = wait.wait() => return reply.ok_or(ClusterError::ShuttingDown),
                        _ = changes.changed() => continue,
                        () = tokio::time::sleep_until(deadline) => {
                            return Err(last.into_error(address, timeout));
                        }
                    }
                }
                Route::Remote {
                    runner,
                    address: peer,
                } => {
                    request = None;
                    let wire_request = WireRequest::Deliver {
                        target: WireAddress::new(address),
                        id,
                        message: message.take().map(|m| WireMessage::new(&m)),
                    };
                    match self.remote(&runner, peer, &wire_request, deadline).await {
                        Attempt::Done(Ok(WireReply::Recorded(reply))) => return Ok(reply.into()),
                        Attempt::Done(Ok(WireReply::Failed(e))) => {
                            // A typed failure on the owner (unknown type, a
                            // timeout): the answer; the message stays stored.
                            return Err(e.into_cluster(timeout));
                        }
                        Attempt::Done(Ok(WireReply::Volatile(_))) => {
                            return Err(ClusterError::Rejected(
                                "the owner answered a persisted call with a volatile reply"
                                    .to_owned(),
                            ));
                        }
                        Attempt::Done(Err(e @ ClusterError::Timeout(_))) => return Err(e),
                        Attempt::Done(Err(_)) => {
                            last = LastFailure::NotAssigned;
                            self.signal_ready(&address.shard, &mut signalled).await;
                        }
                        Attempt::Retry(failure) => {
                            last = failure;
                            self.signal_ready(&address.shard, &mut signalled).await;
                        }
                    }
                }
                Route::Unassigned => {
                    request = None;
                    message = None;
                    last = LastFailure::NotAssigned;
                    self.signal_ready(&address.shard, &mut signalled).await;
                }
            }
            // The reply may have been recorded by an owner we could not
            // reach (or that resumed the message by itself): the safety net,
            // read at most every REPLY_CHECK.
            if Instant::now() >= next_check {
                next_check = Instant::now() + REPLY_CHECK;
                if let Ok(Some(reply)) = self.storage.reply(id).await {
                    return Ok(reply);
                }
            }
            tokio::select! {
                reply = wait.wait() => return reply.ok_or(ClusterError::ShuttingDown),
                () = self.pause(&mut changes, &mut backoff, deadline) => {}
            }
        }
    }

    /// Tells whichever runner owns `shard` that messages are waiting, once
    /// per call (after the commit: the message is stored before this runs).
    async fn signal_ready(&self, shard: &ShardId, signalled: &mut bool) {
        if *signalled {
            return;
        }
        *signalled = true;
        if let Some(runners) = &self.runners
            && let Err(error) = runners.signal(Signal::MessagesReady(shard.clone())).await
        {
            tracing::debug!(%error, "could not signal stored messages");
        }
    }
}

/// The transport handler of a runner: answers other runners' requests.
pub(crate) fn handler(core: Weak<ClusterCore>) -> Handler {
    handler_fn(move |incoming: Incoming| {
        let core = core.upgrade();
        async move {
            match core {
                Some(core) => serve(&core, incoming).await,
                None => Err(WireError::ShuttingDown),
            }
        }
    })
}

fn answer(reply: &WireReply) -> Result<Vec<u8>, WireError> {
    wire::encode("cluster reply", reply).map_err(|e| WireError::Internal(e.to_string()))
}

fn failed(error: RemoteError) -> Result<Vec<u8>, WireError> {
    answer(&WireReply::Failed(error))
}

async fn serve(core: &Arc<ClusterCore>, incoming: Incoming) -> Result<Vec<u8>, WireError> {
    if core.shutdown.is_cancelled() {
        return Err(WireError::ShuttingDown);
    }
    let request = match wire::decode::<WireRequest>("cluster request", &incoming.request.body) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(peer = %incoming.peer, %error, "malformed cluster request refused");
            return failed(RemoteError::Codec(error.to_string()));
        }
    };
    let target = match &request {
        WireRequest::Volatile { target, .. } | WireRequest::Deliver { target, .. } => target,
    };
    let Some(registered) = core.types.get(target.entity_type.as_str()) else {
        return failed(RemoteError::UnknownEntityType(target.entity_type.clone()));
    };
    let address = target.address();
    let expected = ShardId::for_entity(
        address.shard.group(),
        &address.entity_id,
        core.config.shards,
    );
    if expected != address.shard {
        return failed(RemoteError::Codec(format!(
            "entity {} is on shard {expected}, not {}",
            address.entity_id, address.shard
        )));
    }
    // Subscribed before the ownership check: a hand-over after the check
    // wakes the wait below (one before `subscribe` would never fire).
    let mut changes = core.ownership.subscribe();
    if core.ownership.fence(&address.shard).is_none() {
        return Err(WireError::NotHere(address.shard.to_string()));
    }
    match request {
        WireRequest::Volatile {
            payload, headers, ..
        } => {
            let call = registered
                .erased
                .call_volatile_encoded(address, payload, headers);
            match tokio::time::timeout(incoming.budget, call).await {
                Ok(Ok(bytes)) => answer(&WireReply::Volatile(bytes)),
                Ok(Err(ClusterError::EntityNotAssigned { shard, .. })) => {
                    Err(WireError::NotHere(shard))
                }
                Ok(Err(ClusterError::ShuttingDown)) => Err(WireError::ShuttingDown),
                Ok(Err(error)) => failed(RemoteError::from_cluster(error)),
                Err(_) => failed(RemoteError::Timeout),
            }
        }
        WireRequest::Deliver { id, message, .. } => {
            let mut wait = core.waiters.register(id);
            match message {
                Some(message) => {
                    let message = message.into_stored(id, address.clone());
                    let due = message
                        .deliver_at
                        .is_none_or(|at| at <= now_unix_ms() as i64);
                    if !due || !registered.erased.dispatch_stored(message) {
                        // Scheduled, or the mailbox is full: the delivery loop
                        // dispatches it in time.
                        core.wake_delivery.notify_one();
                    }
                }
                None => core.wake_delivery.notify_one(),
            }
            if !core.in_flight.contains(id) {
                match core.storage.reply(id).await {
                    Ok(Some(reply)) => return answer(&WireReply::Recorded(reply.into())),
                    Ok(None) => {}
                    Err(error) => return failed(RemoteError::Storage(error.to_string())),
                }
            }
            if core.ownership.fence(&address.shard).is_none() {
                return Err(WireError::NotHere(address.shard.to_string()));
            }
            let budget = tokio::time::sleep(incoming.budget);
            tokio::pin!(budget);
            let mut safety = tokio::time::interval(REPLY_CHECK);
            safety.tick().await;
            loop {
                tokio::select! {
                    _ = safety.tick() => {
                        // The net under the waiter: a reply recorded by a
                        // dispatch this request did not see.
                        if !core.in_flight.contains(id)
                            && let Ok(Some(reply)) = core.storage.reply(id).await
                        {
                            return answer(&WireReply::Recorded(reply.into()));
                        }
                    }
                    reply = wait.wait() => {
                        return match reply {
                            Some(reply) => answer(&WireReply::Recorded(reply.into())),
                            None => Err(WireError::ShuttingDown),
                        };
                    }
                    changed = changes.changed() => {
                        if changed.is_err() || core.ownership.fence(&address.shard).is_none() {
                            return Err(WireError::NotHere(address.shard.to_string()));
                        }
                    }
                    () = &mut budget => return failed(RemoteError::Timeout),
                }
            }
        }
    }
}
