use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter {
    n: u64,
}

#[entity]
impl Counter {
    #[rpc]
    fn get(&self) -> u64 {
        self.n
    }
}

fn main() {}
