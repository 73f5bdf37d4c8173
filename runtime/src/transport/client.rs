//! The calling side: one multiplexed connection per peer, opened on first use
//! and opened again after it breaks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::error::{HandshakeError, TransportError, WireError};
use super::frame::{self, Frame};
use super::handshake::{self, ClusterSecret, MAX_HANDSHAKE_FRAME};
use super::{Request, Transport, TransportConfig};

/// The TCP [`Transport`]: authenticated, multiplexed connections to peers.
///
/// Cheap to clone; clones share the connections. Dropping the last clone
/// closes them.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    secret: ClusterSecret,
    config: TransportConfig,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
}

/// The connection to one address, and the lock that makes concurrent first
/// calls open one connection rather than one each.
#[derive(Debug, Default)]
struct Peer {
    current: Mutex<Option<Arc<Connection>>>,
    dialing: tokio::sync::Mutex<()>,
}

impl Peer {
    fn usable(&self) -> Option<Arc<Connection>> {
        lock(&self.current)
            .as_ref()
            .filter(|c| c.is_usable())
            .cloned()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded maps stay consistent between statements, so a panic
    // elsewhere while holding the lock leaves nothing half-done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TcpTransport {
    /// A transport that proves `secret` to every peer it connects to.
    pub fn new(secret: ClusterSecret, config: TransportConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                secret,
                config,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sends `request` to `peer` and waits at most `timeout` for the reply,
    /// connecting first if there is no usable connection.
    ///
    /// Errors: [`TransportError::Unavailable`] when the peer cannot be reached
    /// or the connection breaks, [`TransportError::Timeout`] past the
    /// deadline, [`TransportError::Remote`] when the handler failed,
    /// [`TransportError::Handshake`] when the peer does not share the secret.
    pub async fn call(
        &self,
        peer: SocketAddr,
        request: Request,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let call = async {
            let connection = self.connection(peer).await?;
            connection.call(request, timeout).await
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(TransportError::Timeout {
                peer,
                after: timeout,
            }))
    }

    /// Checks that the runner at `peer` is reading its connection: sends a
    /// `Ping` (connecting first if needed) and returns the round-trip time of
    /// its `Pong`. The server answers from its reader, without the handler.
    pub async fn ping(
        &self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, TransportError> {
        let started = std::time::Instant::now();
        let ping = async {
            let connection = self.connection(peer).await?;
            connection.exchange(|id| Frame::Ping { id }).await
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Timeout {
                peer,
                after: timeout,
            }),
        }
    }

    /// Number of peers with an open, usable connection.
    pub fn open_connections(&self) -> usize {
        let peers: Vec<_> = lock(&self.inner.peers).values().cloned().collect();
        peers.iter().filter(|p| p.usable().is_some()).count()
    }

    async fn connection(&self, peer: SocketAddr) -> Result<Arc<Connection>, TransportError> {
        let slot = Arc::clone(lock(&self.inner.peers).entry(peer).or_default());
        if let Some(connection) = slot.usable() {
            return Ok(connection);
        }
        let _dialing = slot.dialing.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(connection) = slot.usable() {
            return Ok(connection);
        }
        let connection = Arc::new(dial(peer, &self.inner.secret, &self.inner.config).await?);
        *lock(&slot.current) = Some(Arc::clone(&connection));
        Ok(connection)
    }
}

#[async_trait::async_trait]
impl Transport for TcpTransport {
    async fn call(
        &self,
        peer: SocketAddr,
        request: Request,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        TcpTransport::call(self, peer, request, timeout).await
    }

    async fn ping(&self, peer: SocketAddr, timeout: Duration) -> Result<Duration, TransportError> {
        TcpTransport::ping(self, peer, timeout).await
    }
}

type Reply = Result<Vec<u8>, WireError>;

/// One established connection: a writer task, a reader task and the calls
/// waiting for their replies.
#[derive(Debug)]
struct Connection {
    outgoing: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    max_frame_size: usize,
}

#[derive(Debug)]
struct Shared {
    peer: SocketAddr,
    state: Mutex<State>,
    /// The server said GoAway: in-flight calls finish, new ones go elsewhere.
    draining: AtomicBool,
    /// Calls waiting for a reply; the writer batches harder when several are.
    in_flight: AtomicUsize,
    closed: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once; a call registering after this fails at once instead of
    /// waiting for a reply that cannot come.
    closed: Option<String>,
}

impl Shared {
    fn close(&self, reason: String) {
        let waiting = {
            let mut state = lock(&self.state);
            state.closed.get_or_insert(reason);
            std::mem::take(&mut state.waiting)
        };
        // Dropping the senders wakes every waiting call with `Unavailable`.
        drop(waiting);
        self.closed.cancel();
    }

    fn unavailable(&self) -> TransportError {
        let reason = lock(&self.state)
            .closed
            .clone()
            .unwrap_or_else(|| "the connection closed".into());
        TransportError::Unavailable {
            peer: self.peer,
            reason,
        }
    }
}

/// Removes a call's entry when the call is dropped (deadline, cancellation)
/// before its reply arrived.
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.answered {
            lock(&self.shared.state).waiting.remove(&self.id);
        }
    }
}

