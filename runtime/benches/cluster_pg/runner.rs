//! Runner B: the bench binary re-run as a child process, configured by
//! `FLOTILLA_*` variables like any deployed runner, stopped by a real
//! SIGKILL or SIGTERM.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use flotilla::prelude::*;
use flotilla::{ClusterConfig, Entity, RunnerId};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::database::BenchDatabase;

/// Set in the child's environment: run as runner B, not as the bench.
const CHILD_ENV: &str = "FLOTILLA_BENCH_CHILD";

/// Whether this process is a child runner.
pub(crate) fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// How a child runner is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGKILL: the process dies at once; PostgreSQL frees its locks when
    /// its sessions' sockets close.
    Kill,
    /// SIGTERM: `flotilla::shutdown_signal` fires and the runner shuts down
    /// gracefully, handing its shards over.
    Term,
}

impl Stop {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Term => "term",
        }
    }
}

/// A child runner process.
pub(crate) struct ChildRunner {
    id: RunnerId,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ChildRunner {
    /// Starts runner `id` on the bench database and waits until it serves.
    pub(crate) async fn spawn(db: &BenchDatabase, id: &str, secret: &str, shards: u32) -> Self {
        let exe = std::env::current_exe().expect("the bench binary's path");
        let mut command = tokio::process::Command::new(exe);
        // Only the settings below: a FLOTILLA_* variable of the caller's
        // environment must not make B differ from A.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FLOTILLA_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .env(CHILD_ENV, "1")
            .env("FLOTILLA_STORAGE", db.url())
            .env("FLOTILLA_SECRET", secret)
            .env("FLOTILLA_RUNNER_ID", id)
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_SHARDS", shards.to_string())
            // The child exits when this pipe closes: a bench that dies
            // leaves no runner behind.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child runner");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("the child runner started within 30 s")
            .expect("read the child's stdout");
        match line {
            Some(line) if line.starts_with("READY ") => {}
            other => panic!("child runner {id} did not start: {other:?}"),
        }
        Self {
            id: RunnerId::new(id),
            child,
            stdout,
        }
    }

    /// The runner's id.
    pub(crate) fn id(&self) -> &RunnerId {
        &self.id
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends the signal of `how`, without waiting for the exit.
    pub(crate) fn signal(&mut self, how: Stop) {
        match how {
            Stop::Kill => self.child.start_kill().expect("SIGKILL the child runner"),
            Stop::Term => {
                let pid = self.child.id().expect("the child runner is running");
                // `kill` (the program): the bench forbids unsafe code, so no
                // libc::kill. The clock of a measurement starts before this
                // fork/exec, so it counts against the runtime.
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .expect("run kill -TERM");
                assert!(status.success(), "kill -TERM {pid} failed");
            }
        }
    }

    /// Waits for the process to exit after `signal(how)`; a SIGTERM must end
    /// in a clean shutdown.
    pub(crate) async fn wait_exit(mut self, how: Stop) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the child runner exited within 30 s")
            .expect("wait for the child runner");
        if how == Stop::Term {
            assert!(
                status.success(),
                "child runner {} failed: {status}",
                self.id
            );
            let mut stopped = false;
            while let Ok(Some(line)) = self.stdout.next_line().await {
                stopped |= line == "STOPPED";
            }
            assert!(stopped, "child runner {} did not shut down", self.id);
        }
    }

    /// Signals and waits.
    pub(crate) async fn stop(mut self, how: Stop) {
        self.signal(how);
        self.wait_exit(how).await;
    }
}

/// The child's `main`: a runner of `E` configured from `FLOTILLA_*`,
/// serving until SIGTERM (or until the bench closes its stdin).
pub(crate) fn child_main<E: Entity>() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        // SIGTERM's handler is installed before READY: a SIGTERM right
        // after must reach `shutdown_signal`, not kill the process.
        let _term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("watch SIGTERM");
        let config = ClusterConfig::from_env().expect("FLOTILLA_* settings");
        let cluster = Cluster::builder()
            .config(config)
            .register::<E>()
            .start()
            .await
            .expect("start the child runner");
        println!("READY {}", cluster.runner_id());
        let (parent_gone, gone) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = parent_gone.send(());
        });
        tokio::select! {
            () = flotilla::shutdown_signal() => {}
            _ = gone => {}
        }
        cluster.shutdown().await;
        println!("STOPPED");
    });
}
