//! The transport's error types: what a caller sees ([`TransportError`]), what
//! a handler sends back ([`WireError`]) and why a handshake failed
//! ([`HandshakeError`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};

/// A call over the transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer cannot be reached, or the connection broke (or was closed by
    /// the peer) before the reply came. The request may or may not have been
    /// handled; the cluster layer retries within the call's deadline
    /// (`RunnerUnavailable`).
    #[error("runner at {peer} is unavailable: {reason}")]
    Unavailable {
        /// The peer called.
        peer: SocketAddr,
        /// What went wrong (connect refused, connection lost, peer stopping).
        reason: String,
    },
    /// No reply came within the call's deadline.
    #[error("call to {peer} got no reply within {after:?}")]
    Timeout {
        /// The peer called.
        peer: SocketAddr,
        /// The deadline given to the call.
        after: Duration,
    },
    /// The connection was refused during the authenticated handshake: the
    /// two sides do not share the cluster secret, or speak another protocol.
    #[error("handshake with {peer} failed: {source}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: HandshakeError,
    },
    /// The remote handler answered with an error.
    #[error("remote handler failed: {0}")]
    Remote(#[source] WireError),
    /// A frame is larger than the configured maximum. Raise
    /// `TransportConfig::max_frame_size` on both sides, or send less.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The peer sent bytes that are not a valid frame; the connection was
    /// closed.
    #[error("malformed frame from {peer}: {source}")]
    Malformed {
        /// The peer.
        peer: SocketAddr,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
    /// A frame could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl TransportError {
    /// Whether trying again (after the peer restarts, or on another runner)
    /// can succeed: true for [`TransportError::Unavailable`] only.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The error a request handler sends back. Travels on the wire, so it is
/// plain data; the layer above encodes its own typed errors into
/// [`WireError::Application`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The handler's own error, encoded by the layer above (opaque bytes).
    #[error("application error ({} bytes)", .0.len())]
    Application(#[serde(with = "super::frame::bin")] Vec<u8>),
    /// What the request addresses does not live on this runner (for example
    /// its shard moved); the caller should resolve the owner again and retry.
    #[error("not served here: {0}")]
    NotHere(String),
    /// The server is stopping and did not run the request; retry elsewhere.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The server failed unexpectedly (a panic in the handler, a reply too
    /// large to send).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why the authenticated handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer refused our proof: we do not hold the same cluster secret.
    #[error("the peer refused our proof of the cluster secret")]
    Refused,
    /// The peer's proof did not verify: it does not hold our cluster secret.
    #[error("the peer's proof of the cluster secret is wrong")]
    BadProof,
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs} is not ours ({ours})")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer sent something that is not a handshake message.
    #[error("unexpected handshake message: {0}")]
    Malformed(String),
    /// The handshake did not complete in time.
    #[error("the handshake took longer than {0:?}")]
    TimedOut(Duration),
    /// The connection failed during the handshake.
    #[error("connection failed during the handshake: {0}")]
    Io(String),
}
