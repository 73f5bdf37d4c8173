//! What the bench binaries share: latency histograms, merging the callers'
//! histograms into one run, and the one-line report.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A histogram of call latencies in nanoseconds (1 ns to 60 s, 3 digits).
pub(crate) fn latencies() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds are valid")
}

/// Records one call that started at `started`.
pub(crate) fn record(latency: &mut Histogram<u64>, started: Instant) {
    let took = started.elapsed().as_nanos() as u64;
    latency
        .record(took.max(1))
        .expect("latency within the histogram's bounds");
}

/// The calls of all callers of one case.
pub(crate) struct Run {
    pub(crate) latency: Histogram<u64>,
    pub(crate) calls: u64,
    pub(crate) elapsed: Duration,
}

impl Run {
    /// Waits for every caller task and merges their histograms.
    pub(crate) async fn collect(
        tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
        calls: u64,
        started: Instant,
    ) -> Self {
        let mut latency = latencies();
        for task in tasks {
            latency
                .add(task.await.expect("caller task"))
                .expect("histograms share bounds");
        }
        Self {
            latency,
            calls,
            elapsed: started.elapsed(),
        }
    }
}

/// Runs `calls` calls split over `callers` concurrent tasks; `call(n)`
/// makes call number `n` (0-based, distinct across callers).
pub(crate) async fn drive<F, Fut>(callers: u64, calls: u64, call: F) -> Run
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_caller = calls / callers;
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latency = latencies();
                for i in 0..per_caller {
                    let t = Instant::now();
                    call(caller * per_caller + i).await;
                    record(&mut latency, t);
                }
                latency
            })
        })
        .collect();
    Run::collect(tasks, per_caller * callers, started).await
}

/// Prints `name: p50 .. us, p99 .. us, .. calls/s (n calls)`.
pub(crate) fn report(name: &str, run: Run) {
    let us = |q: f64| run.latency.value_at_quantile(q) as f64 / 1_000.0;
    println!(
        "{name}: p50 {:.1} us, p99 {:.1} us, {:.0} calls/s ({} calls)",
        us(0.5),
        us(0.99),
        run.calls as f64 / run.elapsed.as_secs_f64(),
        run.calls
    );
}
