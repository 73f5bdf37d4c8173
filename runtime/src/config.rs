//! Cluster configuration: a builder with defaults that work, or `FLOTILLA_*`
//! environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;
use crate::transport::ClusterSecret;

/// The table prefix on PostgreSQL when none is chosen.
pub const DEFAULT_TABLE_PREFIX: &str = "flotilla_";

/// Where messages and state are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageConfig {
    /// An embedded SQLite file (WAL, `synchronous=FULL`). The default, at `flotilla.db`.
    Sqlite {
        /// The database file; created if missing.
        path: PathBuf,
    },
    /// In memory: nothing survives the process. For tests and throwaway services.
    Memory,
    /// PostgreSQL (the `postgres` feature): many runner processes share the
    /// database and form one cluster.
    Postgres {
        /// Connection URL (`postgres://user@host:5432/db`).
        url: String,
        /// Table prefix (default `flotilla_`), `^[a-z_][a-z0-9_]{0,40}$`.
        prefix: String,
    },
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self::Sqlite {
            path: PathBuf::from("flotilla.db"),
        }
    }
}

/// Settings of a cluster. Every field has a default that works.
///
/// ```
/// use flotilla::ClusterConfig;
/// let config = ClusterConfig::default();
/// assert_eq!(config.shards, 300);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Storage backend. Default: SQLite file `flotilla.db`. Env: `FLOTILLA_STORAGE`
    /// (`sqlite:<path>` or `memory`).
    pub storage: StorageConfig,
    /// Shards in the default group. Default 300. Env: `FLOTILLA_SHARDS`.
    pub shards: u32,
    /// How long a call waits for its reply by default. Default 30 s.
    /// Env: `FLOTILLA_CALL_TIMEOUT` (`250ms`, `30s`, `2m`).
    pub call_timeout: Duration,
    /// Largest encoded request accepted. Default 1 MiB. Env: `FLOTILLA_MAX_PAYLOAD_BYTES`.
    pub max_payload_bytes: usize,
    /// How often stored messages are re-scanned in case a wake-up was lost.
    /// Ready messages are dispatched at once and scheduled ones on their timer;
    /// this is only the safety net. Default 2 s. Env: `FLOTILLA_SAFETY_POLL`.
    pub safety_poll: Duration,
    /// How long processed messages and their replies are kept; also the dedup
    /// window of `primary_key`. Default 7 days. Env: `FLOTILLA_RETENTION`.
    pub retention: Duration,
    /// How long `shutdown` waits for in-flight handlers. Default 30 s.
    /// Env: `FLOTILLA_SHUTDOWN_TIMEOUT`.
    pub shutdown_timeout: Duration,
    /// The snowflake machine id of this process (0–1023). Default 0.
    /// Env: `FLOTILLA_MACHINE_ID`.
    pub machine_id: u16,
    /// Most writes committed in one transaction (group commit). Default 512.
    pub max_batch: usize,
    /// This runner's id, unique in the cluster. Default: `<hostname>-<pid>`.
    /// Env: `FLOTILLA_RUNNER_ID`.
    pub runner_id: Option<String>,
    /// Address the runner transport listens on (PostgreSQL clusters).
    /// Default `127.0.0.1:0` (any free port). Env: `FLOTILLA_LISTEN`.
    pub listen: SocketAddr,
    /// Address other runners reach this one at. Default: the bound listen
    /// address (set it when listening on `0.0.0.0`). Env: `FLOTILLA_ADVERTISE`.
    pub advertise: Option<SocketAddr>,
    /// The secret every runner of the cluster shares; it authenticates the
    /// runner transport. Required on PostgreSQL. Env: `FLOTILLA_SECRET`
    /// (at least 16 bytes).
    pub secret: Option<ClusterSecret>,
    /// This runner's share of shards relative to the others. Default 1.
    /// Env: `FLOTILLA_RUNNER_WEIGHT`.
    pub weight: u32,
    /// Send calls but own no shards and run no entities. Default false.
    /// Env: `FLOTILLA_CLIENT_ONLY` (`true`/`false`).
    pub client_only: bool,
    /// A runner that cannot confirm its shard locks for this long stops
    /// every handler of its shards. Default 2 s; must be below
    /// `lock_timeout`. Env: `FLOTILLA_FENCE_AFTER`.
    pub fence_after: Duration,
    /// PostgreSQL drops a runner's lock connection silent for this long
    /// (`idle_session_timeout`), which frees its shards for others: the
    /// bound on failover of a frozen or partitioned runner. Default 5 s.
    /// Env: `FLOTILLA_LOCK_TIMEOUT`.
    pub lock_timeout: Duration,
    /// How often a runner reads the live runner set (a join or graceful
    /// leave is also announced at once). Default 200 ms.
    /// Env: `FLOTILLA_MEMBERSHIP_POLL`.
    pub membership_poll: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            storage: StorageConfig::default(),
            shards: 300,
            call_timeout: Duration::from_secs(30),
            max_payload_bytes: 1 << 20,
            safety_poll: Duration::from_secs(2),
            retention: Duration::from_secs(7 * 24 * 3600),
            shutdown_timeout: Duration::from_secs(30),
            machine_id: 0,
            max_batch: 512,
            runner_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            secret: None,
            weight: 1,
            client_only: false,
            fence_after: Duration::from_secs(2),
            lock_timeout: Duration::from_secs(5),
            membership_poll: Duration::from_millis(200),
        }
    }
}

