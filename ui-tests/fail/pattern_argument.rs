use flotilla::prelude::*;

#[derive(Default)]
pub struct Grid;

#[entity]
impl Grid {
    #[rpc]
    async fn set(&mut self, (x, y): (u8, u8), _: bool) -> u16 {
        u16::from(x) * u16::from(y)
    }
}

fn main() {}
