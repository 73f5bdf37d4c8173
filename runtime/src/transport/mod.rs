//! The wire between two runners: authenticated, multiplexed request/reply
//! over TCP.
//!
//! A runner calls another through a [`Transport`]; [`TcpTransport`] keeps one
//! connection per peer address, opened on first use, shared by every caller
//! and opened again after it breaks. The other side runs [`serve`] with a
//! [`Handler`]. Bodies are opaque bytes: the cluster layer decides what they
//! carry. The book's "Transport" page describes framing, handshake and limits.
//!
//! ```
//! use std::time::Duration;
//! use flotilla::transport::{handler_fn, serve, ClusterSecret, Request, TcpTransport, TransportConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = ClusterSecret::new("a long shared random secret")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let echo = handler_fn(|incoming| async move { Ok(incoming.request.body) });
//! let server = serve(listener, secret.clone(), echo, TransportConfig::default()).await?;
//!
//! let transport = TcpTransport::new(secret, TransportConfig::default());
//! let reply = transport
//!     .call(server.local_addr(), Request::new(b"hi".to_vec()), Duration::from_secs(1))
//!     .await?;
//! assert_eq!(reply, b"hi");
//! server.stop(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

mod client;
mod error;
pub(crate) mod frame;
mod handshake;
mod server;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

pub use client::TcpTransport;
pub use error::{HandshakeError, TransportError, WireError};
pub use handshake::{ClusterSecret, SecretTooShort};
pub use server::{
    Handler, HandlerFuture, Incoming, ServerHandle, ServerStats, StopOutcome, handler_fn, serve,
};

/// Sends requests to other runners and waits for their replies.
///
/// The seam a deterministic simulation replaces; [`TcpTransport`] is the real
/// implementation.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + Debug + 'static {
    /// Sends `request` to the runner listening at `peer` and waits at most
    /// `timeout` (connecting and the handshake included) for its reply.
    async fn call(
        &self,
        peer: SocketAddr,
        request: Request,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError>;

    /// Checks that the runner at `peer` is reading its connection and
    /// returns the round-trip time; the peer's handler is not involved.
    async fn ping(&self, peer: SocketAddr, timeout: Duration) -> Result<Duration, TransportError>;
}

/// A call's payload: opaque bytes plus string headers (trace context, for
/// example).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request {
    /// Headers, in order; names may repeat.
    pub headers: Vec<(String, String)>,
    /// The body, opaque to the transport.
    pub body: Vec<u8>,
}

impl Request {
    /// A request carrying `body` and no headers.
    pub fn new(body: Vec<u8>) -> Self {
        Self {
            headers: Vec::new(),
            body,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Limits and timeouts, the same type for both sides of a connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportConfig {
    /// The largest frame accepted or sent, in bytes (default 16 MiB). A
    /// larger incoming frame closes the connection; a larger outgoing one
    /// fails its call with [`TransportError::FrameTooLarge`].
    pub max_frame_size: usize,
    /// How long the authenticated handshake may take (default 5 s).
    pub handshake_timeout: Duration,
    /// Server side: requests handled at once per connection (default 4096);
    /// past it the server stops reading that connection until one finishes.
    pub max_in_flight: usize,
    /// Frames queued for one connection's writer before senders wait
    /// (default 4096).
    pub write_queue: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_frame_size: 16 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            write_queue: 4096,
        }
    }
}

impl TransportConfig {
    /// Sets [`TransportConfig::max_frame_size`].
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// Sets [`TransportConfig::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`TransportConfig::max_in_flight`] (at least 1).
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests.max(1);
        self
    }
}
