use flotilla::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct ReportState {
    runs: u64,
}

/// A cron singleton with every option.
#[singleton(
    name = "reports.nightly",
    cron = "0 30 2 * * *",
    timezone = "Europe/Paris",
    skip_if_older_than = "10m",
    state = ReportState
)]
pub async fn nightly_report(ctx: SingletonContext<ReportState>) -> Result<(), String> {
    ctx.with_state(|s| s.runs += 1);
    let _ = ctx.scheduled_at();
    Ok(())
}

/// A plain singleton; its state is the context's type parameter.
#[singleton]
async fn leader_loop(ctx: SingletonContext<u64>) -> Result<(), std::io::Error> {
    while !ctx.is_stopping() {
        ctx.with_state(|n| *n += 1);
        ctx.stopped().await;
    }
    Ok(())
}

/// Five fields, no state.
#[singleton(cron = "*/5 * * * *")]
async fn every_five_minutes(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

fn main() {
    use flotilla::Singleton;
    assert_eq!(NightlyReport::NAME, "reports.nightly");
    assert_eq!(NightlyReport::options().cron, Some("0 30 2 * * *"));
    assert_eq!(LeaderLoop::NAME, "leader_loop");
    assert_eq!(EveryFiveMinutes::options().timezone, None);
    let _builder = Cluster::builder()
        .singleton::<NightlyReport>()
        .singleton::<LeaderLoop>()
        .singleton::<EveryFiveMinutes>();
}
