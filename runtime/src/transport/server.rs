//! The serving side: accept, authenticate, and answer each request in its own
//! task so a slow request never holds up the others on its connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::{TransportError, WireError};
use super::frame::{self, Bin, Frame};
use super::handshake::{self, ClusterSecret, MAX_HANDSHAKE_FRAME};
use super::{Request, TransportConfig};

/// What a [`Handler`] returns.
pub type HandlerFuture = BoxFuture<'static, Result<Vec<u8>, WireError>>;

/// Answers one request. Called once per request, each in its own task.
pub type Handler = Arc<dyn Fn(Incoming) -> HandlerFuture + Send + Sync>;

/// Wraps an async closure as a [`Handler`].
///
/// ```
/// use flotilla::transport::{handler_fn, WireError};
/// let handler = handler_fn(|incoming| async move {
///     if incoming.request.body.is_empty() {
///         return Err(WireError::Application(b"empty".to_vec()));
///     }
///     Ok(incoming.request.body)
/// });
/// # drop(handler);
/// ```
pub fn handler_fn<F, Fut>(f: F) -> Handler
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, WireError>> + Send + 'static,
{
    Arc::new(move |incoming| Box::pin(f(incoming)))
}

/// A request as the server sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Incoming {
    /// The authenticated peer's address.
    pub peer: SocketAddr,
    /// Headers and body, as sent.
    pub request: Request,
    /// How long the caller will wait; the handler is dropped past it.
    pub budget: Duration,
}

/// Counters of what a server has seen, for tests and health checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// Connections refused during the handshake (wrong secret, other
    /// version, timeout, garbage).
    pub handshakes_refused: u64,
    /// Authenticated connections closed for a malformed or oversized frame.
    pub protocol_errors: u64,
    /// Requests handed to the handler.
    pub requests: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
    protocol_errors: AtomicU64,
    requests: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopOutcome {
    /// Every in-flight request finished and was answered within the budget.
    Drained,
    /// The budget ran out; requests still running were dropped unanswered
    /// (their callers see `Unavailable`).
    Abandoned,
}

/// A running server. [`ServerHandle::stop`] stops it gracefully; dropping the
/// handle stops it at once.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    ctx: Arc<Context>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Context {
    secret: ClusterSecret,
    config: TransportConfig,
    handler: HandlerDebug,
    /// Stop accepting and reading; let in-flight requests finish.
    stop: CancellationToken,
    /// Drop everything now.
    abort: CancellationToken,
    tasks: TaskTracker,
    counters: Counters,
}

struct HandlerDebug(Handler);

impl std::fmt::Debug for HandlerDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handler")
    }
}

