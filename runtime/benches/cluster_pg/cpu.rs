//! CPU time per call of the runner processes and of the PostgreSQL backends
//! that serve them: a figure that moves less with the machine's other load
//! than latency and throughput do.
//!
//! Read from `/proc/<pid>/task/*/schedstat` (Linux; PostgreSQL on this machine). Where
//! a process cannot be read, the meter says nothing rather than guess.

use std::collections::HashMap;

use sqlx::{Connection, PgConnection};

/// Nanoseconds process `pid` has run on a CPU (every thread of it, from
/// `/proc/<pid>/task/*/schedstat`), if they can be read.
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Measures one case: started before its calls, read after them.
pub(crate) struct CpuMeter {
    runners: Vec<(u32, u64)>,
    backends: HashMap<u32, u64>,
    application_name: String,
    url: String,
}

impl CpuMeter {
    /// Starts measuring the runner processes `runners` and the backends of
    /// the connections named `application_name`.
    pub(crate) async fn start(runners: &[u32], url: &str, application_name: &str) -> Self {
        let runners = runners
            .iter()
            .filter_map(|pid| cpu_ns(*pid).map(|t| (*pid, t)))
            .collect();
        let backends = backend_pids(url, application_name)
            .await
            .into_iter()
            .filter_map(|pid| cpu_ns(pid).map(|t| (pid, t)))
            .collect();
        Self {
            runners,
            backends,
            application_name: application_name.to_owned(),
            url: url.to_owned(),
        }
    }

    /// `CPU per call: runners .. us, PostgreSQL .. us`, or nothing when a
    /// runner, or every backend (a server on another host), could not be read.
    pub(crate) async fn per_call(self, calls: u64) -> Option<String> {
        let mut runners = 0;
        for (pid, before) in &self.runners {
            runners += cpu_ns(*pid)?.saturating_sub(*before);
        }
        let mut backends = 0;
        let mut read_any = false;
        // Backends opened during the case count from zero.
        for pid in backend_pids(&self.url, &self.application_name).await {
            let before = self.backends.get(&pid).copied().unwrap_or(0);
            if let Some(now) = cpu_ns(pid) {
                backends += now.saturating_sub(before);
                read_any = true;
            }
        }
        if self.runners.is_empty() || !read_any || calls == 0 {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3 / calls as f64;
        Some(format!(
            "CPU per call: runner processes {:.0} us, PostgreSQL backends {:.0} us",
            us(runners),
            us(backends)
        ))
    }
}

/// The backends of the connections named `application_name`.
async fn backend_pids(url: &str, application_name: &str) -> Vec<u32> {
    let Ok(mut conn) = PgConnection::connect(url).await else {
        return Vec::new();
    };
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(application_name)
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    let _ = conn.close().await;
    pids.into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect()
}