impl ClusterConfig {
    /// The defaults, overridden by every `FLOTILLA_*` variable that is set.
    /// A variable that does not parse is an error naming it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(v) = lookup("FLOTILLA_STORAGE") {
            config.storage =
                parse_storage(&v).map_err(|reason| invalid("FLOTILLA_STORAGE", &v, reason))?;
        }
        if let Some(v) = lookup("FLOTILLA_SHARDS") {
            config.shards = parse_num("FLOTILLA_SHARDS", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_CALL_TIMEOUT") {
            config.call_timeout = parse_duration("FLOTILLA_CALL_TIMEOUT", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_MAX_PAYLOAD_BYTES") {
            config.max_payload_bytes = parse_num("FLOTILLA_MAX_PAYLOAD_BYTES", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_SAFETY_POLL") {
            config.safety_poll = parse_duration("FLOTILLA_SAFETY_POLL", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_RETENTION") {
            config.retention = parse_duration("FLOTILLA_RETENTION", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_SHUTDOWN_TIMEOUT") {
            config.shutdown_timeout = parse_duration("FLOTILLA_SHUTDOWN_TIMEOUT", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_MACHINE_ID") {
            config.machine_id = parse_num("FLOTILLA_MACHINE_ID", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_TABLE_PREFIX") {
            match &mut config.storage {
                StorageConfig::Postgres { prefix, .. } => *prefix = v,
                _ => {
                    return Err(invalid(
                        "FLOTILLA_TABLE_PREFIX",
                        &v,
                        "applies to PostgreSQL storage only".to_owned(),
                    ));
                }
            }
        }
        if let Some(v) = lookup("FLOTILLA_RUNNER_ID") {
            config.runner_id = Some(v);
        }
        if let Some(v) = lookup("FLOTILLA_LISTEN") {
            config.listen = parse_num("FLOTILLA_LISTEN", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_ADVERTISE") {
            config.advertise = Some(parse_num("FLOTILLA_ADVERTISE", &v)?);
        }
        if let Some(v) = lookup("FLOTILLA_SECRET") {
            // The value is a secret: never echoed in the error.
            config.secret =
                Some(
                    ClusterSecret::new(v.trim()).map_err(|e| ConfigError::InvalidEnv {
                        var: "FLOTILLA_SECRET",
                        value: "<redacted>".to_owned(),
                        reason: e.to_string(),
                    })?,
                );
        }
        if let Some(v) = lookup("FLOTILLA_RUNNER_WEIGHT") {
            config.weight = parse_num("FLOTILLA_RUNNER_WEIGHT", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_CLIENT_ONLY") {
            config.client_only = parse_num("FLOTILLA_CLIENT_ONLY", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_FENCE_AFTER") {
            config.fence_after = parse_duration("FLOTILLA_FENCE_AFTER", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_LOCK_TIMEOUT") {
            config.lock_timeout = parse_duration("FLOTILLA_LOCK_TIMEOUT", &v)?;
        }
        if let Some(v) = lookup("FLOTILLA_MEMBERSHIP_POLL") {
            config.membership_poll = parse_duration("FLOTILLA_MEMBERSHIP_POLL", &v)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks that every setting is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, setting: &'static str, reason: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    setting,
                    reason: reason.to_owned(),
                })
            }
        };
        check(self.shards >= 1, "shards", "must be at least 1")?;
        check(
            !self.call_timeout.is_zero(),
            "call_timeout",
            "must be more than zero",
        )?;
        check(
            self.max_payload_bytes >= 64,
            "max_payload_bytes",
            "must be at least 64",
        )?;
        check(
            !self.safety_poll.is_zero(),
            "safety_poll",
            "must be more than zero",
        )?;
        check(
            !self.retention.is_zero(),
            "retention",
            "must be more than zero",
        )?;
        check(
            self.machine_id <= crate::snowflake::MAX_MACHINE_ID,
            "machine_id",
            "must be at most 1023",
        )?;
        check(self.max_batch >= 1, "max_batch", "must be at least 1")?;
        if let StorageConfig::Sqlite { path } = &self.storage {
            check(
                !path.as_os_str().is_empty(),
                "storage",
                "the SQLite path is empty",
            )?;
        }
        check(self.weight >= 1, "weight", "must be at least 1")?;
        check(
            !self.membership_poll.is_zero(),
            "membership_poll",
            "must be more than zero",
        )?;
        check(
            self.fence_after >= Duration::from_millis(100),
            "fence_after",
            "must be at least 100ms",
        )?;
        check(
            self.fence_after < self.lock_timeout,
            "fence_after",
            "must be below lock_timeout, so that a runner stops its handlers \
             before the database frees its shards for others",
        )?;
        check(
            self.lock_timeout >= Duration::from_secs(1),
            "lock_timeout",
            "must be at least 1s (PostgreSQL's idle_session_timeout has millisecond \
             resolution, but a shorter bound cuts healthy runners off on a busy machine)",
        )?;
        if let StorageConfig::Postgres { url, .. } = &self.storage {
            check(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "storage",
                "a PostgreSQL URL starts with postgres:// or postgresql://",
            )?;
            check(
                self.secret.is_some() || self.client_only,
                "secret",
                "a runner on PostgreSQL needs the cluster secret (FLOTILLA_SECRET), \
                 which authenticates the runner transport",
            )?;
        }
        Ok(())
    }
}

fn invalid(var: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::InvalidEnv {
        var,
        value: value.to_owned(),
        reason,
    }
}

fn parse_storage(v: &str) -> Result<StorageConfig, String> {
    if v == "memory" {
        return Ok(StorageConfig::Memory);
    }
    if v.starts_with("postgres://") || v.starts_with("postgresql://") {
        return Ok(StorageConfig::Postgres {
            url: v.to_owned(),
            prefix: DEFAULT_TABLE_PREFIX.to_owned(),
        });
    }
    match v.strip_prefix("sqlite:") {
        Some(path) if !path.is_empty() => Ok(StorageConfig::Sqlite {
            path: PathBuf::from(path.trim_start_matches("//")),
        }),
        _ => Err("expected `memory`, `sqlite:<path>` or `postgres://...`".to_owned()),
    }
}

fn parse_num<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    v.trim()
        .parse()
        .map_err(|e: T::Err| invalid(var, v, e.to_string()))
}

fn parse_duration(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim())
        .map_err(|e| invalid(var, v, format!("{e} (examples: 250ms, 30s, 2m)")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<ClusterConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ClusterConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_gives_the_defaults() {
        assert_eq!(from(&[]).unwrap(), ClusterConfig::default());
    }

    #[test]
    fn variables_override_defaults() {
        let c = from(&[
            ("FLOTILLA_STORAGE", "sqlite:/tmp/x.db"),
            ("FLOTILLA_SHARDS", "64"),
            ("FLOTILLA_CALL_TIMEOUT", "1500ms"),
            ("FLOTILLA_RETENTION", "1h"),
            ("FLOTILLA_MACHINE_ID", "12"),
        ])
        .unwrap();
        assert_eq!(
            c.storage,
            StorageConfig::Sqlite {
                path: "/tmp/x.db".into()
            }
        );
        assert_eq!(c.shards, 64);
        assert_eq!(c.call_timeout, Duration::from_millis(1500));
        assert_eq!(c.retention, Duration::from_secs(3600));
        assert_eq!(c.machine_id, 12);
        assert_eq!(
            from(&[("FLOTILLA_STORAGE", "memory")]).unwrap().storage,
            StorageConfig::Memory
        );
    }

    #[test]
    fn a_bad_variable_is_named_in_the_error() {
        for (var, value) in [
            ("FLOTILLA_SHARDS", "many"),
            ("FLOTILLA_CALL_TIMEOUT", "soon"),
            ("FLOTILLA_STORAGE", "mysql://x"),
            ("FLOTILLA_MACHINE_ID", "70000"),
        ] {
            let err = from(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
        }
        let err = from(&[("FLOTILLA_SHARDS", "0")]).unwrap_err().to_string();
        assert!(err.contains("shards"), "{err}");
    }

    #[test]
    fn cluster_variables_configure_a_postgres_runner() {
        let c = from(&[
            ("FLOTILLA_STORAGE", "postgres://app@db:5432/app"),
            ("FLOTILLA_TABLE_PREFIX", "orders_"),
            ("FLOTILLA_LISTEN", "0.0.0.0:7400"),
            ("FLOTILLA_ADVERTISE", "10.0.0.7:7400"),
            ("FLOTILLA_SECRET", "a long shared random secret"),
            ("FLOTILLA_RUNNER_ID", "pod-7"),
            ("FLOTILLA_RUNNER_WEIGHT", "2"),
            ("FLOTILLA_FENCE_AFTER", "1s"),
            ("FLOTILLA_LOCK_TIMEOUT", "3s"),
            ("FLOTILLA_MEMBERSHIP_POLL", "100ms"),
        ])
        .unwrap();
        assert_eq!(
            c.storage,
            StorageConfig::Postgres {
                url: "postgres://app@db:5432/app".into(),
                prefix: "orders_".into()
            }
        );
        assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(c.advertise, Some("10.0.0.7:7400".parse().unwrap()));
        assert_eq!(c.runner_id.as_deref(), Some("pod-7"));
        assert_eq!(c.weight, 2);
        assert!(c.secret.is_some());
        assert_eq!(c.fence_after, Duration::from_secs(1));
        assert_eq!(c.lock_timeout, Duration::from_secs(3));
        assert_eq!(c.membership_poll, Duration::from_millis(100));
        assert!(!c.client_only);
    }

    #[test]
    fn a_postgres_runner_needs_a_secret_and_a_fence_below_the_lock_timeout() {
        let url = ("FLOTILLA_STORAGE", "postgres://app@db/app");
        let err = from(&[url]).unwrap_err().to_string();
        assert!(err.contains("secret"), "{err}");
        // A client-only process may do without (it has no link then).
        assert!(from(&[url, ("FLOTILLA_CLIENT_ONLY", "true")]).is_ok());
        let secret = ("FLOTILLA_SECRET", "a long shared random secret");
        let err = from(&[url, secret, ("FLOTILLA_FENCE_AFTER", "5s")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence_after"), "{err}");
        // A prefix without PostgreSQL is a mistake worth naming.
        let err = from(&[("FLOTILLA_TABLE_PREFIX", "x_")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLOTILLA_TABLE_PREFIX"), "{err}");
    }

    #[test]
    fn a_short_secret_is_refused_without_echoing_it() {
        let err = from(&[("FLOTILLA_SECRET", "hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLOTILLA_SECRET"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
