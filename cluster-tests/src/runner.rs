//! One runner process: spawn, wait until ready, signal, restart, and what it
//! printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Notify;

use crate::HarnessError;

/// Set for every runner: the node exits when its stdin closes, which happens
/// when the test process dies, so no runner outlives its test.
pub const PARENT_WATCH_ENV: &str = "FLOTILLA_TEST_PARENT_WATCH";

/// How long a runner may take to print `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines a runner printed on stdout, over all its incarnations.
#[derive(Debug, Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Notify,
}

impl Output {
    fn push(&self, line: String) {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn len(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// What a runner process is started with; kept for restarts.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    /// The runner id (`FLOTILLA_RUNNER_ID`).
    pub id: String,
    /// The `flotilla-test-node` binary.
    pub binary: PathBuf,
    /// Environment variables, on top of the parent's minus its `FLOTILLA_*`.
    pub env: Vec<(String, String)>,
    /// The file its stderr is appended to.
    pub log: PathBuf,
}

/// A running `flotilla-test-node` process. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Runner {
    spec: RunnerSpec,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pid: u32,
    address: Option<SocketAddr>,
    output: Arc<Output>,
    /// `READY` lines printed by earlier incarnations.
    ready_before: usize,
}

impl Runner {
    /// Spawns the process and waits until it prints `READY`.
    pub async fn start(spec: RunnerSpec) -> Result<Self, HarnessError> {
        let mut runner = Self {
            spec,
            child: None,
            stdin: None,
            pid: 0,
            address: None,
            output: Arc::default(),
            ready_before: 0,
        };
        runner.spawn()?;
        runner.wait_ready().await?;
        Ok(runner)
    }

    /// Spawns the process without waiting for `READY` (see
    /// [`wait_ready`](Self::wait_ready)), so several runners start at once.
    pub fn spawn_only(spec: RunnerSpec) -> Result<Self, HarnessError> {
        let mut runner = Self {
            spec,
            child: None,
            stdin: None,
            pid: 0,
            address: None,
            output: Arc::default(),
            ready_before: 0,
        };
        runner.spawn()?;
        Ok(runner)
    }

