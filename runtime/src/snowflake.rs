//! Snowflake ids: 64-bit, time-ordered, unique per machine id.
//!
//! Layout, from the most significant bit: 1 zero bit, 41 bits of milliseconds
//! since [`EPOCH_UNIX_MS`] (2025-01-01T00:00:00Z, good until 2094), 10 bits of
//! machine id, 12 bits of sequence.
//!
//! The generator keeps the last (timestamp, sequence) pair in one atomic and
//! always moves forward from it: ids from one generator are strictly
//! increasing even when the wall clock steps backwards (the generator keeps
//! counting from its last timestamp until the clock catches up) or when more
//! than 4,096 ids are taken in one millisecond (it borrows the next
//! millisecond).
//!
//! On a clock step backwards, then, nothing fails and nothing waits: the
//! time component of the ids holds at the latest millisecond seen (each id
//! takes the next sequence number, borrowing a millisecond every 4,096 ids)
//! until the clock passes it again. The time in an id is therefore "not
//! before"; uniqueness across runners rests on the machine id, which the
//! runner registry leases to one live runner at a time. (A process restarted
//! while its clock is behind starts from the clock again: its new lease may
//! reuse its old machine id, so keep clocks synchronised, e.g. NTP slewing.)

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch at which snowflake time starts.
pub const EPOCH_UNIX_MS: u64 = 1_735_689_600_000;
const MACHINE_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
/// The largest machine id (1023).
pub const MAX_MACHINE_ID: u16 = (1 << MACHINE_BITS) - 1;

/// A snowflake id.
///
/// ```
/// use flotilla::SnowflakeGenerator;
/// let ids = SnowflakeGenerator::new(7);
/// let (a, b) = (ids.next_id(), ids.next_id());
/// assert!(a < b);
/// assert_eq!(a.machine_id(), 7);
/// ```
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Snowflake(u64);

impl Snowflake {
    /// Wraps a raw value.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw 64-bit value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The value as `i64` (always non-negative), for SQL columns.
    pub const fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// Milliseconds since the Unix epoch encoded in the id.
    pub const fn unix_ms(self) -> u64 {
        (self.0 >> (MACHINE_BITS + SEQUENCE_BITS)) + EPOCH_UNIX_MS
    }

    /// The machine id encoded in the id.
    pub const fn machine_id(self) -> u16 {
        ((self.0 >> SEQUENCE_BITS) & MAX_MACHINE_ID as u64) as u16
    }
}

impl fmt::Display for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Snowflake({})", self.0)
    }
}

/// Generates snowflake ids for one machine id. Cheap to share (`Arc`) and lock-free.
#[derive(Debug)]
pub struct SnowflakeGenerator {
    /// The machine id, already shifted into place.
    machine: AtomicU64,
    /// `(ms since EPOCH) << SEQUENCE_BITS | sequence` of the last id handed out.
    last: AtomicU64,
}

impl SnowflakeGenerator {
    /// A generator for `machine_id` (masked to 10 bits).
    pub fn new(machine_id: u16) -> Self {
        Self {
            machine: AtomicU64::new(u64::from(machine_id & MAX_MACHINE_ID) << SEQUENCE_BITS),
            last: AtomicU64::new(0),
        }
    }

    /// The machine id of the ids generated now.
    pub fn machine_id(&self) -> u16 {
        ((self.machine.load(Ordering::Relaxed) >> SEQUENCE_BITS) & u64::from(MAX_MACHINE_ID)) as u16
    }

    /// Switches to `machine_id` (masked to 10 bits) for the ids generated
    /// from now on: a cluster runner takes its machine id from the runner
    /// registry when it (re)joins.
    pub fn set_machine_id(&self, machine_id: u16) {
        self.machine.store(
            u64::from(machine_id & MAX_MACHINE_ID) << SEQUENCE_BITS,
            Ordering::Relaxed,
        );
    }

    /// The next id, using the system clock.
    pub fn next_id(&self) -> Snowflake {
        self.next_id_at(now_unix_ms())
    }

    /// The next id as if the wall clock read `unix_ms`. Ids stay strictly
    /// increasing whatever `unix_ms` does.
    pub fn next_id_at(&self, unix_ms: u64) -> Snowflake {
        let now = unix_ms.saturating_sub(EPOCH_UNIX_MS) << SEQUENCE_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ms = next >> SEQUENCE_BITS;
                    let seq = next & ((1 << SEQUENCE_BITS) - 1);
                    return Snowflake(
                        (ms << (MACHINE_BITS + SEQUENCE_BITS))
                            | self.machine.load(Ordering::Relaxed)
                            | seq,
                    );
                }
                Err(actual) => last = actual,
            }
        }
    }
}

