use flotilla::prelude::*;

#[singleton(cron = "* * * *")]
async fn four_fields(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

#[singleton(cron = "0 75 * * * *")]
async fn minute_out_of_range(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

fn main() {}
