//! Trace context: W3C `traceparent` values and the ids of one handler run.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use super::TRACEPARENT_HEADER;
use crate::storage::Headers;

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
    use proptest::prelude::*;

    use super::*;
    use crate::storage::Headers;

    #[test]
    fn a_message_without_traceparent_starts_a_trace() {
        let trace = TraceContext::for_message(&Headers::new());
        assert_eq!(trace.parent_span_id(), None);
        let mut bad = Headers::new();
        bad.insert(TRACEPARENT_HEADER.to_owned(), "nonsense".to_owned());
        assert_eq!(TraceContext::for_message(&bad).parent_span_id(), None);
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
