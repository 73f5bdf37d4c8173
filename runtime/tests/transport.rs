//! The runner-to-runner transport on loopback: replies reach their callers,
//! bad peers and bad frames are refused without disturbing anyone else, and
//! every failure is a typed error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla::transport::{
    ClusterSecret, Handler, HandshakeError, Request, ServerHandle, StopOutcome, TcpTransport,
    Transport, TransportConfig, TransportError, WireError, handler_fn, serve,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const PATIENCE: Duration = Duration::from_secs(10);

fn secret() -> ClusterSecret {
    ClusterSecret::new("the cluster's shared secret").expect("long enough")
}

fn other_secret() -> ClusterSecret {
    ClusterSecret::new("somebody else's secret!!").expect("long enough")
}

fn echo() -> Handler {
    handler_fn(|incoming| async move { Ok(incoming.request.body) })
}

async fn start(secret: ClusterSecret, handler: Handler, config: TransportConfig) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve(listener, secret, handler, config)
        .await
        .expect("serve")
}

fn client() -> TcpTransport {
    TcpTransport::new(secret(), TransportConfig::default())
}

#[tokio::test]
async fn a_request_round_trips_with_its_headers() {
    let handler = handler_fn(|incoming| async move {
        let mut reply = incoming.request.body;
        for (name, value) in incoming.request.headers {
            reply.extend_from_slice(format!("|{name}={value}").as_bytes());
        }
        Ok(reply)
    });
    let server = start(secret(), handler, TransportConfig::default()).await;
    let request = Request::new(b"hello".to_vec()).with_header("trace", "abc");
    let reply = client()
        .call(server.local_addr(), request, PATIENCE)
        .await
        .expect("reply");
    assert_eq!(reply, b"hello|trace=abc");
    assert_eq!(server.stop(PATIENCE).await, StopOutcome::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_share_one_connection_and_each_gets_its_own_reply() {
    // Replies come back out of order: later requests often finish first.
    let handler = handler_fn(|incoming| async move {
        let n = u64::from_le_bytes(incoming.request.body[..8].try_into().expect("8 bytes"));
        for _ in 0..(n % 7) {
            tokio::task::yield_now().await;
        }
        let mut reply = incoming.request.body;
        reply.reverse();
        Ok(reply)
    });
    let server = start(secret(), handler, TransportConfig::default()).await;
    let transport = client();
    let addr = server.local_addr();
    let calls = (0..1000u64).map(|n| {
        let transport = transport.clone();
        tokio::spawn(async move {
            let body = n.to_le_bytes().to_vec();
            let reply = transport
                .call(addr, Request::new(body.clone()), PATIENCE)
                .await;
            (body, reply)
        })
    });
    for call in futures::future::join_all(calls).await {
        let (mut body, reply) = call.expect("caller task");
        body.reverse();
        assert_eq!(reply.expect("reply"), body);
    }
    let stats = server.stats();
    assert_eq!(stats.connections_accepted, 1);
    assert_eq!(stats.requests, 1000);
    assert_eq!(transport.open_connections(), 1);
}

#[tokio::test]
async fn a_client_with_the_wrong_secret_is_refused_and_the_server_keeps_serving() {
    let server = start(secret(), echo(), TransportConfig::default()).await;
    let intruder = TcpTransport::new(other_secret(), TransportConfig::default());
    let err = intruder
        .call(server.local_addr(), Request::new(vec![1]), PATIENCE)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            TransportError::Handshake {
                source: HandshakeError::Refused,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.stats().handshakes_refused, 1);
    assert_eq!(server.stats().requests, 0);

    let reply = client()
        .call(server.local_addr(), Request::new(vec![2]), PATIENCE)
        .await
        .expect("a good client is served");
    assert_eq!(reply, vec![2]);
}

#[tokio::test]
async fn a_server_with_another_secret_is_not_trusted() {
    let impostor = start(other_secret(), echo(), TransportConfig::default()).await;
    let err = client()
        .call(impostor.local_addr(), Request::new(vec![1]), PATIENCE)
        .await
        .expect_err("not trusted");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err}");
    assert_eq!(impostor.stats().requests, 0);
}

/// Reads one length-delimited frame from a raw socket.
async fn read_raw_frame(stream: &mut TcpStream) -> Vec<u8> {
    let len = stream.read_u32().await.expect("frame length");
    let mut bytes = vec![0; len as usize];
    stream.read_exact(&mut bytes).await.expect("frame body");
    bytes
}

/// True once the server has closed the socket (reads end).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    let server = start(secret(), echo(), TransportConfig::default()).await;
    let mut raw = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let _server_hello = read_raw_frame(&mut raw).await;
    // A frame whose bytes are not MessagePack.
    raw.write_u32(3).await.expect("write");
    raw.write_all(&[0xc1, 0xc1, 0xc1]).await.expect("write");
    assert!(closed_by_server(&mut raw).await);
    assert_eq!(server.stats().handshakes_refused, 1);

    let reply = client()
        .call(server.local_addr(), Request::new(vec![3]), PATIENCE)
        .await
        .expect("the server still serves");
    assert_eq!(reply, vec![3]);
}

