//! Round-trip latency (p50/p99) and throughput of the runner transport, in
//! one process over loopback: a server and a client on one connection.
//!
//! `cargo bench -p flotilla --bench transport` runs the full measurement;
//! without `--bench` (as `cargo test --all-targets` runs it) it does a quick
//! smoke pass so the benchmark itself stays tested. A word after `--` keeps
//! only the cases whose name contains it.
//!
//! Targets (2 cores, two processes on loopback, later): >= 100,000 calls/s,
//! p50 <= 30 us. Here client and server share the same two cores.

mod measure;

use measure::{Run, report};
use std::time::Duration;

use flotilla::transport::{
    ClusterSecret, Request, TcpTransport, TransportConfig, handler_fn, serve,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(full, &filter));
}

async fn run(full: bool, filter: &str) {
    let secret = ClusterSecret::new("benchmark cluster secret").expect("secret");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo = handler_fn(|incoming| async move { Ok(incoming.request.body) });
    let server = serve(listener, secret.clone(), echo, TransportConfig::default())
        .await
        .expect("serve");
    let transport = TcpTransport::new(secret, TransportConfig::default());
    let addr = server.local_addr();
    // Warm up: connect, handshake, fill the buffers.
    drive(&transport, addr, 8, 1_000, 16).await;

    let calls = if full { 400_000 } else { 2_000 };
    let cases: [(&str, u64, u64, usize); 3] = [
        ("round trip, 1 caller, 16 B", 1, calls / 8, 16),
        ("round trip, 64 callers, 16 B", 64, calls, 16),
        ("round trip, 64 callers, 1 KiB", 64, calls / 2, 1024),
    ];
    for (name, callers, calls, size) in cases {
        if name.contains(filter) {
            report(name, drive(&transport, addr, callers, calls, size).await);
        }
    }
    let stats = server.stats();
    assert_eq!(
        stats.connections_accepted, 1,
        "one connection for every caller"
    );
    server.stop(Duration::from_secs(5)).await;
}

/// `callers` tasks make `calls` calls in all over the one shared connection.
async fn drive(
    transport: &TcpTransport,
    addr: std::net::SocketAddr,
    callers: u64,
    calls: u64,
    size: usize,
) -> Run {
    let transport = transport.clone();
    measure::drive(callers, calls, move |n| {
        let transport = transport.clone();
        let mut body = vec![0u8; size.max(8)];
        body[..8].copy_from_slice(&n.to_le_bytes());
        async move {
            let reply = transport
                .call(addr, Request::new(body.clone()), DEADLINE)
                .await;
            assert_eq!(reply.expect("call"), body);
        }
    })
    .await
}
