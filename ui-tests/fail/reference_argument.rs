use flotilla::prelude::*;

#[derive(Default)]
pub struct Greeter;

#[entity]
impl Greeter {
    #[rpc]
    async fn greet(&self, name: &str) -> &'static str {
        let _ = name;
        "hello"
    }

    #[rpc]
    async fn bad_context(&self, ctx: &mut EntityContext) {
        let _ = ctx;
    }
}

fn main() {}
