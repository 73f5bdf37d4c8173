use flotilla::prelude::*;

#[derive(Default)]
pub struct Account;

pub trait Balance {
    fn balance(&self) -> i64;
}

#[entity]
impl Balance for Account {
    fn balance(&self) -> i64 {
        0
    }
}

fn main() {}
