use std::rc::Rc;

use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter {
    n: u64,
}

async fn tick() {}

#[entity]
impl Counter {
    #[rpc]
    async fn add(&mut self, by: u64) -> u64 {
        let shared = Rc::new(by);
        tick().await;
        self.n += *shared;
        self.n
    }
}

fn main() {}
