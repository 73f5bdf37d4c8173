//! The `Clock` seam: where the runtime reads time and waits.
//!
//! Code that needs "now" or a timer takes an `Arc<dyn Clock>` instead of
//! calling `SystemTime::now`, `Instant::now` or `tokio::time::sleep` directly,
//! so that tests (and, later, a seeded deterministic simulation) can drive time
//! by hand. [`SystemClock`] is the real thing; [`ManualClock`] only moves when
//! told to.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use flotilla::time::{Clock, ManualClock};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let clock = Arc::new(ManualClock::new());
//! let start = clock.instant();
//! let nap = clock.sleep(Duration::from_secs(60));
//! clock.advance(Duration::from_secs(60));
//! nap.await; // returns at once: the clock has moved past the deadline
//! assert_eq!(clock.instant() - start, Duration::from_secs(60));
//! # }
//! ```

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A boxed timer future, as returned by [`Clock::sleep`].
///
/// Boxed so that `Clock` stays object safe (`Arc<dyn Clock>`): the runtime
/// holds one clock chosen at start, not a type parameter on every struct.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of wall-clock time, monotonic time and timers.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Wall-clock time, for timestamps that are stored or sent (cron ticks,
    /// `deliver_at`, retention).
    fn now(&self) -> SystemTime;

    /// Monotonic time, for deadlines and latencies.
    fn instant(&self) -> Instant;

    /// A future that completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The operating system's clocks and tokio's timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn instant(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves it.
///
/// Sleepers wake when an `advance` carries the clock to or past their
/// deadline, in deadline order; a zero-length sleep is ready at once.
#[derive(Debug)]
pub struct ManualClock {
    wall_start: SystemTime,
    mono_start: Instant,
    state: Mutex<ManualState>,
}

#[derive(Debug, Default)]
struct ManualState {
    elapsed: Duration,
    sleepers: Vec<(Duration, oneshot::Sender<()>)>,
}

impl ManualClock {
    /// A clock reading the current wall time, frozen.
    pub fn new() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock whose wall time starts at `wall_start` (pin it for
    /// reproducible tests).
    pub fn starting_at(wall_start: SystemTime) -> Self {
        Self {
            wall_start,
            mono_start: Instant::now(),
            state: Mutex::new(ManualState::default()),
        }
    }

    /// Moves the clock forward by `by` and wakes every sleeper whose
    /// deadline is now reached.
    pub fn advance(&self, by: Duration) {
        let due = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.elapsed = state.elapsed.saturating_add(by);
            let now = state.elapsed;
            let (mut due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.sleepers)
                .into_iter()
                .partition(|(deadline, _)| *deadline <= now);
            state.sleepers = waiting;
            due.sort_by_key(|(deadline, _)| *deadline);
            due
        };
        // Woken outside the lock: a woken task may call back into the clock.
        for (_, wake) in due {
            // The sleeper may have been dropped; nothing to wake then.
            let _ = wake.send(());
        }
    }

    /// How far the clock has been advanced since it was created.
    pub fn elapsed(&self) -> Duration {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed
    }

    /// Number of sleepers still waiting (dropped sleepers are forgotten on
    /// the next `advance`).
    pub fn pending_sleepers(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .sleepers
            .iter()
            .filter(|(_, s)| !s.is_closed())
            .count()
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.wall_start + self.elapsed()
    }

    fn instant(&self) -> Instant {
        self.mono_start + self.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if duration.is_zero() {
            return Box::pin(std::future::ready(()));
        }
        let deadline = state.elapsed.saturating_add(duration);
        let (wake, woken) = oneshot::channel();
        state.sleepers.push((deadline, wake));
        Box::pin(async move {
            // The sender lives in the clock; it is only dropped unsent if the
            // clock itself is dropped, and then this sleep never ends, as a
            // stopped clock would have it.
            if woken.await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    #[test]
    fn manual_clock_stands_still_until_advanced() {
        let clock = ManualClock::starting_at(SystemTime::UNIX_EPOCH);
        let (wall, mono) = (clock.now(), clock.instant());
        assert_eq!(clock.now(), wall);
        assert_eq!(clock.instant(), mono);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(
            clock.now(),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1500)
        );
        assert_eq!(clock.instant() - mono, Duration::from_millis(1500));
    }

    #[test]
    fn a_sleep_ends_exactly_when_its_deadline_is_reached() {
        let clock = ManualClock::new();
        let mut nap = clock.sleep(Duration::from_secs(10));
        assert!((&mut nap).now_or_never().is_none());
        clock.advance(Duration::from_secs(9));
        assert!((&mut nap).now_or_never().is_none());
        clock.advance(Duration::from_secs(1));
        assert!(nap.now_or_never().is_some());
    }

    #[test]
    fn a_zero_sleep_is_ready_at_once() {
        let clock = ManualClock::new();
        assert!(clock.sleep(Duration::ZERO).now_or_never().is_some());
        assert_eq!(clock.pending_sleepers(), 0);
    }

    #[tokio::test]
    async fn an_advance_wakes_only_the_sleepers_it_reaches() {
        let clock = Arc::new(ManualClock::new());
        let short = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        let long = tokio::spawn(clock.sleep(Duration::from_secs(30)));
        clock.advance(Duration::from_secs(15));
        short.await.expect("short sleeper");
        assert!(!long.is_finished());
        assert_eq!(clock.pending_sleepers(), 1);
        clock.advance(Duration::from_secs(15));
        long.await.expect("long sleeper");
        assert_eq!(clock.pending_sleepers(), 0);
    }

    #[test]
    fn dropped_sleepers_are_not_counted() {
        let clock = ManualClock::new();
        let kept = clock.sleep(Duration::from_secs(1));
        drop(clock.sleep(Duration::from_secs(1)));
        assert_eq!(clock.pending_sleepers(), 1);
        drop(kept);
    }

    #[tokio::test]
    async fn system_clock_sleeps_for_real() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let before = clock.instant();
        clock.sleep(Duration::from_millis(5)).await;
        assert!(clock.instant() - before >= Duration::from_millis(5));
        assert!(clock.now() > SystemTime::UNIX_EPOCH);
    }
}
