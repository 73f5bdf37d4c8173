//! One authenticated connection on the server: the handshake, the reader
//! loop, and a task per request.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use super::super::Request;
use super::super::error::{TransportError, WireError};
use super::super::frame::{self, Bin, Frame};
use super::super::handshake::{self, MAX_HANDSHAKE_FRAME};
use super::{Context, Incoming, bump};

/// Authenticates one accepted connection, then serves it until the peer
/// leaves, it misbehaves, or the server stops.
pub(super) async fn run(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
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
                    let error = TransportError::FrameTooLarge {
                        size: frame::declared_len(reader.read_buffer()),
                        max,
                    };
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
            Ok(Frame::Ping { id }) => {
                // Answered here, not by the handler: a ping checks that this
                // connection is read, whatever the handlers are doing.
                if let Ok(bytes) = frame::encode(&Frame::Pong { id }, max) {
                    tokio::select! {
                        () = kill.cancelled() => return,
                        _ = outgoing.send(bytes) => {}
                    }
                }
                continue;
            }
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
            // Stopping while full: this request is left unanswered (its caller
            // sees `Unavailable` when the connection closes) and the loop's
            // top sends `GoAway`.
            () = ctx.stop.cancelled() => continue,
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
    use tokio::net::TcpListener;

    use super::*;
    use crate::transport::{ClusterSecret, TcpTransport, TransportConfig, handler_fn, serve};

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

        let transport = TcpTransport::new(secret, TransportConfig::default());
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
