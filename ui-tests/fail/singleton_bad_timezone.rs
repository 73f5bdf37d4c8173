use flotilla::prelude::*;

#[singleton(cron = "0 0 9 * * *", timezone = "Europe/Atlantis")]
async fn morning(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

#[singleton(timezone = "Europe/Paris")]
async fn plain_with_timezone(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

fn main() {}
