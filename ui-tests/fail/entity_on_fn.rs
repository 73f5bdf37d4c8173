use flotilla::prelude::*;

#[entity]
async fn balance() -> i64 {
    0
}

fn main() {
    let _ = balance();
}
