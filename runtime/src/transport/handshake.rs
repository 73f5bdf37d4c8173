//! The authenticated handshake that opens every connection.
//!
//! The cluster secret never crosses the wire. Each side sends a fresh random
//! nonce and proves it holds the secret with an HMAC-SHA256 over both nonces,
//! labelled by role so a proof cannot be reflected back:
//!
//! 1. server → client: `Server { version, nonce_s }`
//! 2. client → server: `Client { version, nonce_c, HMAC(secret, "client" ‖ nonce_s ‖ nonce_c) }`
//! 3. server → client: `Accepted { HMAC(secret, "server" ‖ nonce_s ‖ nonce_c) }`, or
//!    `Refused` and the connection is closed.
//!
//! Proofs are compared in constant time.

use std::fmt;

use futures::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::error::HandshakeError;
use super::frame::Bin;

/// The protocol version both sides must speak.
pub(crate) const PROTOCOL_VERSION: u16 = 1;

/// Handshake messages are small; a larger frame is an error, not a buffer.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 1024;

const NONCE_LEN: usize = 32;

/// The secret every runner of a cluster shares; it authenticates runner
/// connections. Its bytes are never printed (`Debug` shows a placeholder).
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

/// The secret offered is too short to resist guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cluster secret has {len} bytes; use at least {min} random bytes")]
#[non_exhaustive]
pub struct SecretTooShort {
    /// Bytes offered.
    pub len: usize,
    /// Bytes required.
    pub min: usize,
}

impl ClusterSecret {
    /// The fewest bytes a secret may have.
    pub const MIN_LEN: usize = 16;

    /// Wraps `bytes` (at least [`ClusterSecret::MIN_LEN`] of them).
    ///
    /// ```
    /// use flotilla::transport::ClusterSecret;
    /// assert!(ClusterSecret::new("a long shared random secret").is_ok());
    /// assert!(ClusterSecret::new("short").is_err());
    /// ```
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, SecretTooShort> {
        let bytes = bytes.as_ref();
        if bytes.len() < Self::MIN_LEN {
            return Err(SecretTooShort {
                len: bytes.len(),
                min: Self::MIN_LEN,
            });
        }
        Ok(Self(bytes.to_vec()))
    }

    fn mac(&self, role: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this never falls back; the
        // fallback keeps the function total without a panic path.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
        mac.update(b"flotilla/1 ");
        mac.update(role);
        mac.update(server_nonce);
        mac.update(client_nonce);
        mac
    }