#[tokio::test]
async fn an_oversized_frame_closes_only_that_connection() {
    let small = TransportConfig::default().max_frame_size(64 * 1024);
    let server = start(secret(), echo(), small).await;
    let addr = server.local_addr();

    // Before the handshake: a length prefix far past any limit.
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    let _server_hello = read_raw_frame(&mut raw).await;
    raw.write_u32(u32::MAX).await.expect("write");
    assert!(closed_by_server(&mut raw).await);

    // After the handshake: a client allowed bigger frames than the server.
    let big = TcpTransport::new(secret(), TransportConfig::default());
    let err = big
        .call(addr, Request::new(vec![0; 128 * 1024]), PATIENCE)
        .await
        .expect_err("too large for the server");
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(server.stats().protocol_errors, 1);

    // The same client reconnects for a reasonable request.
    assert_eq!(
        big.call(addr, Request::new(vec![4]), PATIENCE)
            .await
            .expect("served"),
        vec![4]
    );
}

#[tokio::test]
async fn an_oversized_request_fails_alone_before_it_is_sent() {
    let server = start(secret(), echo(), TransportConfig::default()).await;
    let transport = TcpTransport::new(secret(), TransportConfig::default().max_frame_size(1024));
    let addr = server.local_addr();
    assert_eq!(
        transport
            .call(addr, Request::new(vec![5]), PATIENCE)
            .await
            .expect("small"),
        vec![5]
    );
    let err = transport
        .call(addr, Request::new(vec![0; 4096]), PATIENCE)
        .await
        .expect_err("too large");
    assert!(
        matches!(err, TransportError::FrameTooLarge { max: 1024, .. }),
        "{err}"
    );
    // The connection was not disturbed.
    assert_eq!(
        transport
            .call(addr, Request::new(vec![6]), PATIENCE)
            .await
            .expect("small"),
        vec![6]
    );
    assert_eq!(server.stats().connections_accepted, 1);
}

#[tokio::test]
async fn an_oversized_reply_breaks_the_connection_with_a_clear_reason() {
    let big_reply = handler_fn(|_| async { Ok(vec![7; 4096]) });
    let server = start(secret(), big_reply, TransportConfig::default()).await;
    let transport = TcpTransport::new(secret(), TransportConfig::default().max_frame_size(1024));
    let err = transport
        .call(server.local_addr(), Request::new(vec![1]), PATIENCE)
        .await
        .expect_err("the reply is over the client's limit");
    assert!(
        matches!(&err, TransportError::Unavailable { reason, .. } if reason.contains("exceeds the limit of 1024 bytes")),
        "{err}"
    );
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_and_a_restarted_one_is_reconnected() {
    let server = start(secret(), echo(), TransportConfig::default()).await;
    let addr: SocketAddr = server.local_addr();
    let transport = client();
    transport
        .call(addr, Request::new(vec![1]), PATIENCE)
        .await
        .expect("first call");
    assert_eq!(server.stop(PATIENCE).await, StopOutcome::Drained);

    let err = transport
        .call(addr, Request::new(vec![2]), PATIENCE)
        .await
        .expect_err("nobody listens");
    assert!(err.is_unavailable(), "{err}");

    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let restarted = serve(listener, secret(), echo(), TransportConfig::default())
        .await
        .expect("serve");
    assert_eq!(
        transport
            .call(addr, Request::new(vec![3]), PATIENCE)
            .await
            .expect("reconnected"),
        vec![3]
    );
    assert_eq!(restarted.stats().connections_accepted, 1);
}

#[tokio::test]
async fn a_request_past_its_deadline_is_a_typed_timeout() {
    let handler = handler_fn(|incoming| async move {
        if incoming.request.body == b"slow" {
            std::future::pending::<()>().await;
        }
        Ok(incoming.request.body)
    });
    let server = start(secret(), handler, TransportConfig::default()).await;
    let transport = client();
    let err = transport
        .call(
            server.local_addr(),
            Request::new(b"slow".to_vec()),
            Duration::from_millis(50),
        )
        .await
        .expect_err("never answered");
    assert!(
        matches!(err, TransportError::Timeout { after, .. } if after == Duration::from_millis(50)),
        "{err}"
    );
    // The slow request did not block the connection.
    assert_eq!(
        transport
            .call(
                server.local_addr(),
                Request::new(b"fast".to_vec()),
                PATIENCE
            )
            .await
            .expect("fast reply"),
        b"fast"
    );
    assert_eq!(server.stats().connections_accepted, 1);
}

#[tokio::test]
async fn handler_errors_travel_back_typed() {
    let handler = handler_fn(|incoming| async move {
        match incoming.request.body.as_slice() {
            b"app" => Err(WireError::Application(b"insufficient funds".to_vec())),
            b"moved" => Err(WireError::NotHere("shard 7 moved".into())),
            b"panic" => panic!("handler bug"),
            other => Ok(other.to_vec()),
        }
    });
    let server = start(secret(), handler, TransportConfig::default()).await;
    let (transport, addr) = (client(), server.local_addr());
    let call = |body: &'static [u8]| {
        let transport = transport.clone();
        async move {
            transport
                .call(addr, Request::new(body.to_vec()), PATIENCE)
                .await
        }
    };
    assert!(matches!(
        call(b"app").await,
        Err(TransportError::Remote(WireError::Application(bytes))) if bytes == b"insufficient funds"
    ));
    assert!(matches!(
        call(b"moved").await,
        Err(TransportError::Remote(WireError::NotHere(why))) if why == "shard 7 moved"
    ));
    assert!(matches!(
        call(b"panic").await,
        Err(TransportError::Remote(WireError::Internal(_)))
    ));
    assert_eq!(call(b"fine").await.expect("ok"), b"fine");
}

