//! The current cluster context: which runner, shard and trace the code
//! running now belongs to, readable from anywhere in a handler without
//! passing anything down.
//!
//! The runtime sets it (a tokio task-local) around every entity handler it
//! runs, volatile or persisted; the `http` feature's
//! `http::ClusterContextLayer` sets it around plain HTTP handlers. Outside
//! both, every accessor returns `None`; nothing panics.
//!
//! ```
//! use flotilla::prelude::*;
//!
//! #[derive(Default)]
//! struct Probe;
//!
//! #[entity]
//! impl Probe {
//!     #[rpc]
//!     async fn whereami(&self) -> Option<String> {
//!         // No `&EntityContext` argument needed: helpers deep in the call
//!         // tree read the same facts.
//!         flotilla::context::shard_id().map(|shard| shard.to_string())
//!     }
//! }
//!
//! assert!(flotilla::context::current().is_none(), "outside a handler");
//! ```
//!
//! The context is task-local: a task spawned from a handler with
//! `tokio::spawn` does not inherit it (wrap its future in [`scope`] with
//! [`current`] to carry it over).
//!
//! # Trace propagation
//!
//! Each handler run has a [`TraceContext`]: the trace it belongs to, its own
//! span id, and the span id of the code that sent the message (its parent).
//! A message sent from inside a handler carries the W3C `traceparent` of the
//! sender's span in its headers ([`TRACEPARENT_HEADER`]), together with the
//! sender's runner ([`SENDER_RUNNER_HEADER`]) and shard
//! ([`SENDER_SHARD_HEADER`]). Persisted messages store the headers, so a
//! message resumed after a restart, or on another runner, continues the
//! trace it was sent in. The handler's `flotilla.message` span records
//! `trace_id`, `span_id` and `parent_span_id`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::sharding::{RunnerId, ShardId};
use crate::snowflake::{Snowflake, SnowflakeGenerator};
use crate::storage::Headers;

mod trace;

pub use trace::{ParseTraceParentError, SpanId, TraceContext, TraceId, TraceParent};

/// Header carrying the sender's W3C trace context (`00-<trace>-<span>-<flags>`).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header carrying the id of the runner that sent a message.
pub const SENDER_RUNNER_HEADER: &str = "flotilla-sender-runner";
/// Header carrying the shard of the entity that sent a message (absent when
/// the sender was not an entity handler).
pub const SENDER_SHARD_HEADER: &str = "flotilla-sender-shard";

tokio::task_local! {
    static CURRENT: ClusterContext;
}

/// What the code running now belongs to: its runner, its entity's shard, the
/// leader status of its runner and its trace.
///
/// ```
/// // Outside a cluster there is no context, and asking does not panic.
/// assert!(flotilla::context::current().is_none());
/// assert!(flotilla::context::runner_id().is_none());
/// assert!(flotilla::context::is_leader().is_none());
/// ```
#[derive(Clone)]
pub struct ClusterContext {
    runner: RunnerId,
    shard: Option<ShardId>,
    leader: Arc<LeaderStatus>,
    ids: Arc<SnowflakeGenerator>,
    trace: TraceContext,
    sender: Option<Sender>,
}

impl fmt::Debug for ClusterContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterContext")
            .field("runner", &self.runner)
            .field("shard", &self.shard)
            .field("is_leader", &self.leader.get())
            .field("trace", &self.trace)
            .field("sender", &self.sender)
            .finish()
    }
}

impl ClusterContext {
    pub(crate) fn new(
        runner: RunnerId,
        shard: Option<ShardId>,
        leader: Arc<LeaderStatus>,
        ids: Arc<SnowflakeGenerator>,
        trace: TraceContext,
        sender: Option<Sender>,
    ) -> Self {
        Self {
            runner,
            shard,
            leader,
            ids,
            trace,
            sender,
        }
    }

    /// The runner the code runs on.
    pub fn runner_id(&self) -> &RunnerId {
        &self.runner
    }

    /// The shard of the entity whose handler runs; `None` in a plain HTTP
    /// handler.
    pub fn shard_id(&self) -> Option<&ShardId> {
        self.shard.as_ref()
    }

    /// Whether this runner runs the cluster's leader singleton now (read
    /// live: it follows the leader when it moves): the runner owning the shard
    /// of `flotilla.leader` leads; a single runner always does.
    pub fn is_leader(&self) -> Option<bool> {
        self.leader.get()
    }

    /// The trace of the code running now.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Who sent the message being handled (from its headers); `None` in a
    /// plain HTTP handler, or for a message stored without them.
    pub fn sender(&self) -> Option<&Sender> {
        self.sender.as_ref()
    }

    /// A new cluster-unique, time-ordered id from this runner's generator.
    pub fn snowflake(&self) -> Snowflake {
        self.ids.next_id()
    }

    /// The headers a message sent now carries: the `traceparent` of this
    /// context's span, this runner and, in an entity handler, its shard.
    pub(crate) fn outgoing_headers(&self) -> Headers {
        let mut headers = Headers::new();
        headers.insert(TRACEPARENT_HEADER.to_owned(), self.trace.traceparent());
        headers.insert(SENDER_RUNNER_HEADER.to_owned(), self.runner.to_string());
        if let Some(shard) = &self.shard {
            headers.insert(SENDER_SHARD_HEADER.to_owned(), shard.to_string());
        }
        headers
    }
}

