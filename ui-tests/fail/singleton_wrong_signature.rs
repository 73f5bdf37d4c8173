use flotilla::prelude::*;

#[singleton]
fn not_async(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

#[singleton]
async fn no_context() -> Result<(), String> {
    Ok(())
}

#[singleton]
async fn wrong_argument(_n: u32) -> Result<(), String> {
    Ok(())
}

#[singleton]
async fn no_result(_ctx: SingletonContext) {}

#[singleton]
async fn generic<T>(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

fn main() {}
