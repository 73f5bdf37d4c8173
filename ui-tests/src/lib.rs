//! Compile tests of Flotilla's macros, run by `tests/ui.rs` with trybuild.
//!
//! - `pass/*.rs`: programs that must compile without warnings, and run.
//! - `fail/*.rs`: programs that must fail to compile, each with the exact
//!   diagnostics in the `.stderr` file beside it.
//!
//! Regenerate the `.stderr` files with
//! `TRYBUILD=overwrite cargo test -p flotilla-ui-tests`, then read every one:
//! each message must name the fix and point at the user's token.
