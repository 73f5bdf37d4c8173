//! Every diagnostic of `#[entity]`, `#[rpc]` and `#[singleton]`, and the programs they must accept.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("pass/*.rs");
    t.compile_fail("fail/*.rs");
}
