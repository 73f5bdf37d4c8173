use flotilla::prelude::*;

#[singleton(every = "5m", skip_if_older_than = "soon", name = "a", name = "b")]
async fn tick(_ctx: SingletonContext) -> Result<(), String> {
    Ok(())
}

fn main() {}