/// Serves `handler` on `listener` to peers that prove `secret`.
///
/// Returns once the server is accepting. Connections are authenticated by the
/// handshake; a peer that fails it is logged (`warn`) and closed while the
/// server keeps serving the others. Fails only if the listener has no local
/// address.
pub async fn serve(
    listener: TcpListener,
    secret: ClusterSecret,
    handler: Handler,
    config: TransportConfig,
) -> io::Result<ServerHandle> {
    let local_addr = listener.local_addr()?;
    let ctx = Arc::new(Context {
        secret,
        config,
        handler: HandlerDebug(handler),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        tasks: TaskTracker::new(),
        counters: Counters::default(),
    });
    let accept = tokio::spawn(accept_loop(listener, Arc::clone(&ctx)));
    Ok(ServerHandle {
        local_addr,
        ctx,
        accept: Some(accept),
    })
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the server has seen so far.
    pub fn stats(&self) -> ServerStats {
        let c = &self.ctx.counters;
        ServerStats {
            connections_accepted: c.connections_accepted.load(Ordering::Relaxed),
            handshakes_refused: c.handshakes_refused.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    /// Stops gracefully: closes the listener, tells every peer to go away
    /// (`GoAway`), stops reading new requests, and waits up to `budget` for
    /// in-flight requests to be answered before dropping the rest.
    pub async fn stop(mut self, budget: Duration) -> StopOutcome {
        self.ctx.stop.cancel();
        if let Some(accept) = self.accept.take() {
            // The listener is dropped when the accept loop returns, so new
            // connections are refused from here on.
            let _ = accept.await;
        }
        self.ctx.tasks.close();
        let outcome = match tokio::time::timeout(budget, self.ctx.tasks.wait()).await {
            Ok(()) => StopOutcome::Drained,
            Err(_) => StopOutcome::Abandoned,
        };
        self.ctx.abort.cancel();
        self.ctx.tasks.wait().await;
        outcome
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.ctx.stop.cancel();
        self.ctx.abort.cancel();
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Context>) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = ctx.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                bump(&ctx.counters.connections_accepted);
                ctx.tasks.spawn(connection(stream, peer, Arc::clone(&ctx)));
            }
            Err(e) => {
                // Out of descriptors, usually: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let mut framed = Framed::new(stream, frame::codec(MAX_HANDSHAKE_FRAME));
    let timeout = ctx.config.handshake_timeout;
    let handshake = tokio::select! {
        () = ctx.stop.cancelled() => return,
        result = tokio::time::timeout(timeout, handshake::server(&mut framed, &ctx.secret)) => result,
    };
    match handshake {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            bump(&ctx.counters.handshakes_refused);
            tracing::warn!(%peer, %error, "refused a runner connection");
            tokio::select! {
                () = ctx.stop.cancelled() => {}
                _ = tokio::time::timeout(timeout, handshake::refuse(&mut framed, &error)) => {}
            }
            return;
        }
        Err(_) => {
            bump(&ctx.counters.handshakes_refused);
            tracing::warn!(%peer, ?timeout, "refused a runner connection: handshake timed out");
            return;
        }
    }

    let parts = framed.into_parts();
    let (read, write) = parts.io.into_split();
    let max = ctx.config.max_frame_size;
    let mut reader = FramedRead::new(read, frame::codec(max));
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    let writer = FramedWrite::new(write, frame::codec(max));
    let (outgoing, queue) = mpsc::channel::<Bytes>(ctx.config.write_queue.max(1));
    // Closes this connection only (malformed input), or all of them (abort).
    let kill = ctx.abort.child_token();
    let max_in_flight = ctx.config.max_in_flight.max(1);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let writer_kill = kill.clone();
    let writer_permits = Arc::clone(&permits);
    ctx.tasks.spawn(async move {
        // The request being answered may still hold its permit: "busy" is
        // more than one request in flight.
        let busy = || writer_permits.available_permits() + 1 < max_in_flight;
        if let Err(e) = frame::write_loop(writer, queue, writer_kill.clone(), busy).await {
            tracing::debug!(%peer, error = %e, "write failed; closing the connection");
            writer_kill.cancel();
        }
    });

    loop {
        let next = tokio::select! {
            biased;
            () = kill.cancelled() => return,
            () = ctx.stop.cancelled() => {
                if let Ok(bytes) = frame::encode(&Frame::GoAway, max) {
                    tokio::select! {
                        () = kill.cancelled() => {}
                        _ = outgoing.send(bytes) => {}
                    }
                }
                break;
            }
            next = reader.next() => next,
        };
        let bytes = match next {
            // The peer is done sending; replies still in flight are written.
            None => break,
            Some(Err(e)) => {
                if frame::is_oversized(&e) {
                    bump(&ctx.counters.protocol_errors);
                    let error = TransportError::FrameTooLarge { size: 0, max };
                    tracing::warn!(%peer, %error, detail = %e, "closing the connection");
                } else {
                    tracing::debug!(%peer, error = %e, "read failed; closing the connection");
                }
                kill.cancel();
                return;
            }
            Some(Ok(bytes)) => bytes,
        };
        let (id, budget_ms, headers, body) = match crate::codec::decode::<Frame>(
            "transport frame",
            &bytes,
        ) {
            Ok(Frame::Request {
                id,
                budget_ms,
                headers,
                body,
            }) => (id, budget_ms, headers, body),
            Ok(other) => {
                bump(&ctx.counters.protocol_errors);
                tracing::warn!(%peer, frame = ?other, "unexpected frame from a client; closing the connection");
                kill.cancel();
                return;
            }
            Err(source) => {
                bump(&ctx.counters.protocol_errors);
                let error = TransportError::Malformed { peer, source };
                tracing::warn!(%peer, %error, "closing the connection");
                kill.cancel();
                return;
            }
        };
        let permit = tokio::select! {
            () = kill.cancelled() => return,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
        };
        bump(&ctx.counters.requests);
        let incoming = Incoming {
            peer,
            request: Request { headers, body },
            budget: Duration::from_millis(budget_ms),
        };
        let handler = Arc::clone(&ctx.handler.0);
        let (kill, outgoing) = (kill.clone(), outgoing.clone());
        ctx.tasks.spawn(async move {
            let _permit = permit;
            let budget = incoming.budget;
            let work = AssertUnwindSafe(async move { handler(incoming).await }).catch_unwind();
            let result = tokio::select! {
                biased;
                () = kill.cancelled() => return,
                result = work => result.unwrap_or_else(|_| Err(WireError::Internal("the handler panicked".into()))),
                // The caller has given up; an answer would be thrown away.
                () = tokio::time::sleep(budget) => return,
            };
            let bytes = match frame::encode(&Frame::Response { id, result: result.map(Bin) }, max) {
                Ok(bytes) => bytes,
                Err(error) => {
                    let result = Err(WireError::Internal(format!("the reply could not be sent: {error}")));
                    match frame::encode(&Frame::Response { id, result }, max) {
                        Ok(bytes) => bytes,
                        Err(_) => return,
                    }
                }
            };
            // A closed queue means the connection is gone; nobody to answer.
            let _ = outgoing.send(bytes).await;
        });
    }
    // Dropping `outgoing` here lets the writer end once the last in-flight
    // request has replied.
}

#[cfg(test)]
mod tests {
    use futures::SinkExt;

    use super::*;

    /// An authenticated client that then sends bytes that are not a frame.
    #[tokio::test]
    async fn a_malformed_frame_after_the_handshake_closes_only_that_connection() {
        let secret = ClusterSecret::new("0123456789abcdef").expect("long enough");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo = handler_fn(|incoming| async move { Ok(incoming.request.body) });
        let server = serve(listener, secret.clone(), echo, TransportConfig::default())
            .await
            .expect("serve");

        let stream = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        let mut framed = Framed::new(stream, frame::codec(MAX_HANDSHAKE_FRAME));
        handshake::client(&mut framed, &secret)
            .await
            .expect("handshake");
        framed
            .send(Bytes::from_static(&[0x92, 0x01]))
            .await
            .expect("send garbage");
        // The server closes: the stream ends without a reply.
        assert!(framed.next().await.is_none_or(|r| r.is_err()));
        assert_eq!(server.stats().protocol_errors, 1);
        assert_eq!(server.stats().requests, 0);

        let transport = super::super::TcpTransport::new(secret, TransportConfig::default());
        let reply = transport
            .call(
                server.local_addr(),
                Request::new(vec![1]),
                Duration::from_secs(10),
            )
            .await
            .expect("still serving");
        assert_eq!(reply, vec![1]);
    }
}
