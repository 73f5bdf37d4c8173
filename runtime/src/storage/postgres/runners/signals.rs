//! Signals between processes: `NOTIFY` on the cluster's channel with a
//! short text payload, and a listening task that decodes them.
//!
//! Payloads: `m` (membership changed), `r:<group>:<index>` (messages ready
//! in a shard; the index follows the last `:`, so a group may hold `:`),
//! `l` (lagged). An unknown payload (a newer build) is ignored.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::mpsc;

use crate::error::StorageError;
use crate::sharding::ShardId;
use crate::storage::Signal;

/// Signals buffered for a slow receiver before the listening task waits
/// (PostgreSQL queues the notifications meanwhile).
const BUFFER: usize = 256;

/// The wait before opening a listening connection again after a failure.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// The payload of `signal`.
pub(super) fn encode(signal: &Signal) -> String {
    match signal {
        Signal::MembershipChanged => "m".to_owned(),
        Signal::MessagesReady(shard) => format!("r:{}:{}", shard.group(), shard.index()),
        Signal::Lagged => "l".to_owned(),
    }
}

/// The signal of `payload`; `None` if it is not one this build knows.
pub(super) fn decode(payload: &str) -> Option<Signal> {
    match payload {
        "m" => Some(Signal::MembershipChanged),
        "l" => Some(Signal::Lagged),
        _ => {
            let (group, index) = payload.strip_prefix("r:")?.rsplit_once(':')?;
            Some(Signal::MessagesReady(ShardId::new(
                group,
                index.parse().ok()?,
            )))
        }
    }
}

/// A listener on `channel`, on a connection of `pool`.
async fn listener(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Lost connections are re-established before `try_recv` reports them.
    listener.eager_reconnect(true);
    listener.listen(channel).await?;
    Ok(listener)
}

/// Starts listening on `channel` and forwards decoded signals to the
/// returned receiver. The task ends when the receiver is dropped or the
/// pool is closed.
pub(super) async fn listen(
    pool: &PgPool,
    channel: &str,
) -> Result<mpsc::Receiver<Signal>, StorageError> {
    let first = listener(pool, channel).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(forward(pool.clone(), channel.to_owned(), first, tx));
    Ok(rx)
}

/// The listening task.
async fn forward(
    pool: PgPool,
    channel: String,
    mut listener: PgListener,
    tx: mpsc::Sender<Signal>,
) {
    loop {
        let received = tokio::select! {
            () = tx.closed() => return,
            received = listener.try_recv() => received,
        };
        let signal = match received {
            Ok(Some(notification)) => match decode(notification.payload()) {
                Some(signal) => signal,
                None => {
                    tracing::debug!(payload = notification.payload(), "unknown signal ignored");
                    continue;
                }
            },
            // The connection was lost and is listening again: whatever was
            // sent in between is gone.
            Ok(None) => Signal::Lagged,
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::debug!(%error, "signal listener failed; listening again");
                // A fresh listener: the old one's connection may be in any state.
                drop(listener);
                listener = loop {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(RECONNECT_BACKOFF) => {}
                    }
                    if pool.is_closed() {
                        return;
                    }
                    match self::listener(&pool, &channel).await {
                        Ok(listener) => break listener,
                        Err(sqlx::Error::PoolClosed) => return,
                        Err(error) => {
                            tracing::debug!(%error, "signal listener could not reconnect");
                        }
                    }
                };
                Signal::Lagged
            }
        };
        if tx.send(signal).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for signal in [
            Signal::MembershipChanged,
            Signal::Lagged,
            Signal::MessagesReady(ShardId::default_group(299)),
            Signal::MessagesReady(ShardId::new("a:b", 7)),
        ] {
            assert_eq!(decode(&encode(&signal)), Some(signal));
        }
        for unknown in ["", "x", "r:", "r:g", "r:g:-1", "r:g:x"] {
            assert_eq!(decode(unknown), None, "{unknown}");
        }
    }
}
