//! The Flotilla book's code, compiled.
//!
//! Every page of the book (`book/src/`) is the doc comment of one empty module
//! below, so `cargo test -p flotilla-book-tests --doc` compiles every
//! ```` ```rust ```` block of the book, and runs those that are whole programs
//! (their setup is in `# `-prefixed lines, which rustdoc and mdBook both hide).
//! A page that drifts from the API fails this test instead of misleading a
//! reader.
//!
//! Blocks that are `{{#include ../../examples/...}}` directives stay
//! ```` ```rust,ignore ````: rustdoc cannot expand mdBook's include directive,
//! and the included examples are compiled (and run) by the workspace build
//! anyway. `SUMMARY.md` is mdBook's table of contents, not a page.
//!
//! Every page is included, also those with no Rust block today, so that a
//! block added later is tested without anyone remembering to add it here;
//! `tests/book_pages.rs` fails if a page is missing below, if a `rust,ignore`
//! block is anything but an include, or if a fence names no language (rustdoc
//! would test it as Rust).

#[doc = include_str!("../../book/src/introduction.md")]
mod introduction {}

#[doc = include_str!("../../book/src/quickstart.md")]
mod quickstart {}

#[doc = include_str!("../../book/src/entities.md")]
mod entities {}

#[doc = include_str!("../../book/src/persisted.md")]
mod persisted {}

#[doc = include_str!("../../book/src/singletons.md")]
mod singletons {}

#[doc = include_str!("../../book/src/storage.md")]
mod storage {}

#[doc = include_str!("../../book/src/configuration.md")]
mod configuration {}

#[doc = include_str!("../../book/src/architecture.md")]
mod architecture {}

#[doc = include_str!("../../book/src/performance.md")]
mod performance {}

#[doc = include_str!("../../book/src/reference/entity.md")]
mod reference_entity {}

#[doc = include_str!("../../book/src/reference/entity/name.md")]
mod reference_entity_name {}

#[doc = include_str!("../../book/src/reference/entity/max_idle.md")]
mod reference_entity_max_idle {}

#[doc = include_str!("../../book/src/reference/entity/mailbox.md")]
mod reference_entity_mailbox {}

#[doc = include_str!("../../book/src/reference/entity/state.md")]
mod reference_entity_state {}

#[doc = include_str!("../../book/src/reference/rpc.md")]
mod reference_rpc {}

#[doc = include_str!("../../book/src/reference/rpc/persisted.md")]
mod reference_rpc_persisted {}

#[doc = include_str!("../../book/src/reference/rpc/primary_key.md")]
mod reference_rpc_primary_key {}

#[doc = include_str!("../../book/src/reference/singleton.md")]
mod reference_singleton {}

#[doc = include_str!("../../book/src/reference/singleton/name.md")]
mod reference_singleton_name {}

#[doc = include_str!("../../book/src/reference/singleton/cron.md")]
mod reference_singleton_cron {}

#[doc = include_str!("../../book/src/reference/singleton/timezone.md")]
mod reference_singleton_timezone {}

#[doc = include_str!("../../book/src/reference/singleton/skip_if_older_than.md")]
mod reference_singleton_skip_if_older_than {}

#[doc = include_str!("../../book/src/reference/singleton/state.md")]
mod reference_singleton_state {}

#[doc = include_str!("../../book/src/cluster.md")]
mod cluster {}

#[doc = include_str!("../../book/src/context.md")]
mod context {}

#[doc = include_str!("../../book/src/postgres.md")]
mod postgres {}

#[doc = include_str!("../../book/src/deployment.md")]
mod deployment {}

#[doc = include_str!("../../book/src/failure-semantics.md")]
mod failure_semantics {}

#[doc = include_str!("../../book/src/transport.md")]
mod transport {}