#[tokio::test]
async fn a_graceful_stop_answers_requests_in_flight() {
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let handler = {
        let (release, started) = (Arc::clone(&release), Arc::clone(&started));
        handler_fn(move |incoming| {
            let (release, started) = (Arc::clone(&release), Arc::clone(&started));
            async move {
                started.notify_one();
                release.notified().await;
                Ok(incoming.request.body)
            }
        })
    };
    let server = start(secret(), handler, TransportConfig::default()).await;
    let transport = client();
    let addr = server.local_addr();
    let in_flight = tokio::spawn({
        let transport = transport.clone();
        async move { transport.call(addr, Request::new(vec![9]), PATIENCE).await }
    });
    started.notified().await;
    let stopping = tokio::spawn(server.stop(PATIENCE));
    release.notify_one();
    assert_eq!(in_flight.await.expect("caller").expect("answered"), vec![9]);
    assert_eq!(stopping.await.expect("stop"), StopOutcome::Drained);
}

#[tokio::test]
async fn a_stop_past_its_budget_abandons_what_is_left() {
    let started = Arc::new(Notify::new());
    let handler = {
        let started = Arc::clone(&started);
        handler_fn(move |_| {
            let started = Arc::clone(&started);
            async move {
                started.notify_one();
                std::future::pending::<Result<Vec<u8>, WireError>>().await
            }
        })
    };
    let server = start(secret(), handler, TransportConfig::default()).await;
    let transport = client();
    let addr = server.local_addr();
    let in_flight = tokio::spawn({
        let transport = transport.clone();
        async move { transport.call(addr, Request::new(vec![1]), PATIENCE).await }
    });
    started.notified().await;
    assert_eq!(
        server.stop(Duration::from_millis(20)).await,
        StopOutcome::Abandoned
    );
    let err = in_flight.await.expect("caller").expect_err("abandoned");
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn the_transport_is_usable_as_a_trait_object() {
    let server = start(secret(), echo(), TransportConfig::default()).await;
    let transport: Arc<dyn Transport> = Arc::new(client());
    let reply = transport
        .call(server.local_addr(), Request::new(vec![8]), PATIENCE)
        .await
        .expect("reply");
    assert_eq!(reply, vec![8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_never_runs_more_requests_at_once_than_max_in_flight() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        handler_fn(move |incoming| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(incoming.request.body)
            }
        })
    };
    let server = start(
        secret(),
        handler,
        TransportConfig::default().max_in_flight(2),
    )
    .await;
    let (transport, addr) = (client(), server.local_addr());
    let calls = (0..50u8).map(|n| {
        let transport = transport.clone();
        async move { transport.call(addr, Request::new(vec![n]), PATIENCE).await }
    });
    for (n, reply) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(reply.expect("answered"), vec![n as u8]);
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(server.stats().requests, 50);
}

#[tokio::test]
async fn a_ping_is_answered_without_the_handler_even_when_it_is_busy() {
    let started = Arc::new(Notify::new());
    let handler = {
        let started = Arc::clone(&started);
        handler_fn(move |_| {
            let started = Arc::clone(&started);
            async move {
                started.notify_one();
                std::future::pending::<Result<Vec<u8>, WireError>>().await
            }
        })
    };
    let server = start(secret(), handler, TransportConfig::default()).await;
    let (transport, addr) = (client(), server.local_addr());
    let stuck = tokio::spawn({
        let transport = transport.clone();
        async move { transport.call(addr, Request::new(vec![1]), PATIENCE).await }
    });
    started.notified().await;
    transport.ping(addr, PATIENCE).await.expect("pong");
    assert_eq!(server.stats().requests, 1, "the ping is not a request");
    assert_eq!(server.stats().connections_accepted, 1);
    stuck.abort();
}

#[tokio::test]
async fn a_ping_to_nobody_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let err = client().ping(addr, PATIENCE).await.expect_err("nobody");
    assert!(err.is_unavailable(), "{err}");
}