    fn prove(&self, role: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
        self.mac(role, server_nonce, client_nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    fn verify(&self, role: &[u8], server_nonce: &[u8], client_nonce: &[u8], proof: &[u8]) -> bool {
        self.mac(role, server_nonce, client_nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

impl PartialEq for ClusterSecret {
    fn eq(&self, other: &Self) -> bool {
        // Not constant time: used to compare configurations, never a peer's proof.
        self.0 == other.0
    }
}

impl Eq for ClusterSecret {}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
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

fn nonce() -> Result<Vec<u8>, HandshakeError> {
    let mut bytes = vec![0u8; NONCE_LEN];
    getrandom::fill(&mut bytes)
        .map_err(|e| HandshakeError::Io(format!("no randomness for the nonce: {e}")))?;
    Ok(bytes)
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    hello: &Hello,
) -> Result<(), HandshakeError> {
    let bytes = crate::codec::encode("handshake message", hello)
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    framed
        .send(bytes::Bytes::from(bytes))
        .await
        .map_err(|e| HandshakeError::Io(e.to_string()))
}

async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
) -> Result<Hello, HandshakeError> {
    match framed.next().await {
        Some(Ok(bytes)) => crate::codec::decode("handshake message", &bytes)
            .map_err(|e| HandshakeError::Malformed(e.to_string())),
        Some(Err(e)) => Err(HandshakeError::Io(e.to_string())),
        None => Err(HandshakeError::Io("closed by the peer".into())),
    }
}

fn check_version(theirs: u16) -> Result<(), HandshakeError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

/// Runs the client side; `Ok` means both sides proved the secret.
pub(crate) async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    secret: &ClusterSecret,
) -> Result<(), HandshakeError> {
    let server_nonce = match receive(framed).await? {
        Hello::Server { version, nonce } => {
            check_version(version)?;
            nonce.0
        }
        other => return Err(HandshakeError::Malformed(format!("{other:?}"))),
    };
    let client_nonce = nonce()?;
    let proof = secret.prove(b"client", &server_nonce, &client_nonce);
    send(
        framed,
        &Hello::Client {
            version: PROTOCOL_VERSION,
            nonce: Bin(client_nonce.clone()),
            proof: Bin(proof),
        },
    )
    .await?;
    match receive(framed).await? {
        Hello::Accepted { proof } => {
            if secret.verify(b"server", &server_nonce, &client_nonce, &proof.0) {
                Ok(())
            } else {
                Err(HandshakeError::BadProof)
            }
        }
        Hello::Refused { .. } => Err(HandshakeError::Refused),
        other => Err(HandshakeError::Malformed(format!("{other:?}"))),
    }
}

/// Runs the server side; `Ok` means both sides proved the secret. On an error
/// the caller records it and then calls [`refuse`], so that a refused client
/// only learns of it after the server has counted it.
pub(crate) async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    secret: &ClusterSecret,
) -> Result<(), HandshakeError> {
    let server_nonce = nonce()?;
    send(
        framed,
        &Hello::Server {
            version: PROTOCOL_VERSION,
            nonce: Bin(server_nonce.clone()),
        },
    )
    .await?;
    let (version, client_nonce, proof) = match receive(framed).await? {
        Hello::Client {
            version,
            nonce,
            proof,
        } => (version, nonce.0, proof.0),
        other => return Err(HandshakeError::Malformed(format!("{other:?}"))),
    };
    check_version(version)?;
    // A short nonce gives the client's proof less freshness: refuse it too.
    if client_nonce.len() != NONCE_LEN
        || !secret.verify(b"client", &server_nonce, &client_nonce, &proof)
    {
        return Err(HandshakeError::BadProof);
    }
    let proof = secret.prove(b"server", &server_nonce, &client_nonce);
    send(framed, &Hello::Accepted { proof: Bin(proof) }).await
}

/// Tells the client why it was refused (best effort: it may be gone).
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    error: &HandshakeError,
) {
    let _ = send(
        framed,
        &Hello::Refused {
            reason: error.to_string(),
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    /// The server side as the accept loop runs it: refuse after a failure.
    async fn serve_one(
        framed: &mut Framed<tokio::io::DuplexStream, LengthDelimitedCodec>,
        key: &ClusterSecret,
    ) -> Result<(), HandshakeError> {
        let result = server(framed, key).await;
        if let Err(error) = &result {
            refuse(framed, error).await;
        }
        result
    }

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s).expect("long enough")
    }

    fn pair() -> (
        Framed<tokio::io::DuplexStream, LengthDelimitedCodec>,
        Framed<tokio::io::DuplexStream, LengthDelimitedCodec>,
    ) {
        let (a, b) = duplex(4096);
        let codec = || super::super::frame::codec(MAX_HANDSHAKE_FRAME);
        (Framed::new(a, codec()), Framed::new(b, codec()))
    }

    #[tokio::test]
    async fn the_same_secret_on_both_sides_is_accepted() {
        let (mut c, mut s) = pair();
        let key = secret("0123456789abcdef-cluster");
        let (client, server) = tokio::join!(client(&mut c, &key), serve_one(&mut s, &key));
        assert_eq!(client, Ok(()));
        assert_eq!(server, Ok(()));
    }

    #[tokio::test]
    async fn a_client_with_another_secret_is_refused() {
        let (mut c, mut s) = pair();
        let (wrong, right) = (
            secret("the wrong secret...."),
            secret("the right secret...."),
        );
        let (client, server) = tokio::join!(client(&mut c, &wrong), serve_one(&mut s, &right));
        assert_eq!(client, Err(HandshakeError::Refused));
        assert_eq!(server, Err(HandshakeError::BadProof));
    }

    /// An impostor server that accepts any client and cannot prove the secret.
    #[tokio::test]
    async fn a_server_that_cannot_prove_the_secret_is_rejected() {
        let (mut c, mut s) = pair();
        let impostor = async {
            send(
                &mut s,
                &Hello::Server {
                    version: PROTOCOL_VERSION,
                    nonce: Bin(vec![7; NONCE_LEN]),
                },
            )
            .await?;
            receive(&mut s).await?;
            send(
                &mut s,
                &Hello::Accepted {
                    proof: Bin(vec![0; 32]),
                },
            )
            .await
        };
        let key = secret("0123456789abcdef");
        let (client, impostor) = tokio::join!(client(&mut c, &key), impostor);
        assert_eq!(impostor, Ok(()));
        assert_eq!(client, Err(HandshakeError::BadProof));
    }

    #[tokio::test]
    async fn a_client_proof_replayed_as_a_server_proof_is_rejected() {
        // The roles are in the MAC, so the server cannot echo the client's proof.
        let key = secret("0123456789abcdef");
        let (s, c) = (vec![1u8; NONCE_LEN], vec![2u8; NONCE_LEN]);
        let client_proof = key.prove(b"client", &s, &c);
        assert!(!key.verify(b"server", &s, &c, &client_proof));
        assert!(key.verify(b"client", &s, &c, &client_proof));
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused() {
        let (mut c, mut s) = pair();
        let old_client = async {
            receive(&mut c).await?;
            send(
                &mut c,
                &Hello::Client {
                    version: 0,
                    nonce: Bin(vec![1; NONCE_LEN]),
                    proof: Bin(vec![0; 32]),
                },
            )
            .await?;
            receive(&mut c).await
        };
        let key = secret("0123456789abcdef");
        let (reply, server) = tokio::join!(old_client, serve_one(&mut s, &key));
        assert!(matches!(reply, Ok(Hello::Refused { .. })));
        assert_eq!(
            server,
            Err(HandshakeError::VersionMismatch { ours: 1, theirs: 0 })
        );
    }

    #[test]
    fn the_secret_is_never_printed() {
        let key = secret("super secret value!!");
        assert_eq!(format!("{key:?}"), "ClusterSecret(..)");
    }
}
