//! What can go wrong while setting up or driving a test cluster.

use std::time::Duration;

/// A harness operation failed. Tests usually `unwrap` these: the message says
/// what was being done and, for a runner, where its log is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// PostgreSQL is not reachable or a statement failed.
    #[error(
        "PostgreSQL at {url}: {source}. The cluster tests need a server (see \
         runtime/tests/storage_conformance/postgres_db.rs for how to start one), or point \
         FLOTILLA_TEST_DATABASE_URL at one"
    )]
    Database {
        /// The database URL, without its options.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A runner process could not be spawned or signalled.
    #[error("runner {runner}: {what}: {source}")]
    Process {
        /// The runner id.
        runner: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A runner process exited or said something unexpected before it was
    /// ready. The tail of its log is included.
    #[error("runner {runner} did not start: {reason}\n--- log tail ---\n{log_tail}")]
    NotReady {
        /// The runner id.
        runner: String,
        /// Why (exit status, unexpected line, timeout).
        reason: String,
        /// The last lines of its stderr log.
        log_tail: String,
    },
    /// A condition the harness waited for did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited, with the last state seen.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The runner is not running (killed, exited) and cannot do that.
    #[error("runner {0} is not running")]
    NotRunning(String),
    /// A setting the harness was given cannot work.
    #[error("invalid harness setting: {0}")]
    Invalid(String),
    /// A log directory or file could not be created or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