impl Connection {
    fn is_usable(&self) -> bool {
        !self.shared.closed.is_cancelled() && !self.shared.draining.load(Ordering::Acquire)
    }

    async fn call(&self, request: Request, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let budget_ms = u64::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
        self.exchange(|id| Frame::Request {
            id,
            budget_ms,
            headers: request.headers,
            body: request.body,
        })
        .await
    }

    /// Sends the frame `frame(id)` and waits for the answer carrying `id`.
    async fn exchange(&self, frame: impl FnOnce(u64) -> Frame) -> Result<Vec<u8>, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(&frame(id), self.max_frame_size)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            if state.closed.is_some() {
                drop(state);
                return Err(self.shared.unavailable());
            }
            state.waiting.insert(id, reply_tx);
        }
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut waiting = Waiting {
            shared: &self.shared,
            id,
            answered: false,
        };
        if self.outgoing.send(bytes).await.is_err() {
            return Err(self.shared.unavailable());
        }
        let reply = reply_rx.await;
        waiting.answered = true;
        match reply {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(error)) => Err(TransportError::Remote(error)),
            Err(_) => Err(self.shared.unavailable()),
        }
    }
}

async fn dial(
    peer: SocketAddr,
    secret: &ClusterSecret,
    config: &TransportConfig,
) -> Result<Connection, TransportError> {
    let unavailable = |reason: String| TransportError::Unavailable { peer, reason };
    let stream = TcpStream::connect(peer)
        .await
        .map_err(|e| unavailable(format!("connect failed: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| unavailable(format!("setting TCP_NODELAY failed: {e}")))?;
    let mut framed = Framed::new(stream, frame::codec(MAX_HANDSHAKE_FRAME));
    let handshake = tokio::time::timeout(
        config.handshake_timeout,
        handshake::client(&mut framed, secret),
    )
    .await
    .unwrap_or(Err(HandshakeError::TimedOut(config.handshake_timeout)));
    match handshake {
        Ok(()) => {}
        // A peer that went away mid-handshake is unavailable, not hostile.
        Err(HandshakeError::Io(reason)) => return Err(unavailable(reason)),
        Err(source) => return Err(TransportError::Handshake { peer, source }),
    }
    let parts = framed.into_parts();
    let (read, write) = parts.io.into_split();
    let mut reader = FramedRead::new(read, frame::codec(config.max_frame_size));
    // Frames that arrived with the last handshake message are not lost.
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    let writer = FramedWrite::new(write, frame::codec(config.max_frame_size));

    let (outgoing, queue) = mpsc::channel(config.write_queue.max(1));
    let shared = Arc::new(Shared {
        peer,
        state: Mutex::new(State::default()),
        draining: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        closed: CancellationToken::new(),
    });
    let writer_shared = Arc::clone(&shared);
    tokio::spawn(async move {
        let kill = writer_shared.closed.clone();
        let busy = || writer_shared.in_flight.load(Ordering::Relaxed) > 1;
        let reason = match frame::write_loop(writer, queue, kill, busy).await {
            Ok(()) => "the connection was closed".to_owned(),
            Err(e) => format!("write failed: {e}"),
        };
        writer_shared.close(reason);
    });
    tokio::spawn(read_loop(reader, Arc::clone(&shared)));
    Ok(Connection {
        outgoing,
        shared,
        next_id: AtomicU64::new(0),
        max_frame_size: config.max_frame_size,
    })
}

async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    shared: Arc<Shared>,
) {
    let peer = shared.peer;
    let reason = loop {
        let next = tokio::select! {
            biased;
            () = shared.closed.cancelled() => break "the connection was closed".to_owned(),
            next = reader.next() => next,
        };
        let bytes = match next {
            None => break "the peer closed the connection".to_owned(),
            Some(Err(e)) if frame::is_oversized(&e) => {
                let error = TransportError::FrameTooLarge {
                    size: frame::declared_len(reader.read_buffer()),
                    max: reader.decoder().max_frame_length(),
                };
                tracing::warn!(%peer, %error, "the peer sent a frame over the limit; closing the connection");
                break error.to_string();
            }
            Some(Err(e)) => break format!("read failed: {e}"),
            Some(Ok(bytes)) => bytes,
        };
        match crate::codec::decode::<Frame>("transport frame", &bytes) {
            Ok(Frame::Response { id, result }) => {
                let waiter = lock(&shared.state).waiting.remove(&id);
                // No waiter: the call gave up (deadline) before the reply came.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(result.map(|body| body.0));
                }
            }
            Ok(Frame::Pong { id }) => {
                let waiter = lock(&shared.state).waiting.remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(Vec::new()));
                }
            }
            Ok(Frame::GoAway) => shared.draining.store(true, Ordering::Release),
            Ok(Frame::Request { .. } | Frame::Ping { .. }) => {
                tracing::warn!(%peer, "peer sent a request on a client connection; closing it");
                break "the peer broke the protocol (request on a client connection)".to_owned();
            }
            Err(e) => {
                let error = TransportError::Malformed { peer, source: e };
                tracing::warn!(%peer, %error, "closing the connection");
                break error.to_string();
            }
        }
    };
    shared.close(reason);
}
