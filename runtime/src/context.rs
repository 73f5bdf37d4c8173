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

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::sharding::{RunnerId, ShardId};
use crate::snowflake::{Snowflake, SnowflakeGenerator};
use crate::storage::Headers;

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
    /// live: it follows the leader when it moves). `None` while the runner
    /// does not know (no leader election configured).
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
/// The leader election sets it with [`LeaderStatus::set`]; until then it is
/// unknown and `is_leader()` returns `None`.
#[derive(Debug, Default)]
pub(crate) struct LeaderStatus(AtomicU8);

const FOLLOWER: u8 = 1;
const LEADER: u8 = 2;

impl LeaderStatus {
    /// Records that this runner now runs (`true`) or no longer runs
    /// (`false`) the leader singleton.
    #[allow(dead_code)] // called by the leader election (singletons)
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

/// The trace of one handler run: W3C trace id, its own span id, and the span
/// id of the sender (its parent).
///
/// ```
/// use flotilla::context::TraceContext;
///
/// let caller = TraceContext::root();
/// let parent = caller.traceparent().parse().unwrap();
/// let handler = TraceContext::child_of(&parent);
/// assert_eq!(handler.trace_id(), caller.trace_id());
/// assert_eq!(handler.parent_span_id(), Some(caller.span_id()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    flags: u8,
}

impl TraceContext {
    /// The first span of a new trace (no parent, sampled).
    pub fn root() -> Self {
        Self {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent: None,
            flags: SAMPLED,
        }
    }

    /// A new span in the trace of `parent`, with `parent`'s span as its parent.
    pub fn child_of(parent: &TraceParent) -> Self {
        Self {
            trace_id: parent.trace_id,
            span_id: SpanId::random(),
            parent: Some(parent.span_id),
            flags: parent.flags,
        }
    }

    /// A new span in this trace, with this span as its parent: what a
    /// message sent from here starts on the receiving side.
    pub(crate) fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: SpanId::random(),
            parent: Some(self.span_id),
            flags: self.flags,
        }
    }

    /// The context of a handler for a message with `headers`: a child of its
    /// `traceparent`, or a new trace when there is none (or it is malformed).
    pub(crate) fn for_message(headers: &Headers) -> Self {
        headers
            .get(TRACEPARENT_HEADER)
            .and_then(|value| value.parse::<TraceParent>().ok())
            .map_or_else(Self::root, |parent| Self::child_of(&parent))
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// This span's id.
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The sender's span id; `None` at the root of a trace.
    pub fn parent_span_id(&self) -> Option<SpanId> {
        self.parent
    }

    /// This span as a W3C `traceparent` value, to send onwards.
    pub fn traceparent(&self) -> String {
        TraceParent {
            trace_id: self.trace_id,
            span_id: self.span_id,
            flags: self.flags,
        }
        .to_string()
    }

    /// Records `trace_id`, `span_id` and `parent_span_id` on `span` (which
    /// must declare them).
    pub(crate) fn record_on(&self, span: &tracing::Span) {
        span.record("trace_id", tracing::field::display(self.trace_id));
        span.record("span_id", tracing::field::display(self.span_id));
        if let Some(parent) = self.parent {
            span.record("parent_span_id", tracing::field::display(parent));
        }
    }
}

const SAMPLED: u8 = 0x01;

/// A W3C trace id: 16 bytes, shown as 32 lowercase hex digits; never zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

impl TraceId {
    fn random() -> Self {
        Self(u128::from(random_u64()) << 64 | u128::from(random_u64()).max(1))
    }

    /// The raw value.
    pub const fn raw(self) -> u128 {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

/// A W3C span (parent) id: 8 bytes, shown as 16 lowercase hex digits; never zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(u64);

impl SpanId {
    fn random() -> Self {
        Self(random_u64().max(1))
    }

    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// A parsed W3C `traceparent` header value (version `00`).
///
/// ```
/// use flotilla::context::TraceParent;
///
/// let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let parent: TraceParent = value.parse().unwrap();
/// assert_eq!(parent.to_string(), value);
/// assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01"
///     .parse::<TraceParent>()
///     .is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
}

impl TraceParent {
    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The sender's span id.
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// A `traceparent` value that is not `00-<32 hex>-<16 hex>-<2 hex>` with
/// non-zero ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid traceparent {0:?}: expected `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`"
)]
pub struct ParseTraceParentError(String);

impl FromStr for TraceParent {
    type Err = ParseTraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseTraceParentError(s.to_owned());
        let mut parts = s.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        let hex = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return Err(invalid());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| invalid())?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| invalid())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| invalid())?;
        if trace_id == 0 || span_id == 0 {
            return Err(invalid());
        }
        Ok(Self {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            flags,
        })
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

/// A per-thread seed from the OS; the clock and the thread if that fails.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::thread::current().id().hash(&mut hasher);
    crate::snowflake::now_unix_ms().hash(&mut hasher);
    hasher.finish()
}

/// splitmix64: trace ids need to be unique, not secret.
fn random_u64() -> u64 {
    RNG.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn a_message_without_traceparent_starts_a_trace() {
        let trace = TraceContext::for_message(&Headers::new());
        assert_eq!(trace.parent_span_id(), None);
        let mut bad = Headers::new();
        bad.insert(TRACEPARENT_HEADER.to_owned(), "nonsense".to_owned());
        assert_eq!(TraceContext::for_message(&bad).parent_span_id(), None);
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

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn traceparent_round_trips(trace in 1u128.., span in 1u64.., flags: u8) {
            let parent = TraceParent { trace_id: TraceId(trace), span_id: SpanId(span), flags };
            let text = parent.to_string();
            prop_assert_eq!(text.len(), 55);
            prop_assert_eq!(text.parse::<TraceParent>(), Ok(parent));
        }
    }
}