/// Milliseconds since the Unix epoch, by the system clock.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_encode_time_and_machine() {
        let ids = SnowflakeGenerator::new(5);
        let t = EPOCH_UNIX_MS + 1_000;
        let a = ids.next_id_at(t);
        let b = ids.next_id_at(t);
        assert!(b > a);
        assert_eq!(a.unix_ms(), t);
        assert_eq!(a.machine_id(), 5);
    }

    #[test]
    fn the_machine_id_can_be_set_after_start() {
        let ids = SnowflakeGenerator::new(0);
        ids.set_machine_id(1023);
        assert_eq!(ids.machine_id(), 1023);
        assert_eq!(ids.next_id().machine_id(), 1023);
    }

    #[test]
    fn clock_stepping_back_keeps_ids_increasing() {
        let ids = SnowflakeGenerator::new(1);
        let a = ids.next_id_at(EPOCH_UNIX_MS + 10_000);
        let b = ids.next_id_at(EPOCH_UNIX_MS + 5_000);
        assert!(b > a, "an id after a backwards step must still be larger");
        assert_eq!(b.unix_ms(), EPOCH_UNIX_MS + 10_000);
    }

    #[test]
    fn sequence_overflow_borrows_the_next_millisecond() {
        let ids = SnowflakeGenerator::new(1);
        let t = EPOCH_UNIX_MS + 1;
        let mut prev = ids.next_id_at(t);
        for _ in 0..10_000 {
            let next = ids.next_id_at(t);
            assert!(next > prev);
            prev = next;
        }
        assert!(prev.unix_ms() > t);
    }

    /// Ids from one generator: every id must be unique and, per thread,
    /// strictly increasing.
    fn take(ids: &SnowflakeGenerator, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut prev = 0;
        for _ in 0..n {
            let id = ids.next_id().raw();
            assert!(id > prev, "not increasing: {prev} then {id}");
            prev = id;
            out.push(id);
        }
        out
    }

    fn assert_unique(mut all: Vec<u64>, expected: usize) {
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), expected, "collisions");
    }

    #[test]
    fn three_runners_with_leased_machine_ids_never_collide() {
        const PER_RUNNER: usize = 1_000_000;
        // Distinct machine ids, as the runner registry leases them (the
        // lease itself is tested on MemoryRunners in tests/context.rs and
        // on PostgreSQL by the storage conformance suite).
        let all: Vec<u64> = std::thread::scope(|scope| {
            let runners: Vec<_> = [1, 2, 1023]
                .into_iter()
                .map(|machine| {
                    scope.spawn(move || {
                        let ids = SnowflakeGenerator::new(machine);
                        let out = take(&ids, PER_RUNNER);
                        assert!(
                            out.iter()
                                .all(|id| Snowflake::from_raw(*id).machine_id() == machine)
                        );
                        out
                    })
                })
                .collect();
            runners
                .into_iter()
                .flat_map(|r| r.join().unwrap())
                .collect()
        });
        assert_unique(all, 3 * PER_RUNNER);
    }

    #[test]
    fn one_generator_shared_by_threads_never_repeats() {
        let ids = SnowflakeGenerator::new(9);
        let all: Vec<u64> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..3)
                .map(|_| scope.spawn(|| take(&ids, 100_000)))
                .collect();
            callers
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect()
        });
        assert_unique(all, 300_000);
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Documented behaviour on a clock that steps backwards: ids keep
            /// increasing, and their time component holds at the latest
            /// millisecond seen until the clock catches up (then follows it).
            #[test]
            fn ids_increase_whatever_the_clock_does(
                start in 0u64..(1 << 40),
                steps in proptest::collection::vec(-5_000i64..5_000, 1..300),
                machine in 0u16..=MAX_MACHINE_ID,
            ) {
                let ids = SnowflakeGenerator::new(machine);
                let mut clock = EPOCH_UNIX_MS + start;
                let mut latest = 0;
                let mut prev: Option<Snowflake> = None;
                for step in steps {
                    clock = clock.saturating_add_signed(step).max(EPOCH_UNIX_MS);
                    latest = latest.max(clock);
                    let id = ids.next_id_at(clock);
                    if let Some(prev) = prev {
                        prop_assert!(id > prev, "{prev:?} then {id:?} at {clock}");
                    }
                    // Fewer than 4,096 ids per millisecond: no borrowing.
                    prop_assert_eq!(id.unix_ms(), latest);
                    prop_assert_eq!(id.machine_id(), machine);
                    prev = Some(id);
                }
            }

            /// Many ids in few milliseconds (sequence overflow) with the
            /// clock going back and forth: still strictly increasing, and
            /// never ahead of the latest clock reading by more than the
            /// milliseconds borrowed (one per 4,096 ids).
            #[test]
            fn bursts_borrow_milliseconds_and_stay_increasing(
                burst in 1usize..10_000,
                back in 0u64..50,
            ) {
                let ids = SnowflakeGenerator::new(3);
                let t = EPOCH_UNIX_MS + 1_000;
                let mut prev = ids.next_id_at(t);
                for i in 0..burst {
                    let clock = if i % 2 == 0 { t } else { t - back };
                    let id = ids.next_id_at(clock);
                    prop_assert!(id > prev);
                    prev = id;
                }
                let borrowed = (burst as u64 + 1) / 4_096 + 1;
                prop_assert!(prev.unix_ms() <= t + borrowed, "{} > {t} + {borrowed}", prev.unix_ms());
            }
        }
    }
}