/// The sender of a message, as its headers tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The runner that sent it.
    pub runner: Option<RunnerId>,
    /// The shard of the entity that sent it (`None`: not sent by an entity).
    pub shard: Option<ShardId>,
}

impl Sender {
    /// Reads the sender headers; `None` if neither is present. A malformed
    /// shard header is ignored (headers are informational).
    pub(crate) fn from_headers(headers: &Headers) -> Option<Self> {
        let runner = headers
            .get(SENDER_RUNNER_HEADER)
            .map(|r| RunnerId::new(r.as_str()));
        let shard = headers
            .get(SENDER_SHARD_HEADER)
            .and_then(|s| s.parse::<ShardId>().ok());
        (runner.is_some() || shard.is_some()).then_some(Self { runner, shard })
    }
}

/// The context of the current task, if it runs in a handler (or under
/// `http::ClusterContextLayer`).
pub fn current() -> Option<ClusterContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The shard of the entity whose handler runs now.
pub fn shard_id() -> Option<ShardId> {
    CURRENT.try_with(|c| c.shard.clone()).ok().flatten()
}

/// The runner the current handler runs on.
pub fn runner_id() -> Option<RunnerId> {
    CURRENT.try_with(|c| c.runner.clone()).ok()
}

/// Whether the current handler's runner runs the leader singleton now.
pub fn is_leader() -> Option<bool> {
    CURRENT.try_with(|c| c.leader.get()).ok().flatten()
}

/// The trace of the current handler.
pub fn trace() -> Option<TraceContext> {
    CURRENT.try_with(|c| c.trace).ok()
}

/// Runs `future` with `context` as the current context: for a task spawned
/// from a handler that should keep its handler's context.
///
/// ```
/// # async fn run() {
/// if let Some(context) = flotilla::context::current() {
///     tokio::spawn(flotilla::context::scope(context, async {
///         assert!(flotilla::context::runner_id().is_some());
///     }));
/// }
/// # }
/// ```
pub async fn scope<F: Future>(context: ClusterContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

/// `future` with `context` current, as a nameable future (for the entity
/// manager and tower services).
pub(crate) fn scoped<F: Future>(
    context: ClusterContext,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<ClusterContext, F> {
    CURRENT.scope(context, future)
}

/// Runs `f` with `context` current (the synchronous part of a tower `call`).
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) fn sync_scoped<R>(context: ClusterContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(context, f)
}

/// The outgoing headers of a message sent now from `runner`: the current
/// context's (a child of its trace), or, outside any context, a new trace
/// with this runner as the sender.
pub(crate) fn outgoing_headers(runner: &RunnerId) -> Headers {
    match current() {
        Some(context) => context.outgoing_headers(),
        None => {
            let mut headers = Headers::new();
            headers.insert(
                TRACEPARENT_HEADER.to_owned(),
                TraceContext::root().traceparent(),
            );
            headers.insert(SENDER_RUNNER_HEADER.to_owned(), runner.to_string());
            headers
        }
    }
}

/// Whether a runner runs the cluster's leader singleton, shared by every
/// context of the runner so that handlers see it change while they run.
///
/// The routing table sets it whenever ownership changes (the owner of the
/// shard of `flotilla.leader` leads); before that it is unknown.
#[derive(Debug, Default)]
pub(crate) struct LeaderStatus(AtomicU8);

const FOLLOWER: u8 = 1;
const LEADER: u8 = 2;

impl LeaderStatus {
    /// Records that this runner now runs (`true`) or no longer runs
    /// (`false`) the leader singleton.
    pub(crate) fn set(&self, leader: bool) {
        self.0
            .store(if leader { LEADER } else { FOLLOWER }, Ordering::Release);
    }

    /// Whether this runner leads; `None` while unknown.
    pub(crate) fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Acquire) {
            LEADER => Some(true),
            FOLLOWER => Some(false),
            _ => None, // 0: not set yet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_are_none_outside_a_context() {
        assert!(current().is_none());
        assert!(shard_id().is_none());
        assert!(runner_id().is_none());
        assert!(is_leader().is_none());
        assert!(trace().is_none());
    }

    #[test]
    fn leader_status_is_unknown_until_set() {
        let status = LeaderStatus::default();
        assert_eq!(status.get(), None);
        status.set(true);
        assert_eq!(status.get(), Some(true));
        status.set(false);
        assert_eq!(status.get(), Some(false));
    }

    #[test]
    fn outgoing_headers_name_the_sender() {
        let caller = TraceContext::root();
        let context = ClusterContext::new(
            RunnerId::new("r1"),
            Some(ShardId::new("default", 3)),
            Arc::default(),
            Arc::new(SnowflakeGenerator::new(1)),
            caller,
            None,
        );
        let headers = context.outgoing_headers();
        let sender = Sender::from_headers(&headers).unwrap();
        assert_eq!(sender.runner, Some(RunnerId::new("r1")));
        assert_eq!(sender.shard, Some(ShardId::new("default", 3)));
        let handler = TraceContext::for_message(&headers);
        assert_eq!(handler.trace_id(), caller.trace_id());
        assert_eq!(handler.parent_span_id(), Some(caller.span_id()));
        assert_ne!(handler.span_id(), caller.span_id());
    }
}
