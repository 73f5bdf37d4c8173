//! The storage conformance suite: one set of scenarios, run against every
//! `MessageStorage` backend. The memory backend is the reference semantics;
//! every other backend must behave the same.
//!
//! Each scenario becomes one `#[tokio::test]` per backend, named
//! `<backend>::<scenario>` (`memory::an_empty_batch_writes_nothing`,
//! `sqlite::an_empty_batch_writes_nothing`). A new backend joins by adding a
//! constructor to `fixtures` and its name to the `backends` list at the end.
//!
//! The PostgreSQL backend (feature `postgres`) runs against a real server:
//! see `storage_conformance/postgres_db.rs` for `FLOTILLA_TEST_DATABASE_URL`.

// A crate root resolves `mod` beside itself; the suite's files live in
// `storage_conformance/`.
#[path = "storage_conformance/fixtures.rs"]
mod fixtures;
#[cfg(feature = "postgres")]
#[path = "storage_conformance/postgres_db.rs"]
mod postgres_db;
#[cfg(feature = "postgres")]
#[path = "storage_conformance/postgres_only.rs"]
mod postgres_only;
#[cfg(feature = "postgres")]
#[path = "storage_conformance/postgres_runners.rs"]
mod postgres_runners;
#[path = "storage_conformance/scenarios.rs"]
mod scenarios;
#[path = "storage_conformance/sqlite_effects.rs"]
mod sqlite_effects;
#[path = "storage_conformance/sqlite_only.rs"]
mod sqlite_only;

/// Expands to `mod <backend> { #[tokio::test] async fn <scenario>() {..} .. }`
/// for every backend and every scenario. `scenarios` take the storage;
/// `fixture_scenarios` take the whole fixture (to look at effects).
macro_rules! conformance {
    (
        backends: [$($(#[$gate:meta])* $backend:ident),+ $(,)?],
        scenarios: $scenarios:tt,
        fixture_scenarios: $fixture_scenarios:tt $(,)?
    ) => {
        $( conformance!(@backend [$(#[$gate])*] $backend, $scenarios, $fixture_scenarios); )+
    };
    (
        @backend [$(#[$gate:meta])*] $backend:ident,
        [$($scenario:ident),* $(,)?],
        [$($fixture_scenario:ident),* $(,)?]
    ) => {
        $(#[$gate])*
        mod $backend {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let fixture = crate::fixtures::$backend().await;
                    crate::scenarios::$scenario(fixture.storage()).await;
                    fixture.finish().await;
                }
            )*
            $(
                #[tokio::test]
                async fn $fixture_scenario() {
                    let fixture = crate::fixtures::$backend().await;
                    crate::scenarios::$fixture_scenario(&fixture).await;
                    fixture.finish().await;
                }
            )*
        }
    };
}

conformance! {
    backends: [memory, sqlite, #[cfg(feature = "postgres")] postgres],
    scenarios: [
        save_then_read_unprocessed_preserves_every_field,
        unprocessed_is_in_id_order_and_pages_with_after_and_limit,
        a_future_delivery_becomes_ready_at_its_instant,
        next_delivery_is_none_without_scheduled_messages,
        a_duplicate_key_returns_the_stored_message_then_its_reply,
        duplicate_keys_within_one_batch_store_the_first,
        messages_without_a_key_are_never_duplicates,
        a_completion_records_reply_and_state_together,
        every_reply_kind_round_trips,
        a_second_completion_is_already_processed_and_leaves_state_untouched,
        completing_an_unknown_message_writes_nothing,
        one_batch_completes_several_entities,
        a_message_saved_and_completed_in_one_batch_is_processed,
        an_empty_batch_writes_nothing,
        purge_removes_old_processed_messages_and_frees_their_keys,
        entity_state_survives_purge,
        load_state_of_an_unknown_entity_is_none,
        a_closed_storage_refuses_every_call,
        the_same_message_completed_twice_in_one_batch_is_recorded_once,
        the_last_completion_of_an_entity_in_a_batch_leaves_its_state,
        large_batches_keep_every_outcome_in_order,
        a_shard_filter_limits_unprocessed_and_next_delivery,
    ],
    fixture_scenarios: [
        effects_commit_with_their_completion,
        mixed_completions_apply_state_in_batch_order,
    ],
}
