//! The serving side: accept, authenticate, and answer each request in its own
//! task so a slow request never holds up the others on its connection.
//!
//! This file holds the server's lifecycle (start, stats, graceful stop);
//! `connection.rs` holds what happens on one authenticated connection.

mod connection;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::WireError;
use super::handshake::ClusterSecret;
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
                ctx.tasks
                    .spawn(connection::run(stream, peer, Arc::clone(&ctx)));
            }
            Err(e) => {
                // Out of descriptors, usually: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
