//! An entity's mailbox: a bounded queue with one receiver.
//!
//! It is deliberately small. A tokio `mpsc` channel costs about 1 KiB per
//! entity (cache-padded fields and a first block of slots), which with
//! 100,000 active entities is 100 MiB; this one is a mutex around an empty
//! `VecDeque` and a waker until messages arrive.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Why a message was not enqueued; the message comes back.
#[derive(Debug)]
pub(crate) enum SendError<T> {
    /// The mailbox holds `capacity` messages.
    Full(T),
    /// The entity passivated or stopped; activate a new one.
    Closed(T),
}

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    receiver: Option<Waker>,
    closed: bool,
    stopped: bool,
    /// A message was taken and its handler has not reported `done` yet.
    busy: bool,
    /// When the entity last finished a message (or was activated).
    last_active: Instant,
}

/// A bounded multi-producer, single-consumer queue.
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

impl<T> Mailbox<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                receiver: None,
                closed: false,
                stopped: false,
                busy: false,
                last_active: Instant::now(),
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Enqueues `message` if there is room.
    pub(crate) fn try_send(&self, message: T) -> Result<(), SendError<T>> {
        self.push(message, true)
    }

    /// Enqueues `message` past the capacity. Used for persisted messages that
    /// a caller has already stored: each waiting caller adds at most one, so
    /// the queue stays bounded by the number of callers.
    pub(crate) fn send_stored(&self, message: T) -> Result<(), SendError<T>> {
        self.push(message, false)
    }

    fn push(&self, message: T, bounded: bool) -> Result<(), SendError<T>> {
        let waker = {
            let mut state = self.lock();
            if state.closed {
                return Err(SendError::Closed(message));
            }
            if bounded && state.queue.len() >= self.capacity {
                return Err(SendError::Full(message));
            }
            state.queue.push_back(message);
            state.receiver.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// The next message; `None` once the mailbox is closed and empty, or stopped.
    pub(crate) async fn recv(&self) -> Option<T> {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.stopped {
                return Poll::Ready(None);
            }
            if let Some(message) = state.queue.pop_front() {
                state.busy = true;
                return Poll::Ready(Some(message));
            }
            if state.closed {
                return Poll::Ready(None);
            }
            match &mut state.receiver {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Takes a queued message without waiting.
    pub(crate) fn try_recv(&self) -> Option<T> {
        self.lock().queue.pop_front()
    }

    /// The receiver finished the message it took.
    pub(crate) fn done(&self) {
        let mut state = self.lock();
        state.busy = false;
        state.last_active = Instant::now();
    }

    /// Closes the mailbox if nothing arrived or ran for `max_idle`
    /// (passivation); the receiver's `recv` then returns `None`. Returns
    /// whether it closed.
    pub(crate) fn close_if_idle(&self, max_idle: Duration, now: Instant) -> bool {
        let waker = {
            let mut state = self.lock();
            if state.closed
                || state.busy
                || !state.queue.is_empty()
                || now.saturating_duration_since(state.last_active) < max_idle
            {
                return false;
            }
            state.closed = true;
            state.receiver.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Closes the mailbox: later sends fail with `Closed`; queued messages
    /// can still be received.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Closes the mailbox and makes the receiver's `recv` return `None` at
    /// once, queued messages or not (shutdown).
    pub(crate) fn stop(&self) {
        let waker = {
            let mut state = self.lock();
            state.closed = true;
            state.stopped = true;
            state.receiver.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn delivers_in_order_and_refuses_past_capacity() {
        let mailbox = Mailbox::new(2);
        mailbox.try_send(1).unwrap();
        mailbox.try_send(2).unwrap();
        assert!(matches!(mailbox.try_send(3), Err(SendError::Full(3))));
        mailbox.send_stored(4).unwrap();
        assert_eq!(mailbox.recv().await, Some(1));
        assert_eq!(mailbox.recv().await, Some(2));
        assert_eq!(mailbox.recv().await, Some(4));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let mailbox = Arc::new(Mailbox::new(4));
        let receiver = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.recv().await })
        };
        tokio::task::yield_now().await;
        mailbox.try_send(7).unwrap();
        assert_eq!(receiver.await.unwrap(), Some(7));
    }

    #[tokio::test]
    async fn only_an_idle_empty_mailbox_closes_for_idleness() {
        let mailbox = Mailbox::new(4);
        let later = Instant::now() + Duration::from_secs(10);
        assert!(
            !mailbox.close_if_idle(Duration::from_secs(60), later),
            "not idle long enough"
        );
        mailbox.try_send(1).unwrap();
        assert!(
            !mailbox.close_if_idle(Duration::ZERO, later),
            "a message is queued"
        );
        assert_eq!(mailbox.recv().await, Some(1));
        assert!(
            !mailbox.close_if_idle(Duration::ZERO, later),
            "its handler is running"
        );
        mailbox.done();
        assert!(mailbox.close_if_idle(Duration::ZERO, later));
        assert!(mailbox.is_closed());
        assert_eq!(mailbox.recv().await, None);
    }

    #[tokio::test]
    async fn close_keeps_queued_messages_and_stop_does_not() {
        let mailbox = Mailbox::new(4);
        mailbox.try_send(1).unwrap();
        mailbox.close();
        assert!(matches!(mailbox.try_send(2), Err(SendError::Closed(2))));
        assert_eq!(mailbox.recv().await, Some(1));
        assert_eq!(mailbox.recv().await, None);

        let stopped = Mailbox::new(4);
        stopped.try_send(1).unwrap();
        stopped.stop();
        assert_eq!(stopped.recv().await, None);
        assert_eq!(
            stopped.try_recv(),
            Some(1),
            "queued messages stay for the shutdown drain"
        );
    }
}
