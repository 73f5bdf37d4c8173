//! A raw peer of the runner transport, for feeding a runner bad bytes.
//!
//! It speaks the documented framing (a 4-byte big-endian length, then the
//! bytes) and, to get past the door, the documented handshake (see
//! `runtime/src/transport/handshake.rs`): MessagePack `Hello` messages with
//! named fields, HMAC-SHA256 proofs over both nonces labelled by role.
//! Written from the protocol description, not shared with the runtime, so a
//! change of the wire protocol shows up here.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROTOCOL_VERSION: u16 = 1;

/// Bytes as a MessagePack `bin`.
#[derive(Debug)]
struct Bin(Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BinVisitor;
        impl<'de> Visitor<'de> for BinVisitor {
            type Value = Bin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
                Ok(Bin(v))
            }
        }
        d.deserialize_byte_buf(BinVisitor)
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Hello {
    Server {
        version: u16,
        nonce: Bin,
    },
    Client {
        version: u16,
        nonce: Bin,
        proof: Bin,
    },
    Accepted {
        proof: Bin,
    },
    Refused {
        reason: String,
    },
}

fn proof(secret: &[u8], role: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(b"flotilla/1 ");
    mac.update(role);
    mac.update(server_nonce);
    mac.update(client_nonce);
    mac.finalize().into_bytes().to_vec()
}

/// Reads one length-delimited frame of at most `max` bytes.
pub async fn read_frame(stream: &mut TcpStream, max: usize) -> io::Result<Vec<u8>> {
    let len = stream.read_u32().await? as usize;
    if len > max {
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// Writes one length-delimited frame.
pub async fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_u32(bytes.len() as u32).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Connects and reads the server's first handshake message (so the server
/// is past `accept` and waiting for us).
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the runner");
    let hello = read_frame(&mut stream, 1024).await.expect("server hello");
    let hello: Hello = rmp_serde::from_slice(&hello).expect("a handshake message");
    assert!(matches!(hello, Hello::Server { .. }), "{hello:?}");
    stream
}

/// Connects and completes the handshake with `secret`.
pub async fn authenticated(addr: SocketAddr, secret: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the runner");
    let hello = read_frame(&mut stream, 1024).await.expect("server hello");
    let server_nonce = match rmp_serde::from_slice(&hello).expect("a handshake message") {
        Hello::Server { version, nonce } => {
            assert_eq!(version, PROTOCOL_VERSION);
            nonce.0
        }
        other => panic!("expected the server hello, got {other:?}"),
    };
    let mut client_nonce = vec![0u8; 32];
    getrandom::fill(&mut client_nonce).expect("randomness");
    let hello = Hello::Client {
        version: PROTOCOL_VERSION,
        nonce: Bin(client_nonce.clone()),
        proof: Bin(proof(secret, b"client", &server_nonce, &client_nonce)),
    };
    let bytes = rmp_serde::to_vec_named(&hello).expect("encode");
    write_frame(&mut stream, &bytes).await.expect("send hello");
    let answer = read_frame(&mut stream, 1024).await.expect("server answer");
    match rmp_serde::from_slice(&answer).expect("a handshake message") {
        Hello::Accepted { proof: theirs } => assert_eq!(
            theirs.0,
            proof(secret, b"server", &server_nonce, &client_nonce),
            "the server's proof"
        ),
        other => panic!("the handshake was not accepted: {other:?}"),
    }
    stream
}

/// Whether the peer closes the connection within `timeout` (everything it
/// sends before closing is read and dropped).
pub async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, drain).await.is_ok()
}