    fn process_error(&self, what: &'static str, source: std::io::Error) -> HarnessError {
        HarnessError::Process {
            runner: self.spec.id.clone(),
            what,
            source,
        }
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .map_err(|e| self.process_error("open its log file", e))?;
        let mut command = Command::new(&self.spec.binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FLOTILLA_") {
                command.env_remove(name);
            }
        }
        command
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .env("FLOTILLA_RUNNER_ID", &self.spec.id)
            .env(PARENT_WATCH_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        self.ready_before = self.ready_lines();
        let mut child = command
            .spawn()
            .map_err(|e| self.process_error("spawn", e))?;
        self.pid = child.id().unwrap_or(0);
        self.stdin = child.stdin.take();
        if let Some(stdout) = child.stdout.take() {
            let output = self.output.clone();
            // Always drained: a handler printing into a full pipe would stall.
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.push(line);
                }
            });
        }
        self.child = Some(child);
        self.address = None;
        Ok(())
    }

    /// Waits until the current incarnation prints `READY <id> <addr>`.
    pub async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let seen_before = self.ready_before;
        loop {
            let changed = self.output.changed.notified();
            let ready: Vec<String> = self
                .output
                .snapshot()
                .into_iter()
                .filter(|l| l.starts_with("READY "))
                .collect();
            if let Some(line) = ready.get(seen_before) {
                let mut words = line.split_whitespace().skip(1);
                let id = words.next().unwrap_or_default();
                let addr = words.next().unwrap_or_default();
                if id != self.spec.id {
                    return Err(self.not_ready(format!("it says it is {id:?}: {line:?}")));
                }
                self.address = addr.parse().ok();
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.not_ready(format!("it exited with {status}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.not_ready(format!("no READY line within {READY_TIMEOUT:?}")));
            }
            // Also wake now and then to notice an exit.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), changed).await;
        }
    }

    fn ready_lines(&self) -> usize {
        self.output
            .snapshot()
            .iter()
            .filter(|l| l.starts_with("READY "))
            .count()
    }

    fn not_ready(&self, reason: String) -> HarnessError {
        HarnessError::NotReady {
            runner: self.spec.id.clone(),
            reason,
            log_tail: self.log_tail(60),
        }
    }

    /// The runner id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The OS process id of the current incarnation.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The transport address it printed in its `READY` line (`None` before).
    pub fn address(&self) -> Option<SocketAddr> {
        self.address
    }

    /// Its stderr log file.
    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }

    /// The last `lines` lines of its stderr log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.spec.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every stdout line so far (all incarnations).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.output.snapshot()
    }

    /// Waits for a stdout line (printed after the first `skip` lines) that
    /// satisfies `matches`, and returns it.
    pub async fn wait_line(
        &self,
        skip: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.output.changed.notified();
            if let Some(line) = self
                .output
                .snapshot()
                .into_iter()
                .skip(skip)
                .find(|l| matches(l))
            {
                return Ok(line);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!("a line on {}'s stdout", self.spec.id),
                    after: timeout,
                });
            }
            let _ = tokio::time::timeout(left, changed).await;
        }
    }

    /// How many stdout lines it printed so far (a `skip` for [`wait_line`](Self::wait_line)).
    pub fn stdout_len(&self) -> usize {
        self.output.len()
    }

    /// Writes one command line to its stdin (see the node binary).
    pub async fn command(&mut self, line: &str) -> Result<(), HarnessError> {
        let id = self.spec.id.clone();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| HarnessError::NotRunning(id.clone()))?;
        let write = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.flush().await
        };
        write.await.map_err(|source| HarnessError::Process {
            runner: id,
            what: "write a command",
            source,
        })
    }

    /// Closes its stdin, as the death of the test process would: a runner
    /// started by the harness then exits by itself (code 3), so none
    /// outlives a test process that was killed.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Whether the current incarnation is still running (a stopped process
    /// counts as running).
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    async fn signal(&self, signal: &str) -> Result<(), HarnessError> {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid.to_string())
            .status()
            .await
            .map_err(|e| self.process_error("run `kill`", e))?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::NotRunning(self.spec.id.clone()))
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) -> Result<ExitStatus, HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::NotRunning(self.spec.id.clone()));
        };
        self.stdin = None;
        let _ = child.start_kill();
        child
            .wait()
            .await
            .map_err(|e| self.process_error("wait", e))
    }

    /// Sends SIGTERM and returns at once (see [`wait_exit`](Self::wait_exit)).
    pub async fn send_term(&self) -> Result<(), HarnessError> {
        self.signal("-TERM").await
    }

    /// Waits at most `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let id = self.spec.id.clone();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| HarnessError::NotRunning(id.clone()))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| HarnessError::Timeout {
                what: format!("runner {id} to exit"),
                after: timeout,
            })?
            .map_err(|source| HarnessError::Process {
                runner: id,
                what: "wait",
                source,
            })?;
        self.child = None;
        self.stdin = None;
        Ok(status)
    }

    /// SIGTERM, then waits at most `timeout` for a graceful exit.
    pub async fn term(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        self.send_term().await?;
        self.wait_exit(timeout).await
    }

    /// SIGSTOP: the process freezes (its sockets stay open). Returns once
    /// the kernel reports it stopped (where `/proc` tells).
    pub async fn stop(&self) -> Result<(), HarnessError> {
        self.signal("-STOP").await?;
        self.wait_state(|state| state == Some('T'), "stopped").await
    }

    /// SIGCONT: a stopped process runs on. Returns once the kernel reports
    /// it no longer stopped (where `/proc` tells).
    pub async fn cont(&self) -> Result<(), HarnessError> {
        self.signal("-CONT").await?;
        self.wait_state(|state| state != Some('T'), "running").await
    }

    async fn wait_state(
        &self,
        reached: impl Fn(Option<char>) -> bool,
        what: &str,
    ) -> Result<(), HarnessError> {
        if !Path::new("/proc/self/stat").exists() {
            return Ok(()); // no procfs: trust the signal
        }
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        while !reached(process_state(self.pid)) {
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("runner {} to be {what}", self.spec.id),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Sets (or replaces) an environment variable of the next incarnation.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.spec.env.retain(|(n, _)| n != name);
        self.spec.env.push((name.to_owned(), value.to_owned()));
    }

    /// Starts a new incarnation with the same id and settings (killing the
    /// current one first if it still runs) and waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            self.kill().await?;
        }
        self.spawn()?;
        self.wait_ready().await
    }
}

/// The state letter of process `pid` from `/proc/<pid>/stat` (`R`, `S`, `T`
/// for stopped, `Z` for a zombie, ...); `None` if there is no such process
/// (or no procfs).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so the
    // state follows the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            // Reap it, briefly, so that its database sessions are closing
            // before the schema is dropped.
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
